"""Per-API-key rate limits (a client's IP is used for unauthenticated calls)."""

from rest_framework.throttling import SimpleRateThrottle


class ApiKeyRateThrottle(SimpleRateThrottle):
    scope = "api_key"

    def get_cache_key(self, request, view):  # noqa: ANN001, ANN201
        api_key = getattr(request, "auth", None)
        ident = f"key:{api_key.pk}" if api_key is not None else f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}
