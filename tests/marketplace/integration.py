"""Shared pieces of the integration tests: one real worker per module, waiting helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from marketplace.models import Document
from tests.support.live_stack import poll

GPU_QUEUES = ["default", "gpu.tiny-qwen3"]

DOCUMENT_TEXT = (
    "The lighthouse keeper of Skerry Point kept a logbook in green ink. Every evening at dusk "
    "he lit the lamp, wound the clockwork that turned the lens, and wrote the weather, the "
    "ships he saw and the number of gulls on the rail. In the winter of 1911 the supply boat "
    "failed to come for six weeks, and he lived on oatmeal, dried cod and tea."
)


def model_available() -> bool:
    """The registry's tiny-qwen3 weights exist (the built-in model is trained into the repo)."""
    from django.conf import settings

    from inference.models import BUILTIN_DIR, BUILTIN_MODEL_ID

    ref = settings.KVMARKET_MODELS["tiny-qwen3"]["ref"]
    path = BUILTIN_DIR if ref in (BUILTIN_MODEL_ID, "builtin", "tiny-qwen3") else Path(ref)
    return (path / "config.json").is_file()


def skip_module_unless_worker_can_run() -> None:
    """Skip the calling test module unless PostgreSQL, Redis and the tiny-qwen3 weights are
    there (a real worker needs all three). Call it at module level."""
    from django.conf import settings

    if not settings.USING_POSTGRES or not settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("needs PostgreSQL and Redis (DATABASE_URL, CELERY_BROKER_URL)",
                    allow_module_level=True)
    if not model_available():
        pytest.skip("the tiny-qwen3 weights are missing (python -m inference.builtin.train)",
                    allow_module_level=True)


def wait_for(predicate: Callable[[], object], *, timeout: float, what: str,
             interval: float = 0.2) -> object:
    """poll() that lets an exception in predicate through."""
    return poll(predicate, timeout=timeout, what=what, interval=interval, errors_ok=False)


def wait_for_live_worker(name: str | None = None, *, timeout: float = 30.0) -> None:
    """Wait until a GPU worker (this one, if named) is in the registry: its row is written by
    its heartbeat, so after a transactional test emptied the tables it comes back in seconds."""
    from marketplace import registry
    from marketplace.models import GpuWorker

    def live() -> bool:
        rows = GpuWorker.objects.all()
        return rows.filter(name=name).exists() if name else rows.exists()

    wait_for(live, timeout=timeout, what="a GPU worker in the registry", interval=0.1)
    registry.forget()


def wait_until_ready(document_id: int, *, timeout: float = 180.0) -> tuple[Document, list]:
    """Poll the document until it is ready; returns it and the progress values seen."""
    seen: list[tuple[str, int, int]] = []

    def check() -> Document | None:
        doc = Document.objects.get(pk=document_id)
        point = (doc.status, doc.tokens_done, doc.tokens_total)
        if not seen or seen[-1] != point:
            seen.append(point)
        if doc.status == "failed":
            raise AssertionError(f"precompute failed: {doc.error_code}: {doc.error}")
        return doc if doc.status == "ready" else None

    doc = wait_for(check, timeout=timeout, what=f"document {document_id} to be ready")
    return doc, seen


def partial_files(kv_dir: Path) -> list[Path]:
    return [p for p in kv_dir.rglob("*") if p.is_file() and not (
        p.name.endswith(".safetensors") or p.name.endswith(".verify.json")
    )]
