"""Marketplace business errors. Each has a stable code and an HTTP status the API answers with."""

from __future__ import annotations


class MarketplaceError(Exception):
    def __init__(self, *, code: str, message: str, status: int = 400, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra


def not_found(what: str) -> MarketplaceError:
    return MarketplaceError(code="not_found", message=f"No such {what}.", status=404)


def conflict(code: str, message: str) -> MarketplaceError:
    return MarketplaceError(code=code, message=message, status=409)


def forbidden(code: str, message: str) -> MarketplaceError:
    return MarketplaceError(code=code, message=message, status=403)
