"""Outages against a real production web server (gunicorn in a subprocess, DEBUG on, so the
JSON errors hold in every mode): the throttle's Redis cache on a closed port leaves the API
serving; a database on a closed port gives 503 JSON with Retry-After; /healthz stays 200 (liveness)
and /readyz says which dependency is down."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.celery_worker import REPO_ROOT, database_url_from_settings
from tests.support.subprocess_settings import clean_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CLOSED_REDIS = "redis://127.0.0.1:1/0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gunicorn(env: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="gunicorn-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "kvmarket.wsgi:application", "--bind",
         f"127.0.0.1:{port}", "--workers", "1", "--threads", "2", "--timeout", "60"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                if _get(f"{base}/healthz")[0] == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("gunicorn did not start:\n" + Path(log.name).read_text())
            time.sleep(0.2)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        Path(log.name).unlink(missing_ok=True)


def _get(url: str, key: str | None = None) -> tuple[int, dict[str, str], dict]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        assert error.headers["Content-Type"].startswith("application/json"), body[:300]
        return error.code, dict(error.headers), json.loads(body)


def _env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    from django.conf import settings

    values = {
        "DEBUG": "true",
        "DATABASE_URL": database_url_from_settings(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "CELERY_RESULT_BACKEND": settings.CELERY_RESULT_BACKEND,
        **overrides,
    }
    return clean_env(tmp_path, **values)


def test_api_serves_with_the_throttle_cache_down(tmp_path, agent_key) -> None:
    with gunicorn(_env(tmp_path, CACHE_URL=CLOSED_REDIS)) as base:
        for _ in range(3):
            status, _, body = _get(f"{base}/api/v1/me", agent_key)
            assert status == 200 and body["role"] == "agent"
        status, _, body = _get(f"{base}/api/v1/documents", agent_key)
        assert status == 200 and body["count"] == 0
        status, headers, body = _get(f"{base}/readyz")
        assert status == 503 and headers["Retry-After"]
        assert body["checks"]["cache"]["ok"] is False
        assert body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]


def test_database_outage_is_503_json_and_healthz_stays_up(tmp_path) -> None:
    env = _env(tmp_path, DATABASE_URL="postgres://postgres@127.0.0.1:1/kvmarket_down")
    with gunicorn(env) as base:
        status, headers, body = _get(f"{base}/api/v1/me", "kvm_any_key")
        assert status == 503
        assert body["error"]["code"] == "database_unavailable"
        assert int(headers["Retry-After"]) > 0
        assert _get(f"{base}/healthz")[0] == 200
        status, _, body = _get(f"{base}/readyz")
        assert status == 503 and body["checks"]["database"]["ok"] is False
