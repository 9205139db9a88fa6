"""Every API error is JSON: {"error": {"code": <stable code>, "message": <text>, ...}}."""

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

# DRF's default codes for its own exceptions, mapped to our stable codes.
_CODES = {
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "rate_limited",
    exceptions.ParseError: "parse_error",
    exceptions.ValidationError: "invalid_request",
}


class ApiError(exceptions.APIException):
    """An API error with an explicit HTTP status and stable code, raised by API views."""

    def __init__(self, *, status_code: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.extra = extra


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def json_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApiError):
        response = Response(error_body(exc.code, exc.message, **exc.extra),
                            status=exc.status_code)
        if exc.extra.get("retry_after_seconds") is not None:
            response["Retry-After"] = str(int(exc.extra["retry_after_seconds"]))
        return response
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None
    code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), "error")
    if isinstance(exc, exceptions.ValidationError):
        body = error_body(code, "The request is invalid.", fields=exc.detail)
        response.status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    else:
        body = error_body(code, str(exc.detail))
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        body["error"]["retry_after_seconds"] = int(exc.wait)
    response.data = body
    return response


def _is_api(request) -> bool:  # noqa: ANN001
    return request.path.startswith("/api/")


def json_404(request, exception=None) -> HttpResponse:  # noqa: ANN001
    """handler404: JSON for /api/ paths; pages keep Django's HTML 404."""
    if _is_api(request):
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    return defaults.page_not_found(request, exception)


def json_500(request) -> HttpResponse:  # noqa: ANN001
    """handler500: JSON for /api/ paths (never a stack trace); pages get the HTML 500."""
    if _is_api(request):
        return JsonResponse(error_body("server_error", "Internal server error."), status=500)
    return defaults.server_error(request)
