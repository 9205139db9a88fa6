"""A document longer than the model's context is refused when it is submitted (422 in the API),
not accepted and failed later on the worker."""

from __future__ import annotations

import json

import pytest

from marketplace.models import Document

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent_tasks(monkeypatch) -> list[int]:
    """Precompute tasks sent (recorded at the enqueue boundary, never run)."""
    sent: list[int] = []

    def enqueue(*, document_id: int, model_slug: str) -> str:
        sent.append(document_id)
        return f"task-{document_id}"

    monkeypatch.setattr("marketplace.tasks.enqueue_precompute", enqueue)
    return sent

# The built-in tiny-qwen3 has a 4096-token context; "hello world " takes five of its tokens.
TOO_LONG = "hello world " * 2100
FITS = "hello world " * 500


def _post(publisher_client, text: str):
    body = json.dumps({"title": "Long", "text": text, "model": "tiny-qwen3"})
    return publisher_client.post("/api/v1/documents", body, content_type="application/json")


def test_document_over_the_context_is_422(publisher_client, sent_tasks) -> None:
    response = _post(publisher_client, TOO_LONG)
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    message = error["fields"]["text"][0]
    assert "4096-token context" in message and "must be under 4096 tokens" in message
    assert not Document.objects.exists() and sent_tasks == []


def test_document_that_fits_is_accepted(
    publisher_client, sent_tasks, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = _post(publisher_client, FITS)
    assert response.status_code == 201, response.content
    document = Document.objects.get()
    assert document.status == "queued"
    assert len(sent_tasks) == 1


def test_a_tokenizer_that_cannot_load_is_not_retried_on_every_request(monkeypatch) -> None:
    import inference.tokenizer
    from marketplace import engine

    calls = []

    def missing(ref, **_):
        calls.append(ref)
        raise OSError("no model files here")

    monkeypatch.setattr(inference.tokenizer, "get_token_counter", missing)
    monkeypatch.setattr(engine, "_no_token_counter", {})
    assert engine.token_counter("tiny-qwen3") is None
    assert engine.token_counter("tiny-qwen3") is None
    assert len(calls) == 1


@pytest.mark.django_db(transaction=False)
def test_a_web_process_loads_its_token_counters_at_start_not_on_its_first_request(settings):
    """Loading the first token counter imports torch and transformers: seconds in which a web
    process serves nothing. The WSGI application does it when the process starts."""
    import os
    import subprocess
    import sys

    models = {"tiny-qwen3": settings.KVMARKET_MODELS["tiny-qwen3"]}
    code = ("import sys, kvmarket.wsgi\n"
            "from inference import tokenizer\n"
            "print(sorted(tokenizer._COUNTERS))")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "KVMARKET_MODELS": json.dumps(models)},
    )
    assert out.stdout.strip() == repr([models["tiny-qwen3"]["ref"]])
