"""The web's side of the direct channel to GPU workers: route, connect, stream events.

One process-wide httpx client keeps connections to the workers alive between requests (no
TCP or HTTP set-up per load). ``open_stream`` tries the live workers of the model in the
registry's order for the artifact (marketplace.registry): a worker that cannot be reached or
answers busy is skipped for the next; the first that accepts the request streams its events.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
from django.conf import settings

from marketplace import registry
from marketplace.services.errors import MarketplaceError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 2.0
NO_WORKER_RETRY_AFTER_SECONDS = 5
BUSY_RETRY_AFTER_SECONDS = 1

_client_lock = threading.Lock()
_client: httpx.Client | None = None


class WorkerLost(Exception):
    """The worker's stream broke (connection closed or reset) before its final event."""


def client() -> httpx.Client:
    """The process-wide pooled client (thread-safe; keep-alive connections per worker)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                limits = httpx.Limits(max_connections=512, max_keepalive_connections=128,
                                      keepalive_expiry=60)
                _client = httpx.Client(
                    timeout=httpx.Timeout(
                        float(settings.COMPLETION_TIMEOUT_SECONDS), connect=CONNECT_TIMEOUT_SECONDS
                    ),
                    limits=limits,
                    headers={"Authorization": f"Bearer {registry.worker_secret()}"},
                    # A request goes out as two writes (headers, body): without NODELAY, Nagle
                    # may hold the second until the first is acknowledged.
                    transport=httpx.HTTPTransport(limits=limits, socket_options=[
                        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                    ]),
                )
    return _client


def reset_client() -> None:
    """Drop the pooled client (tests that change the secret or the timeout)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = None


class WorkerStream:
    """An open generation on one worker: iterate for its events (dicts); close to stop it."""

    def __init__(self, worker: registry.WorkerInfo, response: httpx.Response,
                 connect_s: float) -> None:
        self.worker = worker.name
        self.response = response
        self.connect_s = connect_s
        self._events = self._read()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One iterator for the stream's life: iterating again resumes where it stopped."""
        return self._events

    def _read(self) -> Iterator[dict[str, Any]]:
        last = None
        try:
            try:
                for line in self.response.iter_lines():
                    if not line:
                        continue
                    event = json.loads(line)
                    if event.get("type") in ("final", "error"):
                        # The body ends with it (same write): read to its end before handing it
                        # over, so the connection goes back to the pool. A response closed
                        # before its end is a connection closed, and the next load opens one.
                        last = event
                        continue
                    yield event
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                if last is None:
                    raise WorkerLost(f"{self.worker}: {type(exc).__name__}: {exc}") from exc
            if last is not None:
                yield last
        finally:
            self.close()

    def close(self) -> None:
        """Closing a stream before its end closes the connection: the worker sees the
        disconnect and stops the generation (a stream read to its end is back in the pool)."""
        self.response.close()


def candidates_for(
    *, slug: str, artifact_key: str, exclude: frozenset[str] | set[str] = frozenset(),
) -> list[registry.WorkerInfo]:
    """The live workers to try for the artifact, in order (reads the database at most once a
    second, so call it from the request's thread, not from a helper thread)."""
    candidates = registry.workers_for(slug=slug, artifact_key=artifact_key, exclude=exclude)
    if not candidates:
        registry.forget()
        candidates = registry.workers_for(slug=slug, artifact_key=artifact_key, exclude=exclude)
    return candidates


def open_stream(
    *, slug: str, artifact_key: str, body: dict[str, Any], timeout: float,
    exclude: frozenset[str] | set[str] = frozenset(),
    candidates: list[registry.WorkerInfo] | None = None,
) -> WorkerStream:
    """Start a generation on the best live worker for the artifact (failing over).

    ``candidates`` (from candidates_for) skips the registry lookup: with it this function
    touches no database and may run in any thread.

    Raises MarketplaceError: 503 no_worker (none live or none reachable), 429 busy (every
    worker's queue is full; Retry-After), 502 worker_refused (a worker rejected the request).
    """
    if candidates is None:
        candidates = candidates_for(slug=slug, artifact_key=artifact_key, exclude=exclude)
    busy = 0
    http = client()
    for worker in candidates:
        started = time.perf_counter()
        request = http.build_request(
            "POST", f"{worker.url}/v1/generate",
            json={"model": slug, "artifact_key": artifact_key, **body},
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_SECONDS, timeout)),
        )
        try:
            response = http.send(request, stream=True)
        except httpx.TransportError as exc:
            log.warning("GPU worker %s unreachable (%s); trying the next", worker.name, exc)
            registry.forget()
            continue
        if response.status_code == 200:
            return WorkerStream(worker, response, time.perf_counter() - started)
        try:
            detail = json.loads(response.read() or b"{}").get("error") or {}
        except (ValueError, httpx.TransportError):
            detail = {}
        finally:
            response.close()
        if response.status_code == 429:
            busy += 1
            continue
        log.error("GPU worker %s refused a load: %s %s", worker.name, response.status_code,
                  detail)
        raise MarketplaceError(
            code="worker_refused", message="The GPU worker refused this request; not charged.",
            status=502,
        )
    if busy:
        raise MarketplaceError(
            code="busy", message="Every GPU worker of this model is busy; retry shortly.",
            status=429, retry_after_seconds=BUSY_RETRY_AFTER_SECONDS,
        )
    raise MarketplaceError(
        code="no_worker", message="No GPU worker of this model is available; not charged.",
        status=503, retry_after_seconds=NO_WORKER_RETRY_AFTER_SECONDS,
    )
