"""GPU worker start-up and shutdown (Celery signals).

A worker that consumes a model's queue ``gpu.<slug>`` also serves that model's loads over its
internal HTTP endpoint (marketplace.worker_server), started once the worker is ready and
announced in the registry (marketplace.registry), which the web reads to route each load.

A worker loads every model it serves when it starts, before it announces itself, and runs
each CUDA model's fast path once, so model loading and kernel compiles do not land on the first
request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings

from marketplace.queues import gpu_queue_name

log = logging.getLogger(__name__)


def models_served(queue_names: Iterable[str]) -> list[str]:
    """Slugs of the models whose ``gpu.<slug>`` queue is among queue_names."""
    names = set(queue_names)
    return sorted(slug for slug in settings.KVMARKET_MODELS if gpu_queue_name(slug) in names)


def cuda_models_served(queue_names: Iterable[str]) -> list[str]:
    """Slugs of the CUDA models whose ``gpu.<slug>`` queue is among queue_names."""
    from marketplace.engine import runs_on_cuda

    return [slug for slug in models_served(queue_names) if runs_on_cuda(slug)]


@worker_ready.connect(weak=False)
def prepare_models(sender, **_: object) -> None:
    """Load every model this worker serves before it takes a task or announces itself, and
    run each CUDA model's fast path once: loading (a GGUF model's first start also converts
    it), Triton's kernel compiles and cuBLAS's choices take seconds that an agent should not
    wait for. A failure is logged; the first task then pays (or reports the error).

    A worker running a model on the CPU bounds torch's threads (engine.limit_cpu_threads): its
    default takes every core, and the web, the database and the clients on the same host then
    wait for one while the engine decodes."""
    import inference
    from marketplace import engine
    from marketplace.engine import get_loaded, get_store, runs_on_cuda

    served = models_served(sender.app.amqp.queues.consume_from)
    cuda = [slug for slug in served if runs_on_cuda(slug)]
    if len(cuda) < len(served):
        log.info("Torch runs on %s CPU threads in this worker.", engine.limit_cpu_threads())
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


@worker_ready.connect(weak=False)
def start_load_endpoint(sender, **_: object) -> None:
    """Serve this worker's models over HTTP (after prepare_models above: connected in order)."""
    from marketplace import worker_server

    slugs = models_served(sender.app.amqp.queues.consume_from)
    if not slugs:
        return
    try:
        worker_server.start_for_worker(name=sender.hostname, model_slugs=slugs)
    except Exception:  # noqa: BLE001 - the worker still runs precomputes
        log.exception("The load endpoint of %s did not start.", sender.hostname)


@worker_shutdown.connect(weak=False)
def stop_load_endpoint(**_: object) -> None:
    from marketplace import worker_server

    worker_server.stop_for_worker()
