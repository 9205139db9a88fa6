"""Per-API-key rate limits (a client's IP is used for unauthenticated calls).

The rate is read from settings.API_KEY_THROTTLE_RATE on every request (e.g. "600/min"), so a
deployment sets it with the env var API_KEY_THROTTLE_RATE and tests can override the setting.
Over the limit, the API answers 429 {"error": {"code": "rate_limited", ...}} with Retry-After.

The counters live in the default cache (Redis when several web processes share them). When that
cache is unreachable the limiter does not take the API down with it: it logs one warning and
counts in this process's memory until the cache answers again (checked every
THROTTLE_CACHE_RETRY_SECONDS), so limits still hold per process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.conf import settings
from django.core.cache import cache as shared_cache
from django.core.cache.backends.locmem import LocMemCache
from rest_framework.throttling import SimpleRateThrottle

log = logging.getLogger(__name__)


class FallbackCache:
    """The shared cache, or a process-local one while the shared cache raises."""

    def __init__(self) -> None:
        self._local = LocMemCache("kvmarket-throttle-fallback", {})
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which the shared cache is not tried

    @property
    def degraded(self) -> bool:
        return time.monotonic() < self._down_until

    def _call(self, method: str, *args: Any) -> Any:
        if not self.degraded:
            try:
                value = getattr(shared_cache, method)(*args)
            except Exception as exc:  # noqa: BLE001 - any backend's connection error
                self._mark_down(exc)
            else:
                if self._down_until:
                    self._mark_up()
                return value
        return getattr(self._local, method)(*args)

    def _mark_down(self, exc: Exception) -> None:
        retry = float(settings.THROTTLE_CACHE_RETRY_SECONDS)
        with self._lock:
            first = self._down_until == 0.0
            self._down_until = time.monotonic() + retry
        if first:  # one line per outage, not one per request
            log.warning(
                "Throttle cache unavailable (%s: %s); counting in process memory, "
                "trying it again every %.0f s", type(exc).__name__, exc, retry,
            )

    def _mark_up(self) -> None:
        with self._lock:
            self._down_until = 0.0
        log.warning("Throttle cache available again; counting there")

    def reset(self) -> None:
        """Forget an outage and the local counts (tests)."""
        with self._lock:
            self._down_until = 0.0
        self._local.clear()

    def get(self, key: str, default: Any = None) -> Any:
        return self._call("get", key, default)

    def set(self, key: str, value: Any, timeout: float | None = None) -> None:
        self._call("set", key, value, timeout)


fallback_cache = FallbackCache()


class ApiKeyRateThrottle(SimpleRateThrottle):
    scope = "api_key"
    cache = fallback_cache

    def __init__(self) -> None:  # the rate is looked up per request, not at import time
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)

    def get_rate(self) -> str | None:
        return getattr(settings, "API_KEY_THROTTLE_RATE", None) or super().get_rate()

    def get_cache_key(self, request, view):
        api_key = getattr(request, "auth", None)
        ident = f"key:{api_key.pk}" if api_key is not None else f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}
