"""Which GPU workers are live, where they are, and which one serves a given artifact.

A GPU worker announces itself in the database (GpuWorker: its URL, model slugs, the artifact
keys it holds in memory, its in-flight count) every GPU_WORKER_HEARTBEAT_SECONDS and deletes
its row on a clean shutdown. The web reads the live rows (heartbeat fresher than
GPU_WORKER_STALE_SECONDS, cached for a second per process) and ranks them per request:
workers holding the artifact in memory first, then by rendezvous (highest-random-weight)
hashing of (artifact key, worker name), so one artifact keeps landing on the same worker while
it lives, and only the artifacts of a worker that leaves move. The caller tries them in order.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from marketplace.models import GpuWorker

LIVE_CACHE_SECONDS = 1.0

_cache_lock = threading.Lock()
_cache: dict[str, object] = {"at": 0.0, "workers": None}


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    url: str
    model_slugs: tuple[str, ...]
    hot_keys: frozenset[str]
    in_flight: int


def worker_secret() -> str:
    """The bearer token between the web and GPU workers: GPU_WORKER_SECRET, or derived from
    SECRET_KEY (HMAC), so both sides agree when they share SECRET_KEY."""
    if settings.GPU_WORKER_SECRET:
        return str(settings.GPU_WORKER_SECRET)
    return hmac.new(
        settings.SECRET_KEY.encode(), b"kvmarket gpu-worker endpoint", hashlib.sha256
    ).hexdigest()


# --- the worker's side -----------------------------------------------------------------------


def announce(
    *, name: str, url: str, model_slugs: list[str], hot_keys: list[str], in_flight: int,
    started_at: object,
) -> None:
    """Create or refresh this worker's row (its heartbeat)."""
    GpuWorker.objects.update_or_create(
        name=name,
        defaults={
            "url": url, "model_slugs": model_slugs, "hot_keys": hot_keys,
            "in_flight": in_flight, "started_at": started_at, "heartbeat_at": timezone.now(),
        },
    )


def withdraw(*, name: str) -> None:
    GpuWorker.objects.filter(name=name).delete()


# --- the web's side --------------------------------------------------------------------------


def live_workers() -> list[WorkerInfo]:
    """Workers with a fresh heartbeat, read at most once a second per process."""
    now = time.monotonic()
    with _cache_lock:
        cached = _cache["workers"]
        if cached is not None and now - float(_cache["at"]) < LIVE_CACHE_SECONDS:
            return cached  # type: ignore[return-value]
    cutoff = timezone.now() - timedelta(seconds=float(settings.GPU_WORKER_STALE_SECONDS))
    workers = [
        WorkerInfo(
            name=w.name, url=w.url, model_slugs=tuple(w.model_slugs or ()),
            hot_keys=frozenset(w.hot_keys or ()), in_flight=w.in_flight,
        )
        for w in GpuWorker.objects.filter(heartbeat_at__gte=cutoff)
    ]
    with _cache_lock:
        _cache["at"] = time.monotonic()
        _cache["workers"] = workers
    return workers


def forget() -> None:
    """Read the registry again on the next request (a worker did not answer)."""
    with _cache_lock:
        _cache["at"] = 0.0
        _cache["workers"] = None


def rendezvous_weight(key: str, name: str) -> bytes:
    return hashlib.sha256(f"{key}\x00{name}".encode()).digest()


def rank(workers: list[WorkerInfo], *, slug: str, artifact_key: str) -> list[WorkerInfo]:
    """The live workers of the model, in the order to try them for this artifact."""
    serving = [w for w in workers if slug in w.model_slugs]
    return sorted(
        serving,
        key=lambda w: (artifact_key not in w.hot_keys, _negated(rendezvous_weight(artifact_key,
                                                                                  w.name))),
    )


def _negated(weight: bytes) -> bytes:
    """Sorts the highest weight first."""
    return bytes(255 - b for b in weight)


def workers_for(*, slug: str, artifact_key: str, exclude: set[str] | frozenset[str] = frozenset()
                ) -> list[WorkerInfo]:
    return [w for w in rank(live_workers(), slug=slug, artifact_key=artifact_key)
            if w.name not in exclude]
