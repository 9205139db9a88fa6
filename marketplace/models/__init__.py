"""Marketplace models, one module per area (accounts, documents, licenses)."""

from marketplace.models.accounts import ApiKey, Role, User

__all__ = ["ApiKey", "Role", "User"]
