"""Routing completions to GPU workers.

A worker loads the models it serves when it starts (worker_ready), and runs each CUDA model's
fast path once, so model loading and kernel compiles do not land on the first request.

Every worker also consumes a direct queue of its own, ``worker.<hostname>`` (added at start-up
by the celeryd_after_setup handler below). To send a completion for an artifact we list the
live workers that consume the model's queue ``gpu.<slug>`` (``inspect().active_queues()``,
cached for a few seconds) and pick one by rendezvous (highest-random-weight) hashing of
(artifact key, worker hostname): the same artifact always lands on the same worker while it is
alive, so its KV stays hot in that worker's GPU/host tier, and when a worker joins or leaves
only the artifacts it owned move. With no worker information (no reply, a broker without
broadcast, or an eager test setup) the task goes to the shared ``gpu.<slug>`` queue, which
any worker of the model consumes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable

from celery.signals import celeryd_after_setup, worker_ready
from django.conf import settings

from kvmarket.celery import app, gpu_queue_name

log = logging.getLogger(__name__)

DIRECT_QUEUE_PREFIX = "worker."
WORKERS_CACHE_SECONDS = 10.0
INSPECT_TIMEOUT_SECONDS = 0.5

_cache_lock = threading.Lock()
_cache: dict[str, object] = {"at": 0.0, "queues": None}


def direct_queue_name(hostname: str) -> str:
    return f"{DIRECT_QUEUE_PREFIX}{hostname}"


@celeryd_after_setup.connect(weak=False)
def add_direct_queue(sender: str, instance, **_: object) -> None:  # noqa: ANN001
    """Each worker consumes ``worker.<its hostname>`` besides the queues given with -Q."""
    instance.app.amqp.queues.select_add(direct_queue_name(sender))


def models_served(queue_names: Iterable[str]) -> list[str]:
    """Slugs of the models whose ``gpu.<slug>`` queue is among queue_names."""
    names = set(queue_names)
    return sorted(slug for slug in settings.KVMARKET_MODELS if gpu_queue_name(slug) in names)


def cuda_models_served(queue_names: Iterable[str]) -> list[str]:
    """Slugs of the CUDA models whose ``gpu.<slug>`` queue is among queue_names."""
    from marketplace.engine import runs_on_cuda

    return [slug for slug in models_served(queue_names) if runs_on_cuda(slug)]


@worker_ready.connect(weak=False)
def prepare_models(sender, **_: object) -> None:  # noqa: ANN001 - a celery Consumer
    """Load every model this worker serves before it takes a task, and run each CUDA model's
    fast path once: loading (a GGUF model's first start also converts it), Triton's kernel
    compiles and cuBLAS's choices take seconds that an agent should not wait for. The worker
    answers inspect() only after this returns, so a model counts as ready once a worker
    serving it is listed. A failure is logged; the first task then pays (or reports it)."""
    import inference
    from marketplace.engine import get_loaded, get_store, runs_on_cuda

    served = models_served(sender.app.amqp.queues.consume_from)
    cuda = [slug for slug in served if runs_on_cuda(slug)]
    if cuda:  # reads from disk land in memory pinned now, not pinned per document
        try:
            arena = get_store().pin_host_memory()
            log.info("Pinned %s bytes of host memory for KV reads.", arena and arena.nbytes)
        except Exception:  # noqa: BLE001 - reads then pin their own buffers, as before
            log.exception("Pinning host memory failed.")
    for slug in served:
        started = time.monotonic()
        try:
            loaded = get_loaded(slug)
            report = inference.warm_up(loaded) if slug in cuda else None
        except Exception:  # noqa: BLE001 - the worker still starts; tasks report the error
            log.exception("Loading model %s failed.", slug)
            continue
        log.info("Model %s ready in %.1f s (warm-up: %s)", slug, time.monotonic() - started,
                 report)
    if cuda:  # start-up is over: its garbage collected, its survivors frozen
        inference.freeze_startup_heap()


def _active_queues() -> dict[str, list[str]] | None:
    """{hostname: [queue names]} of live workers, cached for WORKERS_CACHE_SECONDS."""
    now = time.monotonic()
    with _cache_lock:
        if _cache["queues"] is not None and now - float(_cache["at"]) < WORKERS_CACHE_SECONDS:
            return _cache["queues"]  # type: ignore[return-value]
    try:
        replies = app.control.inspect(timeout=INSPECT_TIMEOUT_SECONDS).active_queues() or {}
    except Exception:  # noqa: BLE001 - no broadcast on this broker, or the broker is down
        log.info("Could not list workers; using shared queues.", exc_info=True)
        replies = {}
    queues = {host: [q.get("name", "") for q in qs or []] for host, qs in replies.items()}
    with _cache_lock:
        _cache["at"] = time.monotonic()
        _cache["queues"] = queues
    return queues


def forget_workers() -> None:
    with _cache_lock:
        _cache["at"] = 0.0
        _cache["queues"] = None


def workers_for_model(slug: str) -> list[str]:
    """Hostnames of live workers consuming ``gpu.<slug>`` that also have their direct queue."""
    shared = gpu_queue_name(slug)
    queues = _active_queues() or {}
    return sorted(
        host for host, names in queues.items()
        if shared in names and direct_queue_name(host) in names
    )


def rendezvous_pick(key: str, hosts: list[str]) -> str | None:
    """Highest-random-weight choice: stable per key, minimal movement when hosts change."""
    if not hosts:
        return None
    return max(hosts, key=lambda h: hashlib.sha256(f"{key}\x00{h}".encode()).digest())


def completion_queue(slug: str, artifact_key: str) -> tuple[str, str | None]:
    """(queue name, chosen hostname or None) for a completion on this artifact."""
    host = rendezvous_pick(artifact_key, workers_for_model(slug))
    if host is None:
        return gpu_queue_name(slug), None
    return direct_queue_name(host), host
