"""Writes for accounts: sign-up and API keys."""

import secrets
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from marketplace.models import ApiKey, Role, User
from marketplace.selectors.accounts import forget_api_key, hash_api_key, note_api_key_used

API_KEY_PREFIX = "kvm_"


@dataclass(frozen=True)
class IssuedApiKey:
    api_key: ApiKey
    raw_key: str  # shown to the agent once, never stored


@transaction.atomic
def register_user(*, email: str, password: str, role: Role, display_name: str = "") -> User:
    if role not in (Role.PUBLISHER, Role.AGENT):
        raise ValueError("Only publishers and agents can sign up.")
    return User.objects.create_user(
        email=email, password=password, role=role, display_name=display_name
    )


@transaction.atomic
def create_api_key(*, user: User, name: str) -> IssuedApiKey:
    if user.role != Role.AGENT:
        raise PermissionError("Only agents have API keys.")
    raw_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(
        user=user,
        name=name.strip() or "default",
        prefix=raw_key[:12],
        key_hash=hash_api_key(raw_key),
    )
    return IssuedApiKey(api_key=api_key, raw_key=raw_key)


@transaction.atomic
def revoke_api_key(*, user: User, key_id: int) -> ApiKey:
    api_key = ApiKey.objects.select_for_update().get(pk=key_id, user=user)
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    forget_api_key(api_key.key_hash)
    return api_key


def touch_api_key(*, api_key: ApiKey) -> None:
    """Record last use; at most once a minute per key so hot keys do not write on every call."""
    now = timezone.now()
    if api_key.last_used_at is None or (now - api_key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
        note_api_key_used(api_key.key_hash, now)
