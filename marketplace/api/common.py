"""Shared pieces of the marketplace API views: error translation and the Idempotency-Key."""

from __future__ import annotations

from django.core.exceptions import ObjectDoesNotExist, PermissionDenied, ValidationError
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import authentication, exceptions
from rest_framework.request import Request
from rest_framework.views import APIView

from kvmarket.api_errors import ApiError
from marketplace.authentication import ApiKeyAuthentication
from marketplace.serializers import ErrorSerializer
from marketplace.services.errors import MarketplaceError

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_PARAMETER = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="Retries with the same key return the first result and are charged once.",
)


def error_response(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


COMMON_ERRORS = {
    401: error_response("Missing or invalid API key."),
    403: error_response("This account's role cannot do this."),
    404: error_response("Not found (or not yours)."),
    422: error_response("The request is invalid."),
    429: error_response("Rate limited."),
}


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

    def handle_exception(self, exc: Exception):  # noqa: ANN201
        return super().handle_exception(to_api_error(exc))


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > 255:
        raise ApiError(
            status_code=422, code="invalid_request",
            message=f"{IDEMPOTENCY_HEADER} must be 1 to 255 characters.",
        )
    return key
