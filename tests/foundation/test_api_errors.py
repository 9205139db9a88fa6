"""Every /api/ response is JSON in every mode (DEBUG on too); pages keep HTML.

Covers what DRF's exception handler never sees: Django's own 404/405/400 pages, an oversized
body (413 with the limit), a NUL in a query parameter (400, not PostgreSQL's 500), JSON strings
no tokenizer can take (422), an unhandled exception (500 JSON, no stack trace) and a Stripe
webhook with a valid signature but an unexpected shape (400).
"""

from __future__ import annotations

import json

import pytest
from django.db import OperationalError

pytestmark = pytest.mark.django_db


def _error(response) -> dict:
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    return response.json()["error"]


@pytest.fixture(params=[False, True], ids=["debug-off", "debug-on"])
def debug(request, settings) -> bool:
    settings.DEBUG = request.param
    return request.param


def test_unknown_api_path_is_json_404(api_client, debug) -> None:
    response = api_client.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"
    assert len(response.content) < 500  # never Django's debug page


def test_page_404_stays_html(client, debug) -> None:
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_unhandled_exception_is_json_500_without_trace(api_client, debug, monkeypatch) -> None:
    from marketplace.api import documents

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(documents, "documents_visible_to", boom)
    api_client.raise_request_exception = False
    response = api_client.get("/api/v1/documents")
    assert response.status_code == 500
    assert _error(response)["code"] == "server_error"
    assert b"secret internals" not in response.content
    assert b"Traceback" not in response.content


def test_method_not_allowed_is_json_on_non_drf_endpoint(client, debug, settings) -> None:
    settings.STRIPE_WEBHOOK_SECRET = "whsec_test"
    response = client.get("/stripe/webhook")
    assert response.status_code == 405
    assert _error(response)["code"] == "method_not_allowed"
    assert response["Allow"] == "POST"


def test_oversized_body_is_413_with_the_limit(publisher_user, debug, settings) -> None:
    from rest_framework.test import APIClient

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    client = APIClient()
    client.force_authenticate(publisher_user)
    body = json.dumps({"title": "t", "text": "a" * 20_000, "model": "tiny-qwen3"})
    response = client.post("/api/v1/documents", body, content_type="application/json")
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "request_too_large"
    assert "10000 bytes" in error["message"] and error["limit_bytes"] == 10_000


def test_nul_in_query_parameter_is_400(api_client, debug) -> None:
    api_client.raise_request_exception = False
    response = api_client.get("/api/v1/documents", {"q": "a\x00b"})
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "invalid_parameter" and "'q'" in error["message"]


@pytest.mark.parametrize("bad", ["lone \ud800 surrogate", "nul \x00 byte"])
def test_text_no_tokenizer_takes_is_422(publisher_user, bad) -> None:
    from rest_framework.test import APIClient

    from marketplace.models import Document

    client = APIClient()
    client.force_authenticate(publisher_user)
    # json.dumps escapes both as \\ud800 / \\u0000: valid JSON, not valid text.
    body = json.dumps({"title": "t", "text": bad, "model": "tiny-qwen3"})
    response = client.post("/api/v1/documents", body, content_type="application/json")
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_request" and "text" in error["fields"]
    assert not Document.objects.exists()


def test_lone_surrogate_in_chat_message_is_422_before_dispatch(api_client, agent_user) -> None:
    body = json.dumps({
        "model": "tiny-qwen3", "document": 1, "license": 1,
        "messages": [{"role": "user", "content": "hi \udc00"}],
    })
    response = api_client.post("/api/v1/chat/completions", body, content_type="application/json")
    assert response.status_code == 422
    assert "messages[0].content" in _error(response)["fields"]


def test_database_outage_is_503_json_with_retry_after(api_client, monkeypatch) -> None:
    from marketplace.api import documents

    def down(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(documents, "documents_visible_to", down)
    response = api_client.get("/api/v1/documents")
    assert response.status_code == 503
    assert _error(response)["code"] == "database_unavailable"
    assert int(response["Retry-After"]) > 0


def test_broker_outage_is_503_json_with_retry_after(api_client, monkeypatch) -> None:
    from kombu.exceptions import OperationalError as BrokerError

    from marketplace.api import documents

    def down(*args, **kwargs):
        raise BrokerError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(documents, "documents_visible_to", down)
    response = api_client.get("/api/v1/documents")
    assert response.status_code == 503
    assert _error(response)["code"] == "broker_unavailable"
    assert response["Retry-After"]


# --- Stripe webhook: a valid signature on an unexpected shape --------------------------------


def _signed_post(client, payload: str, secret: str = "whsec_test"):
    import stripe

    header = stripe.WebhookSignature.generate_signature_header(payload, secret)
    return client.post("/stripe/webhook", data=payload, content_type="application/json",
                       HTTP_STRIPE_SIGNATURE=header)


@pytest.mark.parametrize("event", [
    {"id": "evt_1", "object": "event", "type": "checkout.session.completed"},
    {"id": "evt_1", "object": "event", "type": "checkout.session.completed", "data": {}},
    {"id": "evt_1", "object": "event", "type": "checkout.session.completed",
     "data": {"object": "not-an-object"}},
    # The right envelope, but the session lacks its id.
    {"id": "evt_1", "object": "event", "type": "checkout.session.completed",
     "data": {"object": {"payment_status": "paid", "amount_total": 100,
                         "client_reference_id": "1"}}},
], ids=["no-data", "no-object", "object-not-a-dict", "session-without-id"])
def test_signed_webhook_with_unexpected_shape_is_400(client, settings, event) -> None:
    from ledger.models import StripeEvent

    settings.STRIPE_WEBHOOK_SECRET = "whsec_test"
    response = _signed_post(client, json.dumps(event))
    assert response.status_code == 400
    assert _error(response)["code"] == "bad_payload"
    assert not StripeEvent.objects.exists()


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=abc", "offset=-1",
                                   "offset=1.5", "limit=%EF%BC%91"])  # the last: a full-width 1
def test_invalid_pagination_is_400_not_ignored(api_client, query) -> None:
    response = api_client.get(f"/api/v1/documents?{query}")
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_parameter"


def test_pagination_in_range_is_accepted(api_client) -> None:
    response = api_client.get("/api/v1/licenses?limit=200&offset=0")
    assert response.status_code == 200
    assert set(response.json()) == {"count", "next", "previous", "results"}


def test_non_json_body_is_415(api_client) -> None:
    response = api_client.post("/api/v1/licenses", "document=1&loads=1",
                               content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert _error(response)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("key", ["", "   ", "k" * 256, "caf\u00e9"])
def test_idempotency_key_outside_its_schema_is_422(api_client, key) -> None:
    response = api_client.post("/api/v1/licenses", {"document": 1, "loads": 1},
                               HTTP_IDEMPOTENCY_KEY=key)
    assert response.status_code == 422
    assert "Idempotency-Key" in _error(response)["message"]


@pytest.mark.parametrize("key", ["lone\ud800key", "nul\x00key"])
def test_bad_text_in_a_json_key_is_422_and_the_answer_is_valid_json(api_client, key) -> None:
    body = json.dumps({"document": 1, "loads": 1, key: "x"})
    response = api_client.post("/api/v1/licenses", body, content_type="application/json")
    assert response.status_code == 422
    assert list(_error(response)["fields"]) == [key.replace("\ud800", "?").replace("\x00", "?")]
