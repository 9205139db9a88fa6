"""Shared pieces of the marketplace API views: error translation and the Idempotency-Key."""

from __future__ import annotations

from django.core.exceptions import ObjectDoesNotExist, PermissionDenied, ValidationError
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import authentication, exceptions
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.views import APIView

from marketplace.api_errors import ApiError
from marketplace.authentication import ApiKeyAuthentication
from marketplace.serializers import ErrorSerializer
from marketplace.services.errors import MarketplaceError

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_MAX = 255
IDEMPOTENCY_PARAMETER = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    # Printable ASCII without leading or trailing spaces (a header value is trimmed).
    {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX,
     "pattern": "^[!-~]([ -~]*[!-~])?$"},
    OpenApiParameter.HEADER,
    required=False,
    description="Retries with the same key return the first result and are charged once "
    f"(1 to {IDEMPOTENCY_KEY_MAX} characters).",
)


def error_response(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


# Statuses every authenticated endpoint can answer, documented on each operation.
AUTH_ERRORS = {
    400: error_response(
        "A malformed request: unparsable JSON (parse_error), a NUL in a query parameter or bad "
        "pagination values (invalid_parameter)."
    ),
    401: error_response("Missing or invalid API key (not_authenticated, authentication_failed)."),
    429: error_response("Rate limited (rate_limited, with Retry-After)."),
}
COMMON_ERRORS = {
    **AUTH_ERRORS,
    403: error_response("This account's role cannot do this."),
    404: error_response("Not found (or not yours)."),
    422: error_response("The request is invalid (invalid_request, with the fields)."),
}
PAGINATION_ERRORS: dict[int, OpenApiResponse] = {}  # 400 (bad limit/offset) is in AUTH_ERRORS


class StrictLimitOffsetPagination(LimitOffsetPagination):
    """limit/offset pagination that refuses bad values (400) instead of ignoring them, and
    documents its bounds: limit 1..max_limit, offset >= 0."""

    default_limit = 50
    max_limit = 200

    def get_limit(self, request: Request) -> int:
        return self._int_param(request, self.limit_query_param, self.default_limit,
                               1, self.max_limit)

    def get_offset(self, request: Request) -> int:
        return self._int_param(request, self.offset_query_param, 0, 0, None)

    @staticmethod
    def _int_param(request: Request, name: str, default: int, lo: int, hi: int | None) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        if not raw.isascii() or not raw.isdigit() or not (
            lo <= int(raw) <= (hi if hi is not None else int(raw))
        ):
            raise ApiError(status_code=400, code="invalid_parameter",
                           message=f"{name} must be an integer {bound}.")
        return int(raw)

    def get_schema_operation_parameters(self, view: object) -> list[dict]:
        return [
            {"name": self.limit_query_param, "required": False, "in": "query",
             "description": f"Results per page (default {self.default_limit}).",
             "schema": {"type": "integer", "minimum": 1, "maximum": self.max_limit}},
            {"name": self.offset_query_param, "required": False, "in": "query",
             "description": "Index of the first result.",
             "schema": {"type": "integer", "minimum": 0}},
        ]


def to_api_error(exc: Exception) -> Exception:
    """Business errors (marketplace, ledger, Django) as JSON API errors with stable codes."""
    from ledger.errors import LedgerError

    if isinstance(exc, MarketplaceError):
        return ApiError(status_code=exc.status, code=exc.code, message=exc.message, **exc.extra)
    if isinstance(exc, LedgerError):
        return ApiError(
            status_code=getattr(exc, "http_status", 400), code=exc.code, message=exc.message
        )
    if isinstance(exc, ObjectDoesNotExist):
        return ApiError(status_code=404, code="not_found", message="Not found.")
    if isinstance(exc, PermissionDenied):
        return ApiError(
            status_code=403, code="permission_denied", message=str(exc) or "Not allowed."
        )
    if isinstance(exc, ValidationError):
        if hasattr(exc, "error_dict"):
            detail = exc.message_dict
        else:
            detail = {"non_field_errors": exc.messages}
        return exceptions.ValidationError(detail)
    return exc


class MarketplaceView(APIView):
    """API keys for agents; the session as well, for the publisher's browser pages."""

    # Session auth enforces CSRF on writes (the publisher's pages and htmx polling use it).
    authentication_classes = [ApiKeyAuthentication, authentication.SessionAuthentication]

    def handle_exception(self, exc: Exception):
        return super().handle_exception(to_api_error(exc))


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    key = key.strip()
    printable_ascii = key.isascii() and key.isprintable()
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not printable_ascii:
        raise ApiError(
            status_code=422, code="invalid_request",
            message=f"{IDEMPOTENCY_HEADER} must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII "
            "characters.",
        )
    return key
