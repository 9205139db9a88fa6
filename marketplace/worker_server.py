"""A GPU worker's internal HTTP endpoint for loads: the web calls it directly, not through Celery.

It runs inside the Celery worker process that owns the model and the KV store (so KV held in
GPU or pinned host memory is served from where it lives): a plain ASGI app served by uvicorn
in a thread, started when the worker is ready (worker_ready) if the worker consumes a model's
queue ``gpu.<slug>``, and stopped at its shutdown. Use the solo or threads pool for GPU
workers: the endpoint and precomputes share the worker's main process.

    POST /v1/generate   {"model": slug, "artifact_key": key, "load": id, "messages" | "prompt",
                          "max_tokens", "temperature", "top_p", "seed", "stop"}
                        -> 200 application/x-ndjson, one JSON object a line, as the engine
                           makes them: {"type": "delta", "text", "n" (tokens so far)}, ...,
                           then {"type": "final", "text", "finish_reason", "usage", "timings",
                           "worker", "batch"} or {"type": "error", "code", "message"}
                        -> 401 without the shared secret, 429 {"error": {"code": "busy"}}
                           when the worker's queue is full, 400/404 for a bad body or model
    GET  /healthz       {"worker", "models", "in_flight"} (no secret needed)

Every request but /healthz carries ``Authorization: Bearer <secret>`` (registry.worker_secret),
compared in constant time: an open endpoint would serve loads that no license paid for. It
never touches the database or money; the web reserves and charges. A client that disconnects
cancels its generation at the next engine step. The worker announces itself in the registry
(marketplace.registry) every GPU_WORKER_HEARTBEAT_SECONDS while the endpoint runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import socket
import threading
import time
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from inference import SAMPLING_DEFAULTS
from marketplace import engine, registry

log = logging.getLogger(__name__)

# The suffix and the engine's sampling parameters: what a load request passes on.
GENERATION_FIELDS = ("messages", "prompt", *SAMPLING_DEFAULTS)
BUSY_RETRY_AFTER_SECONDS = 1


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _send_json(send: Any, status: int, data: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": payload})


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class WorkerApp:
    """The ASGI app. ``name`` is reported in every final line (the Load records it)."""

    def __init__(self, *, name: str, model_slugs: list[str], secret: str,
                 scheduler: engine.Scheduler) -> None:
        self.name = name
        self.model_slugs = list(model_slugs)
        self._secret = secret.encode()
        self.scheduler = scheduler
        self._relay: EventRelay | None = None

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token, self._secret)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/healthz" and method == "GET":
            await _send_json(send, 200, {"worker": self.name, "models": self.model_slugs,
                                         "in_flight": self.scheduler.in_flight()})
            return
        if path != "/v1/generate":
            await _send_json(send, 404, _error("not_found", "Not found."))
            return
        if method != "POST":
            await _send_json(send, 405, _error("method_not_allowed", "Use POST."))
            return
        if not self._authorized(scope):
            await _send_json(send, 401, _error("unauthorized", "A valid worker secret is needed."))
            return
        try:
            body = json.loads(await _read_body(receive))
            slug, key = body["model"], body["artifact_key"]
            if not isinstance(slug, str) or not isinstance(key, str):
                raise TypeError("model and artifact_key must be strings")
        except ConnectionError:
            return
        except (ValueError, KeyError, TypeError) as exc:
            await _send_json(send, 400, _error("bad_request", f"Invalid body: {exc}"))
            return
        if slug not in self.model_slugs:
            await _send_json(send, 404, _error("unknown_model", f"No model {slug!r} here."))
            return
        await self._generate(slug, key, body, receive, send)

    async def _generate(self, slug: str, key: str, body: dict[str, Any], receive: Any,
                        send: Any) -> None:
        relay = self._relay_for(asyncio.get_running_loop())
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        request = {k: body[k] for k in GENERATION_FIELDS if body.get(k) is not None}
        job = engine.Job(slug=slug, artifact_key=key, request=request,
                         emit=functools.partial(relay.emit, events))
        try:
            self.scheduler.submit(job)
        except engine.Busy as exc:
            await _send_json(send, 429, _error("busy", str(exc)),
                             [(b"retry-after", str(BUSY_RETRY_AFTER_SECONDS).encode())])
            return

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            events.put_nowait({"type": "disconnected"})

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
            ]})
            while True:
                ready = [await events.get()]
                while not events.empty():  # events that came together go out in one write
                    ready.append(events.get_nowait())
                lines, last = [], False
                for event in ready:
                    kind = event["type"]
                    if kind == "disconnected":
                        return
                    if kind == "final":
                        event["worker"] = self.name
                    lines.append(json.dumps(event, separators=(",", ":")).encode() + b"\n")
                    if kind in ("final", "error"):
                        last = True
                        break
                await send({"type": "http.response.body", "body": b"".join(lines),
                            "more_body": not last})
                if last:
                    return
        except OSError:  # the client went away while we wrote
            job.cancel()
        finally:
            job.cancel()  # a no-op once the job ended; stops it when this handler is cut short
            watcher.cancel()

    def _relay_for(self, loop: asyncio.AbstractEventLoop) -> EventRelay:
        if self._relay is None or self._relay.loop is not loop:
            self._relay = EventRelay(loop)
        return self._relay


class EventRelay:
    """Engine events to their requests' queues on the event loop. A batched step emits an event
    per row from the engine thread; the loop is woken once for all that arrive before it runs
    (a wake-up is a write to its self-pipe, and both threads share the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, dict[str, Any]]] = []

    def emit(self, queue: asyncio.Queue, event: dict[str, Any]) -> None:
        """Called from the engine thread."""
        with self._lock:
            wake = not self._pending
            self._pending.append((queue, event))
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class WorkerServer:
    """uvicorn serving WorkerApp in a daemon thread, plus the registry heartbeat."""

    def __init__(self, *, name: str, model_slugs: list[str], host: str, port: int,
                 advertise_url: str = "") -> None:
        import uvicorn

        self.name = name
        self.model_slugs = model_slugs
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections of such a socket, and
        # without it a token's write waits behind the previous one for the web's delayed ACK.
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        if advertise_url:
            self.url = advertise_url.rstrip("/")
        else:
            shown = socket.gethostbyname(socket.gethostname()) if host in ("0.0.0.0", "::") \
                else host
            self.url = f"http://{shown}:{self.port}"
        self.app = WorkerApp(name=name, model_slugs=model_slugs, secret=registry.worker_secret(),
                             scheduler=engine.scheduler())
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            timeout_keep_alive=75, loop="asyncio",
            # httptools parses in C: half the endpoint's CPU per load of the pure-Python h11.
            http="httptools",
        )
        self.server = uvicorn.Server(config)
        self.started_at = timezone.now()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, *, heartbeat: bool = True) -> None:
        serve = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                 name="gpu-worker-http", daemon=True)
        serve.start()
        self._threads.append(serve)
        if heartbeat:
            beat = threading.Thread(target=self._heartbeat, name="gpu-worker-registry",
                                    daemon=True)
            beat.start()
            self._threads.append(beat)
        log.info("GPU worker %s serves loads at %s (models: %s)", self.name, self.url,
                 ", ".join(self.model_slugs))

    def wait_started(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.server.started and time.monotonic() < deadline:
            self._stop.wait(0.02)
        return bool(self.server.started)

    def announce(self) -> None:
        registry.announce(
            name=self.name, url=self.url, model_slugs=self.model_slugs,
            hot_keys=engine.hot_keys(), in_flight=self.app.scheduler.in_flight(),
            started_at=self.started_at,
        )

    def _heartbeat(self) -> None:
        interval = float(settings.GPU_WORKER_HEARTBEAT_SECONDS)
        while not self._stop.is_set():
            try:
                close_old_connections()
                self.announce()
            except Exception:  # noqa: BLE001 - the next beat tries again
                log.warning("GPU worker %s: heartbeat failed", self.name, exc_info=True)
                with contextlib.suppress(Exception):
                    connection.close()
            self._stop.wait(interval)
        with contextlib.suppress(Exception):
            connection.close()

    def stop(self) -> None:
        """Leave the registry first (no new requests), then let uvicorn finish its streams."""
        self._stop.set()
        with contextlib.suppress(Exception):
            registry.withdraw(name=self.name)
        self.server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self.sock.close()


_server: WorkerServer | None = None


def start_for_worker(*, name: str, model_slugs: list[str]) -> WorkerServer | None:
    """Start this process's endpoint (once) for the models this worker serves."""
    global _server
    if _server is not None or not model_slugs:
        return _server
    for slug in model_slugs:  # loaded before the worker is announced: no request waits on it
        engine.get_loaded(slug)
    server = WorkerServer(
        name=name, model_slugs=model_slugs, host=settings.GPU_WORKER_BIND_HOST,
        port=int(settings.GPU_WORKER_PORT), advertise_url=settings.GPU_WORKER_ADVERTISE_URL,
    )
    server.start()
    server.wait_started()
    _server = server
    return server


def stop_for_worker() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None
