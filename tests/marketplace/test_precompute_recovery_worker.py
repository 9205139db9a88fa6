"""Precomputes recover from a worker killed with SIGKILL, with real Celery worker processes
(solo pool, the whole process killed: nothing rejects or requeues its message, which waits in
Redis's unacked hash for the visibility timeout). The heartbeat sweep finds the stalled
document within seconds and queues it again; the next worker computes it, or adopts an
artifact the dead worker had already written once its hash checks out."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from marketplace.models import Document, DocumentStatus
from marketplace.services import documents as document_services
from tests.marketplace.integration import (
    DOCUMENT_TEXT,
    GPU_QUEUES,
    skip_module_unless_worker_can_run,
    wait_for,
    wait_until_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

skip_module_unless_worker_can_run()

STALE_SECONDS = 2.0
WORKER_ENV = {"PRECOMPUTE_HEARTBEAT_SECONDS": "0.3", "PRECOMPUTE_STALE_SECONDS": "2"}


@pytest.fixture
def kv_dir(tmp_path, settings, monkeypatch):
    from marketplace import engine

    path = tmp_path / "kv"
    monkeypatch.setattr(django_settings, "KV_STORE_DIR", path)
    settings.PRECOMPUTE_STALE_SECONDS = STALE_SECONDS
    engine.reset_store()
    yield path
    engine.reset_store()


def _sweep_until_requeued(document_id: int, timeout: float) -> float:
    """Run the sweep (what beat does every PRECOMPUTE_SWEEP_SECONDS) until it queues the
    document again; returns the seconds that took."""
    start = time.monotonic()

    def requeued() -> bool:
        return document_id in document_services.recover_stalled_precomputes()["requeued"]

    wait_for(requeued, timeout=timeout, what="the sweep to queue the document again",
             interval=0.25)
    return time.monotonic() - start


def test_precompute_killed_mid_prefill_is_queued_again_and_finishes(
    celery_worker_factory, publisher_user, kv_dir
) -> None:
    first = celery_worker_factory(GPU_QUEUES, extra_env={**WORKER_ENV,
                                                          "KV_STORE_DIR": str(kv_dir)})
    text = DOCUMENT_TEXT + " The tide came in over the shingle and went out again."
    document = document_services.create_document(
        publisher=publisher_user, title="killed", text=text, model_slug="tiny-qwen3"
    )
    wait_for(lambda: Document.objects.get(pk=document.pk).status == "precomputing",
             timeout=60, what="the precompute to start", interval=0.05)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=10)
    killed_at = time.monotonic()
    assert Document.objects.get(pk=document.pk).status == "precomputing"

    recovered_in = _sweep_until_requeued(document.pk, timeout=30)
    assert recovered_in < STALE_SECONDS + 5
    celery_worker_factory(GPU_QUEUES, extra_env={**WORKER_ENV, "KV_STORE_DIR": str(kv_dir)})
    document, _ = wait_until_ready(document.pk, timeout=180)
    assert document.precompute_attempts == 2
    assert document.verification["passed"] is True
    assert len(list(kv_dir.rglob("*.safetensors"))) == 1
    print(f"recovery: stalled document queued again {time.monotonic() - killed_at:.1f} s "
          f"after the kill ({recovered_in:.1f} s of sweeps)")


def _dead_worker_left_an_artifact(publisher_user, text: str):
    """A document whose worker wrote its artifact and died before recording it."""
    from marketplace import engine

    result = engine.precompute(slug="tiny-qwen3", text=text)
    document = document_services.create_document(
        publisher=publisher_user, title="orphan", text=text, model_slug="tiny-qwen3",
        submit=False,
    )
    Document.objects.filter(pk=document.pk).update(
        status=DocumentStatus.PRECOMPUTING, precompute_attempts=1,
        updated_at=timezone.now() - timedelta(seconds=60),
    )
    return document, engine.get_store().path(result["key"])


def test_artifact_left_by_a_dead_worker_is_adopted_only_when_its_hash_checks_out(
    celery_worker_factory, publisher_user, kv_dir
) -> None:
    from inference import read_artifact
    from marketplace import engine

    intact, intact_path = _dead_worker_left_an_artifact(publisher_user, DOCUMENT_TEXT)
    corrupted, corrupted_path = _dead_worker_left_an_artifact(
        publisher_user, DOCUMENT_TEXT + " The lamp went out at dawn."
    )
    engine.reset_store()  # the worker reads the files from disk, not this process's memory
    written = intact_path.stat().st_mtime_ns
    data = bytearray(corrupted_path.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte in the tensor payload; the header still parses
    corrupted_path.write_bytes(bytes(data))

    assert sorted(document_services.recover_stalled_precomputes()["requeued"]) == [
        intact.pk, corrupted.pk
    ]
    worker = celery_worker_factory(GPU_QUEUES, extra_env={**WORKER_ENV,
                                                           "KV_STORE_DIR": str(kv_dir)})
    intact, _ = wait_until_ready(intact.pk, timeout=180)
    corrupted, _ = wait_until_ready(corrupted.pk, timeout=180)

    assert intact.precompute_attempts == 2
    assert intact_path.stat().st_mtime_ns == written  # adopted, not computed again
    assert f"adopted the existing artifact {intact.artifact_key}" in worker.log()

    assert f"Artifact {corrupted.artifact_key} of document {corrupted.pk} failed its check" in (
        worker.log()
    )
    assert corrupted_path.read_bytes() != bytes(data)
    read_artifact(corrupted_path)  # the recomputed artifact verifies
