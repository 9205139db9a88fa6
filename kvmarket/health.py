"""Liveness and readiness probes.

- GET /healthz (liveness): {"status": "ok"} whenever this process answers HTTP. It checks no
  backing service, so an outage of the database or Redis does not get healthy web processes
  restarted (they answer 503 meanwhile and recover by themselves).
- GET /readyz (readiness): checks the database, the Celery broker and the cache, each with a
  short timeout; 200 {"status": "ready", "checks": {...}} when all answer, 503 (with
  Retry-After) and the failing ones' errors otherwise. Load balancers route on this one.

HealthCheckMiddleware sits before the other middleware (after the body drain), so probes on
http://127.0.0.1:8000/healthz work in production too: before ALLOWED_HOSTS validation and the
HTTPS redirect (neither applies to a probe from inside the container).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from marketplace.api_errors import RETRY_AFTER_SECONDS

PROBE_TIMEOUT_SECONDS = 2.0


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_broker() -> None:
    from kvmarket.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2,
            timeout=PROBE_TIMEOUT_SECONDS,
        )
        conn.default_channel  # noqa: B018 - opens a channel: the broker really answers


def _check_cache() -> None:
    key = f"kvmarket:readyz:{uuid.uuid4().hex}"
    cache.set(key, "1", timeout=10)
    if cache.get(key) != "1":
        raise RuntimeError("the cache did not return what was just written")
    cache.delete(key)


CHECKS: dict[str, Callable[[], None]] = {
    "database": _check_database,
    "broker": _check_broker,
    "cache": _check_cache,
}


def readyz(request: HttpRequest) -> JsonResponse:
    results = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none raised
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            results[name] = {"ok": True}
        results[name]["seconds"] = round(time.perf_counter() - start, 4)
    ready = all(r["ok"] for r in results.values())
    response = JsonResponse(
        {"status": "ready" if ready else "unavailable", "checks": results},
        status=200 if ready else 503,
    )
    if not ready:
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


_PROBES = {"/healthz": healthz, "/readyz": readyz}


class HealthCheckMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        probe = _PROBES.get(request.path)
        if probe is not None and request.method in ("GET", "HEAD"):
            return probe(request)
        return self.get_response(request)

