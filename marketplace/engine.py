"""The one place Django code calls the inference engine.

Worker processes (and the web process, for KV downloads) share process-wide singletons built
from settings: one KVStore over settings.KV_STORE_DIR and one loaded model per registry slug
(inference.get_model caches models itself), and in a GPU worker the Scheduler that runs the
loads its HTTP endpoint receives. Everything returned from here is plain JSON-able data.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_store = None


class UnknownModel(LookupError):
    pass


def model_config(slug: str) -> dict[str, Any]:
    try:
        return settings.KVMARKET_MODELS[slug]
    except KeyError:
        raise UnknownModel(f"Unknown model {slug!r}.") from None


def get_store():
    """The process-wide KV store (disk tier under settings.KV_STORE_DIR, plus host/GPU tiers)."""
    global _store
    if _store is None:
        with _lock:
            if _store is None:
                import inference

                s3 = None
                if getattr(settings, "KV_S3_BUCKET", ""):
                    s3 = inference.S3Config(
                        bucket=settings.KV_S3_BUCKET,
                        endpoint_url=settings.KV_S3_ENDPOINT_URL or None,
                    )
                settings.KV_STORE_DIR.mkdir(parents=True, exist_ok=True)
                kwargs: dict[str, Any] = {"host_bytes": settings.KV_STORE_HOST_BYTES}
                if _cuda_wanted():
                    kwargs["gpu_bytes"] = settings.KV_STORE_GPU_BYTES
                if s3 is not None:
                    kwargs["s3"] = s3
                _store = inference.KVStore(settings.KV_STORE_DIR, **kwargs)
    return _store


def reset_store() -> None:
    """Forget the process-wide store (tests that change KV_STORE_DIR)."""
    global _store
    with _lock:
        _store = None


def runs_on_cuda(slug: str) -> bool:
    return str(model_config(slug).get("device", "cpu")).startswith("cuda")


def _cuda_wanted() -> bool:
    return any(runs_on_cuda(slug) for slug in settings.KVMARKET_MODELS)


def get_loaded(slug: str):
    import inference

    cfg = model_config(slug)
    return inference.get_model(
        cfg["ref"], dtype=cfg.get("dtype", "float32"), device=cfg.get("device", "cpu"),
        cache_dir=settings.MODEL_CACHE_DIR,
    )


def cpu_threads() -> int:
    """Torch's CPU threads for a worker that runs a model on the CPU: GPU_WORKER_CPU_THREADS,
    or every CPU this process may use but one (at least one), left to whatever shares the host
    (the web, the database)."""
    configured = int(settings.GPU_WORKER_CPU_THREADS)
    if configured > 0:
        return configured
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (usable or 1) - 1)


def limit_cpu_threads() -> int:
    """Set torch's CPU threads in this process to cpu_threads(); returns the number."""
    import torch

    threads = cpu_threads()
    torch.set_num_threads(threads)
    return threads


# When a model's tokenizer last failed to load here: every completion asks for it, and a web
# box without the model files must not retry the load (and log it) on each request.
TOKEN_COUNTER_RETRY_SECONDS = 60.0
_no_token_counter: dict[str, float] = {}


def token_counter(slug: str):
    """The model's tokenizer and context length without its weights (inference.tokenizer), or
    None where this process cannot load them (e.g. weights only the GPU workers have): the
    worker still checks exactly."""
    from inference.tokenizer import get_token_counter

    failed_at = _no_token_counter.get(slug)
    if failed_at is not None and time.monotonic() - failed_at < TOKEN_COUNTER_RETRY_SECONDS:
        return None
    try:
        return get_token_counter(model_config(slug)["ref"], cache_dir=settings.MODEL_CACHE_DIR)
    except Exception:  # noqa: BLE001 - any failure only skips an early check
        _no_token_counter[slug] = time.monotonic()
        log.warning("No tokenizer for %s here; context length not checked", slug, exc_info=True)
        return None


