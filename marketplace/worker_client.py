"""The web's side of the direct channel to GPU workers: route, send, stream events.

HTTP/1.1 over the standard library's ``http.client``, with the process's idle keep-alive
connections kept per worker (no TCP or HTTP set-up per load). ``open_stream`` sends the load's
request to the first live worker of the model in the registry's order for the artifact
(marketplace.registry) that can be reached, and returns at once: the worker's answer is read
when the stream is first iterated (or by ``head()``). The request's thread can therefore send
the generation, reserve the load while the engine prefills, and then read the first token,
without a helper thread. A worker that answers busy is skipped for the next one (``eager``
reads the answer before returning; a lazy stream raises WorkerBusy and the caller moves on).
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from marketplace import registry
from marketplace.services.errors import MarketplaceError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 2.0
# An idle connection is dropped after this; the worker keeps them longer (75 s), so the web is
# the side that closes and never sends on a connection the worker is closing.
IDLE_SECONDS = 60.0
NO_WORKER_RETRY_AFTER_SECONDS = 5
BUSY_RETRY_AFTER_SECONDS = 1
# What a broken connection raises while a request is written or its answer read.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)


class WorkerLost(Exception):
    """The worker's stream broke (connection closed or reset) before its final event."""


class WorkerBusy(Exception):
    """The worker's queue is full (it answered 429): try the next worker."""


class Connections:
    """Idle keep-alive connections to the workers, by address (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[tuple[http.client.HTTPConnection, float]]] = {}

    def take(self, address: tuple[str, int]) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection to ``address`` (True) or a new one (False); OSError if the
        worker cannot be reached."""
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(address)
                conn, since = idle.pop() if idle else (None, 0.0)
            if conn is None:
                break
            if now - since < IDLE_SECONDS and _open_and_quiet(conn):
                return conn, True
            conn.close()
        conn = http.client.HTTPConnection(*address, timeout=CONNECT_TIMEOUT_SECONDS)
        conn.connect()
        # The request's head and body are two writes: without NODELAY the body may wait for
        # the head's ACK (Nagle), and so may each small write on a connection in use.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    def give(self, address: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(address, []).append((conn, time.monotonic()))

    def idle(self) -> list[http.client.HTTPConnection]:
        with self._lock:
            return [conn for conns in self._idle.values() for conn, _ in conns]

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()


