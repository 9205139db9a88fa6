"""Degrade, don't fall over: the API keeps serving when the throttle's cache is down, /healthz
is liveness only, and /readyz reports the database, the broker and the cache (503 when one is
down)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from django.db import OperationalError

pytestmark = pytest.mark.django_db

# Nothing listens on port 1: connections are refused at once.
CLOSED_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def _fresh_throttle_fallback() -> Iterator[None]:
    from marketplace.throttling import fallback_cache

    fallback_cache.reset()
    yield
    fallback_cache.reset()


@pytest.fixture
def cache_down(settings) -> None:
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CLOSED_REDIS,
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }


def test_api_serves_when_the_throttle_cache_is_down(api_client, cache_down, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="marketplace.throttling")
    for _ in range(5):
        response = api_client.get("/api/v1/me")
        assert response.status_code == 200, response.content
    assert api_client.get("/api/v1/documents").status_code == 200
    outage_lines = [r for r in caplog.records if "Throttle cache unavailable" in r.getMessage()]
    assert len(outage_lines) == 1  # one log line per outage, not one per request


def test_limits_still_hold_per_process_while_the_cache_is_down(
    api_client, cache_down, settings
) -> None:
    settings.API_KEY_THROTTLE_RATE = "3/min"
    codes = [api_client.get("/api/v1/me").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def test_throttle_goes_back_to_the_shared_cache(api_client, settings, caplog) -> None:
    from django.core.cache import cache

    from marketplace.throttling import fallback_cache

    caplog.set_level(logging.WARNING, logger="marketplace.throttling")
    settings.THROTTLE_CACHE_RETRY_SECONDS = 0
    original = settings.CACHES
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": CLOSED_REDIS}}
    assert api_client.get("/api/v1/me").status_code == 200
    settings.CACHES = original
    assert api_client.get("/api/v1/me").status_code == 200
    assert not fallback_cache.degraded
    assert any(key.startswith(":1:throttle_api_key") or "throttle" in key
               for key in cache._cache)  # the locmem shared cache holds the counter again
    assert any("available again" in r.getMessage() for r in caplog.records)


def test_healthz_is_liveness_only(client, monkeypatch) -> None:
    from django.db import connection

    def down(*args, **kwargs):
        raise OperationalError("the database is down")

    monkeypatch.setattr(connection, "cursor", down)
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_reports_every_dependency(client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True, "broker": True, "cache": True,
    }


def test_readyz_is_503_when_the_cache_is_down(client, cache_down) -> None:
    response = client.get("/readyz", HTTP_HOST="10.0.0.7:8000")  # probes skip host checks
    assert response.status_code == 503
    assert response["Retry-After"]
    checks = response.json()["checks"]
    assert checks["cache"]["ok"] is False and "Connection" in checks["cache"]["error"]
    assert checks["database"]["ok"] is True


def test_readyz_is_503_when_the_broker_is_down(client, monkeypatch) -> None:
    from kvmarket.celery import app

    # Celery reads CELERY_BROKER_URL from the environment before its configuration.
    monkeypatch.setenv("CELERY_BROKER_URL", CLOSED_REDIS)
    monkeypatch.setitem(app.conf, "broker_url", CLOSED_REDIS)
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"]["ok"] is False
    assert checks["broker"]["seconds"] < 5


def test_readyz_is_503_when_the_database_is_down(client, monkeypatch) -> None:
    from django.db import connection

    def down(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(connection, "cursor", down)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == {
        "ok": False, "error": "OperationalError: connection refused",
        "seconds": response.json()["checks"]["database"]["seconds"],
    }
