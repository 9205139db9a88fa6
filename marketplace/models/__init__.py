"""Marketplace models, one module per area (accounts, documents, licenses)."""

from marketplace.models.accounts import ApiKey, Role, User
from marketplace.models.documents import Document, DocumentStatus, PrecomputeStep
from marketplace.models.licenses import License, LicenseStatus, Load, LoadKind, LoadStatus

__all__ = [
    "ApiKey",
    "Document",
    "DocumentStatus",
    "License",
    "LicenseStatus",
    "Load",
    "LoadKind",
    "LoadStatus",
    "PrecomputeStep",
    "Role",
    "User",
]
