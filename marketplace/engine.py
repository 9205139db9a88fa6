"""The one place Django code calls the inference engine.

Worker processes (and the web process, for KV downloads) share process-wide singletons built
from settings: one KVStore over settings.KV_STORE_DIR and one loaded model per registry slug
(inference.get_model caches models itself). Everything returned from here is plain JSON-able
data so Celery can carry it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

_lock = threading.Lock()
_store = None


class UnknownModel(LookupError):
    pass


def model_config(slug: str) -> dict[str, Any]:
    try:
        return settings.KVMARKET_MODELS[slug]
    except KeyError:
        raise UnknownModel(f"Unknown model {slug!r}.") from None


def get_store():  # noqa: ANN201 - inference.KVStore
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


def get_loaded(slug: str):  # noqa: ANN201 - inference.LoadedModel
    import inference

    cfg = model_config(slug)
    return inference.get_model(
        cfg["ref"], dtype=cfg.get("dtype", "float32"), device=cfg.get("device", "cpu"),
        cache_dir=settings.MODEL_CACHE_DIR,
    )


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
    """Continue from the artifact. Returns the text, its streaming deltas, usage and timings.

    With settings.COMPLETION_BATCH_WINDOW_MS > 0 (a GPU worker running a thread pool), requests
    for the same artifact that arrive within that window run as one batch (see _Batcher).
    """
    import inference

    loaded = get_loaded(slug)
    store = get_store()
    request = dict(messages=messages, prompt=prompt, max_tokens=max_tokens,
                   temperature=temperature, top_p=top_p, seed=seed, stop=stop or None)
    window_ms = float(getattr(settings, "COMPLETION_BATCH_WINDOW_MS", 0) or 0)
    if window_ms > 0:
        final = batcher.submit(loaded, store, artifact_key, request, window_s=window_ms / 1000)
        return _result(final, [final.text] if final.text else [])
    deltas: list[str] = []
    final = None
    for item in inference.generate_stream(loaded, store, artifact_key, **request):
        if isinstance(item, str):
            if item:
                deltas.append(item)
        else:
            final = item
    if final is None:  # pragma: no cover - the engine always ends with a Generation
        raise RuntimeError("The engine's stream ended without a final result.")
    return _result(final, deltas)


def _result(final: Any, deltas: list[str]) -> dict[str, Any]:
    return {
        "text": final.text,
        "deltas": deltas,
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
        },
    }


class _Batcher:
    """Gathers concurrent completions of one artifact for a short window into one batch.

    The first request of an artifact waits the window, then runs every request that joined it
    through inference.generate_batch (one batched forward per step on the GPU fast path) and
    hands each thread its own Generation. If the batch fails as a whole (say one request is
    invalid), each request runs alone, so one bad request cannot fail the others.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, str], list[_Pending]] = {}
        self.batches = 0  # batches run, and requests served through them (for metrics/tests)
        self.requests = 0

    def submit(self, loaded: Any, store: Any, key: str, request: dict[str, Any], *,
               window_s: float) -> Any:
        import inference

        mine = _Pending(request)
        group = (id(loaded), key)
        with self._lock:
            queue = self._waiting.setdefault(group, [])
            queue.append(mine)
            leader = len(queue) == 1
        if leader:
            time.sleep(window_s)
            with self._lock:
                batch = self._waiting.pop(group)
                self.batches += 1
                self.requests += len(batch)
            try:
                finals = inference.generate_batch(loaded, store, key, [p.request for p in batch])
                for pending, final in zip(batch, finals, strict=True):
                    pending.result = final
            except Exception:
                for pending in batch:
                    try:
                        pending.result = inference.generate(loaded, store, key, **pending.request)
                    except Exception as exc:
                        pending.result = exc
            for pending in batch:
                pending.done.set()
        mine.done.wait()
        if isinstance(mine.result, BaseException):
            raise mine.result
        return mine.result


class _Pending:
    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.result: Any = None
        self.done = threading.Event()


batcher = _Batcher()


def artifact_path(artifact_key: str):  # noqa: ANN201 - pathlib.Path | None
    """The artifact's file on local disk (None when this process's store does not have it)."""
    store = get_store()
    if not store.contains(artifact_key):
        return None
    return store.path(artifact_key)


def delete_artifact(artifact_key: str) -> None:
    store = get_store()
    if store.contains(artifact_key):
        store.delete(artifact_key)
