"""Marketplace models, one module per area (accounts, documents, licenses)."""

from marketplace.models.accounts import ApiKey, Role, User
from marketplace.models.documents import Document, DocumentStatus, PrecomputeStep
from marketplace.models.licenses import License, LicenseStatus, Load, LoadKind, LoadStatus
from marketplace.models.workers import GpuWorker

__all__ = [
    "ApiKey",
    "Document",
    "DocumentStatus",
    "GpuWorker",
    "License",
    "LicenseStatus",
    "Load",
    "LoadKind",
    "LoadStatus",
    "PrecomputeStep",
    "Role",
    "User",
]
