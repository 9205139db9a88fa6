"""Reads for accounts."""

from django.db.models import QuerySet

from marketplace.models import ApiKey, User
from marketplace.services.accounts import hash_api_key


def active_api_key(raw_key: str) -> ApiKey | None:
    return (
        ApiKey.objects.select_related("user")
        .filter(key_hash=hash_api_key(raw_key), revoked_at__isnull=True, user__is_active=True)
        .first()
    )


def api_keys_of(user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user).order_by("-created_at")
