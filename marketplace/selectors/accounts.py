"""Reads for accounts."""

import copy
import hashlib
import threading
import time

from django.conf import settings
from django.db.models import QuerySet

from marketplace.models import ApiKey, User


def hash_api_key(raw_key: str) -> str:
    """What is stored of a key (ApiKey.key_hash): never the key itself."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


# Active API keys by hash, with their user, for API_KEY_CACHE_SECONDS per process: every API
# request authenticates, and the key rarely changes. A revocation in this process forgets the
# key at once; one made elsewhere (another process, a deactivated user) holds within the TTL.
API_KEY_CACHE_MAX = 10_000
_keys_lock = threading.Lock()
_keys: dict[str, tuple[float, ApiKey]] = {}


def active_api_key(raw_key: str) -> ApiKey | None:
    digest = hash_api_key(raw_key)
    ttl = float(settings.API_KEY_CACHE_SECONDS)
    if ttl > 0:
        with _keys_lock:
            hit = _keys.get(digest)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return _fresh(hit[1])
    api_key = (
        ApiKey.objects.select_related("user")
        .filter(key_hash=digest, revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if api_key is not None and ttl > 0:
        with _keys_lock:
            if len(_keys) >= API_KEY_CACHE_MAX:
                _keys.clear()
            _keys[digest] = (time.monotonic(), _fresh(api_key))
    return api_key


def _fresh(api_key: ApiKey) -> ApiKey:
    """A copy with its own user: model instances are not shared between request threads."""
    user = copy.copy(api_key.user)
    api_key = copy.copy(api_key)
    api_key.user = user
    return api_key


def note_api_key_used(key_hash: str, when: object) -> None:
    """The cached key's last use, so that a cached key is touched once a minute, not on every
    request (services.accounts.touch_api_key)."""
    with _keys_lock:
        hit = _keys.get(key_hash)
        if hit is not None:
            hit[1].last_used_at = when


def forget_api_key(key_hash: str | None = None) -> None:
    """Drop one cached key (revoked here), or all of them (tests)."""
    with _keys_lock:
        if key_hash is None:
            _keys.clear()
        else:
            _keys.pop(key_hash, None)


def api_keys_of(user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user).order_by("-created_at")
