"""Licenses API: purchase into escrow, 402/404/409/422, idempotent retries, isolation."""

from __future__ import annotations

import pytest

from marketplace.models import Document, License
from tests.marketplace.conftest import NANO, fund, make_ready_document, wallet

pytestmark = pytest.mark.django_db


def test_buy_license_pays_into_escrow(api_client, funded_agent, ready_document):
    from ledger.selectors import escrow_balance

    before = wallet(funded_agent)
    r = api_client.post(
        "/api/v1/licenses", {"document": ready_document.pk, "loads": 5}, format="json"
    )
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["loads_total"] == 5 and body["loads_left"] == 5 and body["status"] == "active"
    assert body["price_per_load_nano"] == 10_000  # 1000 tokens x 10 nano (default tariff)
    assert wallet(funded_agent) == before - 50_000
    assert escrow_balance(f"license:{body['id']}") == 50_000


def test_insufficient_funds_is_402_and_leaves_nothing(api_client, agent_user, publisher_user):
    doc = make_ready_document(publisher_user, price=NANO)  # $1 a load
    fund(agent_user, amount_nano=2_500_000_000)
    r = api_client.post("/api/v1/licenses", {"document": doc.pk, "loads": 3}, format="json")
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "insufficient_funds"
    assert not License.objects.exists()
    assert wallet(agent_user) == 2_500_000_000


def test_unknown_document_is_404(api_client, funded_agent):
    r = api_client.post("/api/v1/licenses", {"document": 424242, "loads": 1}, format="json")
    assert r.status_code == 404


def test_unlisted_or_unready_document_is_409(api_client, funded_agent, publisher_user):
    unlisted = make_ready_document(publisher_user, listed=False)
    r = api_client.post("/api/v1/licenses", {"document": unlisted.pk, "loads": 1}, format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "document_unlisted"
    queued = Document.objects.create(
        publisher=publisher_user, title="q", text="q", model_slug="tiny-qwen3", status="queued"
    )
    r = api_client.post("/api/v1/licenses", {"document": queued.pk, "loads": 1}, format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "document_not_ready"


@pytest.mark.parametrize("payload", [{"document": 1, "loads": 0}, {"loads": 2}, {"document": "x"}])
def test_invalid_body_is_422(api_client, funded_agent, payload):
    r = api_client.post("/api/v1/licenses", payload, format="json")
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request"


def test_publisher_cannot_buy(publisher_client, ready_document):
    r = publisher_client.post(
        "/api/v1/licenses", {"document": ready_document.pk, "loads": 1}, format="json"
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "agent_only"


def test_idempotent_purchase(api_client, funded_agent, ready_document):
    headers = {"HTTP_IDEMPOTENCY_KEY": "buy-1"}
    before = wallet(funded_agent)
    first = api_client.post(
        "/api/v1/licenses", {"document": ready_document.pk, "loads": 2}, format="json", **headers
    )
    again = api_client.post(
        "/api/v1/licenses", {"document": ready_document.pk, "loads": 2}, format="json", **headers
    )
    assert first.status_code == 201 and again.status_code == 200
    assert again["Idempotent-Replayed"] == "true"
    assert first.json()["id"] == again.json()["id"]
    assert License.objects.count() == 1
    assert wallet(funded_agent) == before - 20_000
    other = api_client.post(
        "/api/v1/licenses", {"document": ready_document.pk, "loads": 3}, format="json", **headers
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_list_and_detail_are_per_agent(api_client, funded_agent, ready_document,
                                       other_agent_client):
    mine = api_client.post(
        "/api/v1/licenses", {"document": ready_document.pk, "loads": 1}, format="json"
    ).json()
    theirs = other_agent_client.post(
        "/api/v1/licenses", {"document": ready_document.pk, "loads": 1}, format="json"
    ).json()
    ids = [lic["id"] for lic in api_client.get("/api/v1/licenses").json()["results"]]
    assert ids == [mine["id"]]
    assert api_client.get(f"/api/v1/licenses/{mine['id']}").status_code == 200
    r = api_client.get(f"/api/v1/licenses/{theirs['id']}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_unlisting_keeps_live_licenses(api_client, funded_agent, publisher_user, fake_worker):
    from marketplace.services.documents import unlist_document

    doc = make_ready_document(publisher_user)
    lic = api_client.post("/api/v1/licenses", {"document": doc.pk, "loads": 2},
                          format="json").json()
    unlist_document(document=doc, publisher=publisher_user)
    r = api_client.post("/api/v1/licenses", {"document": doc.pk, "loads": 1}, format="json")
    assert r.status_code == 409
    r = api_client.post(
        "/api/v1/chat/completions",
        {"model": "tiny-qwen3", "document": doc.pk, "license": lic["id"],
         "messages": [{"role": "user", "content": "hi"}]},
        format="json",
    )
    assert r.status_code == 200, r.content


def test_expiry_refunds_unused_escrow(api_client, funded_agent, ready_document):
    from datetime import timedelta

    from django.utils import timezone

    from ledger.selectors import escrow_balance
    from marketplace.services.licenses import expire_licenses

    before = wallet(funded_agent)
    lic = api_client.post("/api/v1/licenses", {"document": ready_document.pk, "loads": 4},
                          format="json").json()
    assert wallet(funded_agent) == before - 40_000
    License.objects.filter(pk=lic["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert expire_licenses() == 1
    assert License.objects.get(pk=lic["id"]).status == "expired"
    assert escrow_balance(f"license:{lic['id']}") == 0
    assert wallet(funded_agent) == before
    assert expire_licenses() == 0


def test_rate_limit_is_429(api_client, settings):
    settings.API_KEY_THROTTLE_RATE = "2/min"
    assert api_client.get("/api/v1/licenses").status_code == 200
    assert api_client.get("/api/v1/licenses").status_code == 200
    r = api_client.get("/api/v1/licenses")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
