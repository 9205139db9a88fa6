"""Per-API-key rate limits (a client's IP is used for unauthenticated calls).

The rate is read from settings.API_KEY_THROTTLE_RATE on every request (e.g. "600/min"), so a
deployment sets it with the env var API_KEY_THROTTLE_RATE and tests can override the setting.
Over the limit, the API answers 429 {"error": {"code": "rate_limited", ...}} with Retry-After.
"""

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle


class ApiKeyRateThrottle(SimpleRateThrottle):
    scope = "api_key"

    def __init__(self) -> None:  # the rate is looked up per request, not at import time
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)

    def get_rate(self) -> str | None:
        return getattr(settings, "API_KEY_THROTTLE_RATE", None) or super().get_rate()

    def get_cache_key(self, request, view):  # noqa: ANN001, ANN201
        api_key = getattr(request, "auth", None)
        ident = f"key:{api_key.pk}" if api_key is not None else f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}
