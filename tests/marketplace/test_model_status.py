"""Which registry models are ready: a live worker serving a model has loaded it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import registry
from marketplace.models import GpuWorker
from marketplace.selectors.models import model_status

pytestmark = pytest.mark.django_db


def test_a_model_is_ready_once_a_live_worker_serves_it(settings):
    registry.forget()
    status = {m["slug"]: m for m in model_status()}
    assert list(status) == list(settings.KVMARKET_MODELS)
    assert not any(m["ready"] for m in status.values())

    registry.announce(name="w1@host", url="http://127.0.0.1:1", model_slugs=["tiny-qwen3"],
                      hot_keys=[], in_flight=0, started_at=timezone.now())
    registry.forget()
    status = {m["slug"]: m for m in model_status()}
    assert status["tiny-qwen3"]["ready"] and status["tiny-qwen3"]["workers"] == ["w1@host"]
    assert status["tiny-qwen3"]["label"] == settings.KVMARKET_MODELS["tiny-qwen3"]["label"]
    assert not status["smollm2-135m"]["ready"]

    # A worker whose heartbeat went stale no longer counts.
    GpuWorker.objects.update(heartbeat_at=timezone.now() - timedelta(hours=1))
    registry.forget()
    assert not any(m["ready"] for m in model_status())
