"""Wallet and earnings API: auth (401/403), shapes, units, errors as JSON."""

from decimal import Decimal

import pytest
import responses
from rest_framework.test import APIClient

from ledger import services
from ledger.errors import IdempotencyConflict, InsufficientFunds
from marketplace.api.common import to_api_error
from tests.support.accounts import make_api_key

from .stripe_stubs import API, checkout_session

pytestmark = pytest.mark.django_db

ENDPOINTS = [
    ("get", "/api/v1/wallet"),
    ("post", "/api/v1/wallet/topups"),
    ("get", "/api/v1/wallet/history"),
    ("get", "/api/v1/earnings"),
]


@pytest.fixture
def agent_client(agent):
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Bearer {make_api_key(agent)}")
    return c


@pytest.fixture
def publisher_client(publisher):
    c = APIClient()
    c.force_login(publisher)  # publishers use their browser session
    return c


@pytest.mark.parametrize("method,url", ENDPOINTS)
def test_unauthenticated_is_401_json(method, url):
    r = getattr(APIClient(), method)(url)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "not_authenticated"
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Bearer kvm_nope")
    assert getattr(bad, method)(url).status_code == 401


@pytest.mark.parametrize("method,url", ENDPOINTS[:3])
def test_wallet_endpoints_are_for_agents(publisher_client, method, url):
    r = getattr(publisher_client, method)(url)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


def test_earnings_is_403_for_agents(agent_client):
    r = agent_client.get("/api/v1/earnings")
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "permission_denied"


def test_wallet_and_history(agent_client, agent):
    services.credit_topup(agent=agent, amount_nano=1_500_000_001, idempotency_key="t")
    services.record_egress(agent=agent, amount_nano=1, idempotency_key="e", memo="kv bytes")
    r = agent_client.get("/api/v1/wallet")
    assert r.status_code == 200
    assert r.json() == {
        "balance_nano": 1_500_000_000,
        "balance_usd": "1.500000000",
        "currency": "usd",
        "unit": "nano_usd",
        "nano_per_usd": 1_000_000_000,
    }
    r = agent_client.get("/api/v1/wallet/history?limit=1")
    rows = r.json()["results"]
    assert len(rows) == 1 and rows[0]["kind"] == "egress" and rows[0]["amount_nano"] == -1
    assert rows[0]["balance_after_nano"] == 1_500_000_000 and rows[0]["memo"] == "kv bytes"
    assert agent_client.get("/api/v1/wallet/history?limit=0").status_code == 422
    assert agent_client.get("/api/v1/wallet/history?limit=x").status_code == 422


def test_topup_returns_checkout_url(agent_client, agent):
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{API}/v1/checkout/sessions",
            json=checkout_session("cs_api", amount_cents=1000, agent_id=agent.pk, paid=False),
        )
        r = agent_client.post("/api/v1/wallet/topups", {"amount_cents": 1000}, format="json")
    assert r.status_code == 201
    assert r.json() == {"checkout_url": "https://checkout.stripe.com/c/pay/cs_api"}


def test_topup_validation_and_stripe_errors(agent_client, settings):
    r = agent_client.post("/api/v1/wallet/topups", {"amount_cents": 5}, format="json")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{API}/v1/checkout/sessions",
            status=400,
            json={"error": {"type": "invalid_request_error", "message": "bad"}},
        )
        r = agent_client.post("/api/v1/wallet/topups", {"amount_cents": 500}, format="json")
    assert r.status_code == 502 and r.json()["error"]["code"] == "payment_provider_error"
    settings.STRIPE_SECRET_KEY = ""
    r = agent_client.post("/api/v1/wallet/topups", {"amount_cents": 500}, format="json")
    assert r.status_code == 503 and r.json()["error"]["code"] == "stripe_unavailable"


def test_publisher_earnings(publisher_client, publisher, agent):
    services.credit_topup(agent=agent, amount_nano=10**6, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=10**6, idempotency_key="b")
    for i in range(2):
        services.settle_load(
            license_ref="L", publisher=publisher, amount_nano=37_740,
            publisher_share=Decimal("0.8"), idempotency_key=f"s{i}",
        )
    r = publisher_client.get("/api/v1/earnings?days=7")
    assert r.status_code == 200
    body = r.json()
    assert len(body["days"]) == 7 and body["days"][-1]["loads"] == 2
    assert body["totals"] == {"loads": 2, "earned_nano": 60_384}
    assert body["payable_nano"] == 60_384 and body["unit"] == "nano_usd"
    assert publisher_client.get("/api/v1/earnings?days=0").status_code == 422


def test_ledger_errors_map_to_api_errors():
    assert to_api_error(InsufficientFunds()).status_code == 402
    assert to_api_error(InsufficientFunds()).code == "insufficient_funds"
    assert to_api_error(IdempotencyConflict()).status_code == 409
