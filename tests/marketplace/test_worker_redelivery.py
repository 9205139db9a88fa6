"""A worker killed in the middle of a precompute: the task is redelivered, finishes, and no
partial artifact is left (a real prefork worker whose pool process gets SIGKILL)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from marketplace.models import Document
from tests.marketplace.integration import (
    DOCUMENT_TEXT,
    GPU_QUEUES,
    partial_files,
    skip_module_unless_worker_can_run,
    wait_for,
    wait_until_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

skip_module_unless_worker_can_run()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def test_killed_worker_task_is_redelivered_without_partial_artifact(
    celery_worker_factory, publisher_user, tmp_path, monkeypatch
):
    from marketplace.services.documents import create_document

    kv_dir = tmp_path / "kv"
    worker = celery_worker_factory(
        GPU_QUEUES, pool="prefork", concurrency=1,
        # The redelivered task waits for the dead run's heartbeat to go stale before it takes
        # over (a live run's would advance): keep that wait short here.
        extra_env={"KV_STORE_DIR": str(kv_dir), "PRECOMPUTE_STALE_SECONDS": "3",
                   "PRECOMPUTE_HEARTBEAT_SECONDS": "0.5"},
        ready_timeout=120,
    )
    # The pool process imports the engine and loads the model inside the task, so a kill right
    # after the status turns "precomputing" lands mid-task even for a short document.
    text = DOCUMENT_TEXT + " The tide came in over the shingle and went out again."
    monkeypatch.setattr(django_settings, "KV_STORE_DIR", kv_dir)
    doc = create_document(publisher=publisher_user, title="long", text=text,
                          model_slug="tiny-qwen3")
    wait_for(lambda: Document.objects.get(pk=doc.pk).status == "precomputing", timeout=60,
             what="the precompute to start", interval=0.05)
    victims = _children(worker.process.pid)
    assert victims, "the prefork worker has no pool process"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    doc, _ = wait_until_ready(doc.pk, timeout=240)
    assert doc.precompute_attempts >= 2, "the task was not redelivered"
    assert doc.verification["passed"] is True
    assert not partial_files(kv_dir)
    assert len(list(kv_dir.rglob("*.safetensors"))) == 1