def precompute(
    *,
    slug: str,
    text: str,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Prefill ``text`` into a KV artifact (atomic write, content-addressed), then verify it."""
    import inference

    loaded = get_loaded(slug)
    store = get_store()
    result = inference.precompute(
        loaded, text, store=store, progress=progress, should_cancel=should_cancel
    )
    verification = inference.read_verification(store, result.key) if result.reused else None
    if verification is None:
        verification = inference.verify(loaded, store, result.key)
    return {
        "key": result.key,
        "n_tokens": int(result.n_tokens),
        "seconds": float(result.seconds),
        "bytes": int(result.bytes),
        "flops": float(result.flops),
        "reused": bool(result.reused),
        "verification": _report_dict(verification),
    }


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if isinstance(report, dict):
        return report
    return report.to_dict()


def generate(
    *,
    slug: str,
    artifact_key: str,
    messages: list[dict[str, Any]] | None = None,
    prompt: str | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> dict[str, Any]:
    """Continue from the artifact in this thread (no scheduler). Returns the text, its deltas,
    usage and timings. The worker's HTTP endpoint goes through `scheduler` instead."""
    import inference

    loaded = get_loaded(slug)
    store = get_store()
    deltas: list[str] = []
    final = None
    for item in inference.generate_stream(
        loaded, store, artifact_key, messages=messages, prompt=prompt, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, seed=seed, stop=stop or None,
    ):
        if isinstance(item, str):
            if item:
                deltas.append(item)
        else:
            final = item
    if final is None:  # pragma: no cover - the engine always ends with a Generation
        raise RuntimeError("The engine's stream ended without a final result.")
    return {**result_dict(final), "deltas": deltas}


def result_dict(final: Any) -> dict[str, Any]:
    """An engine Generation as plain JSON-able data."""
    return {
        "text": final.text,
        "finish_reason": final.finish_reason,
        "usage": {
            "cached_tokens": int(final.usage.cached_tokens),
            "suffix_tokens": int(final.usage.suffix_tokens),
            "output_tokens": int(final.usage.output_tokens),
        },
        "timings": {
            "load_s": float(final.timings.load_s),
            "ttft_s": float(final.timings.ttft_s),
            "total_s": float(final.timings.total_s),
            "tier": str(getattr(final, "cache_tier", "") or ""),  # where the KV was read from
        },
    }


# --- the scheduler of a worker's loads -------------------------------------------------------


class Busy(Exception):
    """The worker's queue is full: the caller answers 429 and the client retries."""


class Job:
    """One load in a worker: its request, and where its events go.

    ``emit`` is called from the engine thread with each event (plain dicts: "delta" with the
    text and the tokens made so far, then "final" or "error"); ``cancel`` (the client went
    away) stops the generation at its next step.
    """

    def __init__(self, *, slug: str, artifact_key: str, request: dict[str, Any],
                 emit: Callable[[dict[str, Any]], None]) -> None:
        self.slug = slug
        self.artifact_key = artifact_key
        self.request = request
        self.emit = emit
        self.enqueued_at = time.perf_counter()
        self.queue_s = 0.0
        self.usage: Any = None  # inference.Usage, live while the job runs
        self.emitted_text = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def delta(self, text: str) -> bool:
        """Send a text delta; False when the job was cancelled (stop generating)."""
        if self.cancelled:
            return False
        if text:
            event: dict[str, Any] = {"type": "delta", "text": text, "n": 0}
            if self.usage is not None:
                event["n"] = int(self.usage.output_tokens)
                if not self.emitted_text:  # the first delta: what a stream cut short bills
                    event["usage"] = {"cached_tokens": int(self.usage.cached_tokens),
                                      "suffix_tokens": int(self.usage.suffix_tokens)}
            self.emitted_text = True
            self.emit(event)
        return True

    def final(self, generation: Any, *, batch: int) -> None:
        result = result_dict(generation)
        # Waited before the engine started on this request: in the queue, and (off the GPU
        # fast path, where a batch's rows run one after another) behind earlier rows.
        waited = time.perf_counter() - self.enqueued_at - float(generation.timings.total_s)
        result["timings"]["queue_s"] = round(max(self.queue_s, waited, 0.0), 6)
        self.emit({"type": "final", **result, "batch": batch})

    def error(self, code: str, message: str) -> None:
        self.emit({"type": "error", "code": code, "message": message})


class Scheduler:
    """Runs a worker's loads on its engine: one engine thread per model, dynamic batching.

    A request that finds its model's engine idle runs at once, alone. Requests that arrive
    while it is busy wait; when it is free again it takes the oldest waiting request and every
    other waiting request on the same artifact (up to ``max_batch``) and runs them as one batch
    (inference.generate_batch, every row streamed as its steps finish). No request waits for a
    batch to fill. At most ``max_queue`` requests wait per worker; beyond that submit raises
    Busy. Precomputes run in the Celery consumer's thread beside these engine threads; the
    engine's own locks guard the GPU.
    """

    def __init__(self, *, max_batch: int, max_queue: int) -> None:
        self.max_batch = max(1, max_batch)
        self.max_queue = max(1, max_queue)
        self._cond = threading.Condition()
        self._waiting: dict[str, list[Job]] = {}  # per model slug, oldest first
        self._running = 0
        self._threads: dict[str, threading.Thread] = {}
        self.batches = 0  # batches of more than one request run (for tests and metrics)

    def in_flight(self) -> int:
        with self._cond:
            return self._running + sum(len(q) for q in self._waiting.values())

    def submit(self, job: Job) -> None:
        with self._cond:
            waiting = sum(len(q) for q in self._waiting.values())
            if waiting >= self.max_queue:
                raise Busy(f"{waiting} requests are waiting on this worker")
            self._waiting.setdefault(job.slug, []).append(job)
            if job.slug not in self._threads:
                thread = threading.Thread(
                    target=self._run, args=(job.slug,), name=f"engine-{job.slug}", daemon=True
                )
                self._threads[job.slug] = thread
                thread.start()
            self._cond.notify_all()

    def _next_batch(self, slug: str) -> list[Job]:
        with self._cond:
            while True:
                queue = self._waiting.setdefault(slug, [])
                queue[:] = [j for j in queue if not j.cancelled]  # their clients went away
                if queue:
                    break
                self._cond.wait()
            key = queue[0].artifact_key
            batch = [j for j in queue if j.artifact_key == key][: self.max_batch]
            chosen = {id(j) for j in batch}
            queue[:] = [j for j in queue if id(j) not in chosen]
            self._running += len(batch)
            return batch

    def _run(self, slug: str) -> None:
        while True:
            batch = self._next_batch(slug)
            now = time.perf_counter()
            for job in batch:
                job.queue_s = now - job.enqueued_at
            try:
                if len(batch) == 1:
                    self._run_one(batch[0])
                else:
                    self._run_batch(batch)
            except Exception:  # noqa: BLE001 - the engine thread must survive any request
                log.exception("Engine thread %s: a batch failed", slug)
                for job in batch:
                    job.error("generation_failed", "The worker failed to run this completion.")
            finally:
                with self._cond:
                    self._running -= len(batch)

    def _run_one(self, job: Job) -> None:
        import inference
        from inference.errors import KVError

        def observe(usage: Any) -> None:
            job.usage = usage

        stream = None
        try:
            stream = inference.generate_stream(
                get_loaded(job.slug), get_store(), job.artifact_key, **job.request,
                observe=observe,
            )
            for item in stream:
                if isinstance(item, str):
                    if not job.delta(item):
                        return  # cancelled: closing the stream below frees the engine
                else:
                    job.final(item, batch=1)
        except KVError as exc:
            job.error(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - reported to this request only
            log.exception("Completion failed")
            job.error("generation_failed", f"{type(exc).__name__}: {exc}"[:500])
        finally:
            if stream is not None:
                stream.close()

    def _run_batch(self, batch: list[Job]) -> None:
        import inference

        usages: list[Any] = [None] * len(batch)
        done = [False] * len(batch)

        def on_item(row: int, item: Any) -> bool:
            job = batch[row]
            if job.usage is None:
                job.usage = usages[row]
            if isinstance(item, str):
                return job.delta(item)
            done[row] = True
            job.final(item, batch=len(batch))
            return True

        with self._cond:
            self.batches += 1
        try:
            inference.generate_batch(
                get_loaded(batch[0].slug), get_store(), batch[0].artifact_key,
                [j.request for j in batch], on_item=on_item, usages=usages,
            )
        except Exception:  # noqa: BLE001 - e.g. one invalid request: run the others alone
            for row, job in enumerate(batch):
                if done[row] or job.cancelled:
                    continue
                if job.emitted_text:
                    job.error("generation_failed", "The batch this completion ran in failed.")
                else:
                    job.usage = None
                    self._run_one(job)


_scheduler: Scheduler | None = None


def scheduler() -> Scheduler:
    """This process's scheduler (a GPU worker's HTTP endpoint submits its loads to it)."""
    global _scheduler
    if _scheduler is None:
        with _lock:
            if _scheduler is None:
                _scheduler = Scheduler(
                    max_batch=int(settings.GPU_WORKER_MAX_BATCH),
                    max_queue=int(settings.GPU_WORKER_MAX_QUEUE),
                )
    return _scheduler


def hot_keys(limit: int = 1000) -> list[str]:
    """Artifact keys this process holds in GPU or pinned host memory."""
    if _store is None:
        return []
    return _store.memory_keys()[:limit]


def artifact_path(artifact_key: str):
    """The artifact's file on local disk (None when this process's store does not have it)."""
    store = get_store()
    if not store.contains(artifact_key):
        return None
    return store.path(artifact_key)


def delete_artifact(artifact_key: str) -> None:
    store = get_store()
    if store.contains(artifact_key):
        store.delete(artifact_key)
