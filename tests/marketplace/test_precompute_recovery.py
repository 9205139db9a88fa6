"""Stuck precomputes recover in seconds (no worker process here; see
test_precompute_recovery_worker.py for real workers killed with SIGKILL): a precompute whose
heartbeat went stale is queued again or failed, the retry API accepts it, and a document whose
task never reached a broker that was down is sent later."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from marketplace.models import Document, DocumentStatus
from marketplace.services import documents as document_services

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch) -> list[int]:
    sent: list[int] = []

    def enqueue(*, document_id: int, model_slug: str) -> str:
        sent.append(document_id)
        return f"task-{len(sent)}"

    monkeypatch.setattr("marketplace.tasks.enqueue_precompute", enqueue)
    return sent


@pytest.fixture(autouse=True)
def _short_staleness(settings) -> None:
    settings.PRECOMPUTE_STALE_SECONDS = 30
    settings.PRECOMPUTE_HEARTBEAT_SECONDS = 0.2
    settings.PRECOMPUTE_MAX_ATTEMPTS = 3


def _precomputing(publisher, *, beat_seconds_ago: float, attempts: int = 1) -> Document:
    document = Document.objects.create(
        publisher=publisher, title="t", text="Some text.", model_slug="tiny-qwen3",
        status=DocumentStatus.PRECOMPUTING, precompute_attempts=attempts,
        celery_task_id="task-0", tokens_done=10, tokens_total=100,
    )
    Document.objects.filter(pk=document.pk).update(
        updated_at=timezone.now() - timedelta(seconds=beat_seconds_ago)
    )
    document.refresh_from_db()
    return document


def test_stalled_precompute_is_queued_again(
    publisher_user, sent, django_capture_on_commit_callbacks
) -> None:
    stalled = _precomputing(publisher_user, beat_seconds_ago=31)
    live = _precomputing(publisher_user, beat_seconds_ago=2)
    with django_capture_on_commit_callbacks(execute=True):
        outcome = document_services.recover_stalled_precomputes()
    assert outcome == {"requeued": [stalled.pk], "failed": []}
    stalled.refresh_from_db()
    live.refresh_from_db()
    assert stalled.status == "queued" and stalled.celery_task_id == "task-1"
    assert stalled.tokens_done == 0
    assert live.status == "precomputing" and sent == [stalled.pk]


def test_stalled_precompute_out_of_attempts_fails_and_can_be_retried(
    publisher_user, publisher_client, sent, django_capture_on_commit_callbacks
) -> None:
    stalled = _precomputing(publisher_user, beat_seconds_ago=60, attempts=3)
    outcome = document_services.recover_stalled_precomputes()
    assert outcome == {"requeued": [], "failed": [stalled.pk]}
    stalled.refresh_from_db()
    assert stalled.status == "failed" and stalled.error_code == "worker_lost"
    with django_capture_on_commit_callbacks(execute=True):
        response = publisher_client.post(f"/api/v1/documents/{stalled.pk}/retry")
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert sent == [stalled.pk]


def test_retry_api_accepts_a_stalled_precompute_and_refuses_a_live_one(
    publisher_user, publisher_client, sent, django_capture_on_commit_callbacks
) -> None:
    live = _precomputing(publisher_user, beat_seconds_ago=1)
    response = publisher_client.post(f"/api/v1/documents/{live.pk}/retry")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_failed"
    stalled = _precomputing(publisher_user, beat_seconds_ago=45)
    with django_capture_on_commit_callbacks(execute=True):
        response = publisher_client.post(f"/api/v1/documents/{stalled.pk}/retry")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "queued"
    assert sent == [stalled.pk]


def test_document_created_while_the_broker_is_down_is_sent_later(
    publisher_client, monkeypatch, settings, django_capture_on_commit_callbacks
) -> None:
    def broker_down(*, document_id: int, model_slug: str) -> str:
        raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr("marketplace.tasks.enqueue_precompute", broker_down)
    body = json.dumps({"title": "t", "text": "A short document.", "model": "tiny-qwen3"})
    with django_capture_on_commit_callbacks(execute=True):
        response = publisher_client.post("/api/v1/documents", body,
                                         content_type="application/json")
    assert response.status_code == 201, response.content
    document = Document.objects.get()
    assert document.status == "queued" and document.celery_task_id == ""

    sent: list[int] = []
    monkeypatch.setattr("marketplace.tasks.enqueue_precompute",
                        lambda *, document_id, model_slug: sent.append(document_id) or "t-9")
    assert document_services.recover_stalled_precomputes()["requeued"] == []  # not stale yet
    Document.objects.filter(pk=document.pk).update(
        updated_at=timezone.now() - timedelta(seconds=31)
    )
    assert document_services.recover_stalled_precomputes()["requeued"] == [document.pk]
    document.refresh_from_db()
    assert sent == [document.pk] and document.celery_task_id == "t-9"


def test_duplicate_delivery_skips_while_the_owner_beats(publisher_user, transactional_db) -> None:
    document = _precomputing(publisher_user, beat_seconds_ago=0)
    stop = threading.Event()

    def beat() -> None:
        from django.db import connection

        while not stop.wait(0.1):
            document_services.touch_precompute(document_id=document.pk)
        connection.close()

    owner = threading.Thread(target=beat)
    owner.start()
    try:
        assert document_services.precompute_alive_elsewhere(document_id=document.pk) is True
    finally:
        stop.set()
        owner.join()


def test_delivery_after_the_owner_died_takes_over(publisher_user, settings) -> None:
    settings.PRECOMPUTE_STALE_SECONDS = 1
    document = _precomputing(publisher_user, beat_seconds_ago=0)  # died right after a beat
    assert document_services.precompute_alive_elsewhere(document_id=document.pk) is False
    started = document_services.start_precompute(document_id=document.pk, task_id="task-0")
    assert started is not None and started.precompute_attempts == 2
