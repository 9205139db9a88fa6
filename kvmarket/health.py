"""Health check: GET /healthz answers {"status": "ok"} when the database answers.

HealthCheckMiddleware sits first in MIDDLEWARE, so container health checks on
http://127.0.0.1:8000/healthz work in production too: before ALLOWED_HOSTS validation and the
HTTPS redirect (neither applies to a probe from inside the container).
"""

from collections.abc import Callable

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse


def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


class HealthCheckMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            return healthz(request)
        return self.get_response(request)
