"""Every API error is JSON: {"error": {"code": <stable code>, "message": <text>, ...}}.

Three layers make that hold for every response under /api/ (and the Stripe webhook), in every
mode, DEBUG included:
- json_exception_handler: DRF's errors inside API views;
- ApiErrorMiddleware: what happens outside DRF (an oversized body, a NUL in the query string,
  an unhandled exception, a database or broker outage), and any HTML error page that Django
  itself produced for an API path (a debug 404 page, "Bad Request (400)", a bare 405);
- kvmarket.parsers.SafeJSONParser: JSON bodies whose strings no tokenizer or database takes.
"""

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

log = logging.getLogger(__name__)

# Paths whose every response is JSON: the API and the Stripe webhook.
JSON_PATH_PREFIXES = ("/api/", "/stripe/")
# How long a client should wait before retrying when a backing service is down.
RETRY_AFTER_SECONDS = 5

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


def _is_api(request) -> bool:
    return is_json_path(request.path)


def is_json_path(path: str) -> bool:
    return path.startswith(JSON_PATH_PREFIXES)


# Codes for error responses that Django (not DRF) produced, by status.
_STATUS_CODES = {
    400: ("bad_request", "The request is malformed."),
    401: ("not_authenticated", "Authentication credentials were not provided."),
    403: ("permission_denied", "You do not have permission to perform this action."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "This method is not allowed here."),
    413: ("request_too_large", "The request body is too large."),
    500: ("server_error", "Internal server error."),
    503: ("service_unavailable", "A backing service is unavailable; retry later."),
}
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate", "Vary")


def _unavailable(code: str, message: str) -> JsonResponse:
    response = JsonResponse(error_body(code, message), status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def _is_json(response: HttpResponse) -> bool:
    content_type = response.get("Content-Type", "")
    return content_type.startswith(("application/json", "application/problem+json"))


def _broker_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (KombuOperationalError, RedisConnectionError, RedisTimeoutError)


class ApiErrorMiddleware:
    """JSON errors for API paths whatever produced them; 503 + Retry-After for outages.

    Sits near the top of MIDDLEWARE so that it sees the responses every inner layer built,
    and checks a request's size and query string before anything reads them.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        api = is_json_path(request.path)
        if api:
            refused = self._refuse_early(request)
            if refused is not None:
                return refused
        response = self.get_response(request)
        if api and response.status_code >= 400 and not _is_json(response):
            response = self._as_json(response)
        return response

    def _refuse_early(self, request: HttpRequest) -> HttpResponse | None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return JsonResponse(
                error_body("bad_request", "Content-Length is not a number."), status=400
            )
        if limit is not None and length > limit:
            return _too_large(limit)
        for key, values in request.GET.lists():
            if "\x00" in key or any("\x00" in v for v in values):
                return JsonResponse(
                    error_body(
                        "invalid_parameter",
                        f"Query parameter {key.replace(chr(0), '')!r} contains a NUL character.",
                    ),
                    status=400,
                )
        return None

    @staticmethod
    def _as_json(response: HttpResponse) -> JsonResponse:
        code, message = _STATUS_CODES.get(
            response.status_code, ("error", response.reason_phrase or "Error.")
        )
        replaced = JsonResponse(error_body(code, message), status=response.status_code)
        for header in _KEPT_HEADERS:
            if header in response:
                replaced[header] = response[header]
        return replaced

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        api = is_json_path(request.path)
        if isinstance(exc, OperationalError | InterfaceError):
            log.warning("Database unavailable for %s %s: %s", request.method, request.path, exc)
            if api:
                return _unavailable("database_unavailable", "The database is unavailable.")
            return _page_unavailable()
        if isinstance(exc, _broker_errors()):
            log.warning("Broker unavailable for %s %s: %s", request.method, request.path, exc)
            if api:
                return _unavailable("broker_unavailable", "The task queue is unavailable.")
            return _page_unavailable()
        if not api:
            return None  # pages: Django's own handling (debug page or handler500)
        if isinstance(exc, RequestDataTooBig):
            return _too_large(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
        if isinstance(exc, SuspiciousOperation):
            log.warning("Bad request %s %s: %s", request.method, request.path, exc)
            return JsonResponse(error_body("bad_request", "The request is malformed."), status=400)
        if isinstance(exc, DatabaseError):
            log.error("Database error on %s %s", request.method, request.path, exc_info=exc)
        else:
            log.error("Unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return JsonResponse(error_body("server_error", "Internal server error."), status=500)


def _too_large(limit: int | None) -> JsonResponse:
    return JsonResponse(
        error_body(
            "request_too_large",
            f"The request body is larger than the limit of {limit} bytes.",
            limit_bytes=limit,
        ),
        status=413,
    )


def _page_unavailable() -> HttpResponse:
    response = HttpResponse(
        "<!doctype html><title>Temporarily unavailable</title>"
        "<h1>Temporarily unavailable</h1><p>Please retry in a few seconds.</p>",
        status=503,
    )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def json_404(request, exception=None) -> HttpResponse:
    """handler404: JSON for /api/ paths; pages keep Django's HTML 404."""
    if _is_api(request):
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    return defaults.page_not_found(request, exception)


def json_500(request) -> HttpResponse:
    """handler500: JSON for /api/ paths (never a stack trace); pages get the HTML 500."""
    if _is_api(request):
        return JsonResponse(error_body("server_error", "Internal server error."), status=500)
    return defaults.server_error(request)
