"""Celery tasks (thin): precompute on the model's GPU queue, housekeeping.

GPU workers run ``celery -A kvmarket worker -Q gpu.<slug> --pool solo``. Completions do not go
through Celery: the web calls the worker's HTTP endpoint (marketplace.worker_server).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import shared_task

from marketplace import workers  # noqa: F401 - connects the GPU worker's start-up signals
from marketplace.queues import gpu_queue_name
from marketplace.services import documents as document_services

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.5
CANCEL_CHECK_INTERVAL_SECONDS = 2.0


def enqueue_precompute(*, document_id: int, model_slug: str) -> str:
    result = precompute_document.apply_async(
        args=[document_id], queue=gpu_queue_name(model_slug)
    )
    return result.id


@shared_task(
    name="marketplace.tasks.precompute_document",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def precompute_document(self, document_id: int) -> dict[str, Any] | None:
    """Prefill a document's KV, verify it, record it on the Document.

    Idempotent: a ready document is skipped, and the artifact is content-addressed, so a
    redelivered or repeated task (same text, same model) finds the existing artifact instead of
    computing it again. The engine writes the artifact to a temp file and renames it, so a
    worker killed mid-way leaves nothing partial; acks_late + reject_on_worker_lost make the
    broker redeliver the task to another worker.
    """
    from inference.errors import KVError

    if document_services.precompute_alive_elsewhere(document_id=document_id):
        log.info("Precompute of document %s runs on a live worker; duplicate %s skipped",
                 document_id, self.request.id)
        return None
    document = document_services.start_precompute(
        document_id=document_id, task_id=self.request.id or ""
    )
    if document is None:
        return None
    last = {"progress": 0.0, "cancel": time.monotonic(), "cancelled": False}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last["progress"] >= PROGRESS_INTERVAL_SECONDS:
            last["progress"] = now
            document_services.record_progress(
                document_id=document_id, tokens_done=done, tokens_total=total
            )

    def should_cancel() -> bool:
        now = time.monotonic()
        if now - last["cancel"] >= CANCEL_CHECK_INTERVAL_SECONDS:
            last["cancel"] = now
            last["cancelled"] = document_services.precompute_cancelled(document_id=document_id)
        return bool(last["cancelled"])

    try:
        with _Heartbeat(document_id):
            result = _precompute_adopting(document, progress, should_cancel)
    except KVError as exc:
        if exc.code == "precompute_cancelled":
            log.info("Precompute of document %s cancelled", document_id)
            return None
        document_services.record_precompute_failure(
            document_id=document_id, code=exc.code, message=exc.message
        )
        return {"ok": False, "error": exc.to_dict()}
    except Exception as exc:
        document_services.record_precompute_failure(
            document_id=document_id, code="internal_error", message=f"{type(exc).__name__}: {exc}"
        )
        raise
    document_services.record_precompute_success(document_id=document_id, result=result)
    return {"ok": True, "key": result["key"], "n_tokens": result["n_tokens"]}


def _precompute_adopting(document, progress, should_cancel) -> dict[str, Any]:
    """engine.precompute, checking the payload hash of an artifact that was already there
    (say, written by a worker killed before it recorded it): adopted when it verifies,
    deleted and computed again when it does not."""
    import inference
    from inference.errors import ArtifactCorrupted, ArtifactTruncated
    from marketplace import engine

    kwargs = dict(slug=document.model_slug, text=document.text, progress=progress,
                  should_cancel=should_cancel)
    result = engine.precompute(**kwargs)
    if not result["reused"]:
        return result
    path = engine.get_store().path(result["key"])
    if not path.is_file():
        return result  # held only in S3: the store verifies it on download
    try:
        inference.read_artifact(path, engine.get_loaded(document.model_slug))
    except (ArtifactCorrupted, ArtifactTruncated) as exc:
        log.warning("Artifact %s of document %s failed its check (%s); computing it again",
                    result["key"], document.pk, exc)
        engine.delete_artifact(result["key"])
        return engine.precompute(**kwargs)
    log.info("Document %s adopted the existing artifact %s", document.pk, result["key"])
    return result


class _Heartbeat:
    """Touches the document every PRECOMPUTE_HEARTBEAT_SECONDS from a thread while the
    precompute runs, through model loading and verification, which report no progress: a
    document left untouched for PRECOMPUTE_STALE_SECONDS has lost its worker
    (services.documents.recover_stalled_precomputes)."""

    def __init__(self, document_id: int) -> None:
        self.document_id = document_id
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"precompute-heartbeat-{document_id}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from django.conf import settings
        from django.db import connection

        interval = float(settings.PRECOMPUTE_HEARTBEAT_SECONDS)
        try:
            while not self._stop.wait(interval):
                try:
                    document_services.touch_precompute(document_id=self.document_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                    log.warning("Heartbeat of document %s failed", self.document_id,
                                exc_info=True)
        finally:
            connection.close()  # this thread's own connection


@shared_task(name="marketplace.tasks.recover_stalled_precomputes")
def recover_stalled_precomputes() -> dict[str, list[int]]:
    return document_services.recover_stalled_precomputes()


@shared_task(name="marketplace.tasks.expire_licenses")
def expire_licenses() -> int:
    from marketplace.services.licenses import expire_licenses as expire

    return expire()


@shared_task(name="marketplace.tasks.sweep_loads")
def sweep_loads() -> dict[str, int]:
    """Release abandoned reservations and charge served loads left uncharged (every ~15 s)."""
    from marketplace.services.completions import sweep_loads as sweep

    return sweep()


@shared_task(name="marketplace.tasks.expire_stale_loads")
def expire_stale_loads() -> dict[str, int]:
    """The sweep's former name (schedules stored in the database may still send it)."""
    return sweep_loads()


@shared_task(name="marketplace.tasks.collect_artifacts")
def collect_artifacts() -> list[str]:
    return document_services.collect_artifacts()