def _open_and_quiet(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is usable when the worker has neither closed it nor sent anything
    (either makes it readable). poll(), not select(): a web process may hold fds over 1024."""
    if conn.sock is None:
        return False
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return not poller.poll(0)


_connections = Connections()


def connections() -> Connections:
    return _connections


def reset_client() -> None:
    """Close the idle connections (tests that change the secret or the timeout)."""
    _connections.clear()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class WorkerStream:
    """A generation sent to one worker: iterate for its events (dicts); close to stop it.

    The worker's answer (status and headers) is read on the first iteration or by ``head()``:
    WorkerBusy for 429, MarketplaceError worker_refused for another refusal, WorkerLost when
    the connection broke. ``connect_s`` is the time spent sending and waiting for that answer.
    """

    def __init__(self, worker: registry.WorkerInfo, body: bytes, timeout: float) -> None:
        self.worker = worker.name
        self.connect_s = 0.0
        self._address = _address(worker.url)
        self._body = body
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False
        self._response: http.client.HTTPResponse | None = None
        self._events = self._read()
        started = time.perf_counter()
        self._send()  # OSError when the worker cannot be reached
        self.connect_s = time.perf_counter() - started

    def _send(self) -> None:
        while True:
            self._conn, self._reused = _connections.take(self._address)
            try:
                self._conn.sock.settimeout(self._timeout)
                self._conn.request("POST", "/v1/generate", body=self._body, headers={
                    "Authorization": f"Bearer {registry.worker_secret()}",
                    "Content-Type": "application/json",
                })
                return
            except TRANSPORT_ERRORS:
                self.close()
                if not self._reused:  # an idle connection that broke: the next, or a new one
                    raise

    def head(self) -> None:
        """Read the worker's answer to the request, once."""
        if self._response is not None:
            return
        started = time.perf_counter()
        try:
            try:
                response = self._conn.getresponse()
            except TRANSPORT_ERRORS:
                if not self._reused:
                    raise
                # The worker closed the idle connection as the request went out (it restarted,
                # say): nothing was read on it, so the request is sent again on a new one.
                self.close()
                self._send()
                response = self._conn.getresponse()
        except TRANSPORT_ERRORS as exc:
            self.close()
            raise WorkerLost(f"{self.worker}: {type(exc).__name__}: {exc}") from exc
        finally:
            self.connect_s += time.perf_counter() - started
        self._response = response
        if response.status == 200:
            return
        try:
            detail = json.loads(response.read() or b"{}").get("error") or {}
        except (ValueError, *TRANSPORT_ERRORS):
            detail = {}
        self._finished()
        if response.status == 429:
            raise WorkerBusy(self.worker)
        log.error("GPU worker %s refused a load: %s %s", self.worker, response.status, detail)
        raise MarketplaceError(
            code="worker_refused", message="The GPU worker refused this request; not charged.",
            status=502,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One iterator for the stream's life: iterating again resumes where it stopped."""
        return self._events

    def _read(self) -> Iterator[dict[str, Any]]:
        self.head()
        last = None
        try:
            try:
                while line := self._response.readline():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") in ("final", "error"):
                        # The body ends with it (same write): read to its end before handing it
                        # over, so the connection goes back to the pool. A response closed
                        # before its end is a connection closed, and the next load opens one.
                        last = event
                        continue
                    yield event
                self._finished()
            except (*TRANSPORT_ERRORS, json.JSONDecodeError) as exc:
                if last is None:
                    raise WorkerLost(f"{self.worker}: {type(exc).__name__}: {exc}") from exc
            if last is not None:
                yield last
        finally:
            self.close()

    def _finished(self) -> None:
        """The answer was read to its end: its connection is idle again, unless it closes."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._response is not None and self._response.will_close:
            conn.close()
        else:
            _connections.give(self._address, conn)

    def close(self) -> None:
        """Closing a stream before its end closes the connection: the worker sees the
        disconnect and stops the generation (a stream read to its end is back in the pool)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def candidates_for(
    *, slug: str, artifact_key: str, exclude: frozenset[str] | set[str] = frozenset(),
) -> list[registry.WorkerInfo]:
    """The live workers to try for the artifact, in order (reads the database at most once a
    second)."""
    candidates = registry.workers_for(slug=slug, artifact_key=artifact_key, exclude=exclude)
    if not candidates:
        registry.forget()
        candidates = registry.workers_for(slug=slug, artifact_key=artifact_key, exclude=exclude)
    return candidates


def busy_error() -> MarketplaceError:
    return MarketplaceError(
        code="busy", message="Every GPU worker of this model is busy; retry shortly.",
        status=429, retry_after_seconds=BUSY_RETRY_AFTER_SECONDS,
    )


def open_stream(
    *, slug: str, artifact_key: str, body: dict[str, Any], timeout: float,
    exclude: frozenset[str] | set[str] = frozenset(), eager: bool = True,
) -> WorkerStream:
    """Send a generation to the best live worker for the artifact that can be reached.

    ``eager``: read its answer too, moving on to the next worker when one is busy. Otherwise
    return once the request is written; the answer is read when the stream is iterated.

    Raises MarketplaceError: 503 no_worker (none live or none reachable), 429 busy (every
    worker's queue is full; Retry-After), 502 worker_refused (a worker rejected the request).
    """
    payload = json.dumps({"model": slug, "artifact_key": artifact_key, **body},
                         separators=(",", ":")).encode()
    busy = 0
    for worker in candidates_for(slug=slug, artifact_key=artifact_key, exclude=exclude):
        try:
            stream = WorkerStream(worker, payload, timeout)
        except TRANSPORT_ERRORS as exc:
            log.warning("GPU worker %s unreachable (%s); trying the next", worker.name, exc)
            registry.forget()
            continue
        if not eager:
            return stream
        try:
            stream.head()
        except WorkerBusy:
            busy += 1
            continue
        except WorkerLost as exc:
            log.warning("GPU worker %s lost (%s); trying the next", worker.name, exc)
            registry.forget()
            continue
        return stream
    if busy:
        raise busy_error()
    raise MarketplaceError(
        code="no_worker", message="No GPU worker of this model is available; not charged.",
        status=503, retry_after_seconds=NO_WORKER_RETRY_AFTER_SECONDS,
    )
