"""Stripe gateway, offline: outgoing HTTP stubbed with `responses` (the SDK's RequestsClient
runs for real), incoming webhooks signed with the SDK's own signature helper."""

import json
from decimal import Decimal
from urllib.parse import parse_qs

import pytest
import requests
import responses

from ledger import selectors, services
from ledger.errors import PaymentProviderError
from ledger.models import (
    ConnectAccount,
    Payout,
    PayoutStatus,
    StripeEvent,
    TopUp,
    TopUpStatus,
    Transaction,
)

from .stripe_stubs import API, checkout_session, deliver, event, transfer

pytestmark = pytest.mark.django_db

CENT = 10**7


@pytest.fixture
def topup_session(agent):
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{API}/v1/checkout/sessions",
            json=checkout_session("cs_test_1", amount_cents=2500, agent_id=agent.pk, paid=False),
        )
        url = services.create_topup_checkout(
            agent=agent, amount_cents=2500, success_url="https://x/ok", cancel_url="https://x/no"
        )
        sent = parse_qs(rsps.calls[0].request.body)
        assert rsps.calls[0].request.headers["Authorization"] == "Bearer sk_test_kvmarket"
    assert url == "https://checkout.stripe.com/c/pay/cs_test_1"
    assert sent["line_items[0][price_data][unit_amount]"] == ["2500"]
    assert sent["client_reference_id"] == [str(agent.pk)]
    assert sent["mode"] == ["payment"]
    return TopUp.objects.get(session_id="cs_test_1")


def test_webhook_delivered_three_times_credits_once(client, agent, topup_session):
    paid = checkout_session("cs_test_1", amount_cents=2500, agent_id=agent.pk, paid=True)
    evt = event("evt_1", "checkout.session.completed", paid)
    responses_ = [deliver(client, evt) for _ in range(3)]
    assert [r.status_code for r in responses_] == [200, 200, 200]
    assert [r.json()["result"].split()[0] for r in responses_] == [
        "credited", "duplicate", "duplicate"
    ]
    assert selectors.wallet_balance(agent) == 2500 * CENT
    assert StripeEvent.objects.count() == 1
    assert Transaction.objects.filter(kind="topup").count() == 1
    topup_session.refresh_from_db()
    assert topup_session.status == TopUpStatus.PAID and topup_session.transaction_id


def test_async_payment_credits_once_per_session(client, agent, topup_session):
    unpaid = checkout_session("cs_test_1", amount_cents=2500, agent_id=agent.pk, paid=False)
    paid = checkout_session("cs_test_1", amount_cents=2500, agent_id=agent.pk, paid=True)
    assert deliver(client, event("evt_a", "checkout.session.completed", unpaid)).status_code == 200
    assert selectors.wallet_balance(agent) == 0  # not paid yet: nothing credited
    deliver(client, event("evt_b", "checkout.session.async_payment_succeeded", paid))
    deliver(client, event("evt_c", "checkout.session.completed", paid))  # other id, same session
    assert selectors.wallet_balance(agent) == 2500 * CENT
    assert StripeEvent.objects.count() == 3


def test_webhook_rejects_bad_signature_and_garbage(client, agent, topup_session):
    paid = checkout_session("cs_test_1", amount_cents=2500, agent_id=agent.pk, paid=True)
    r = deliver(client, event("evt_1", "checkout.session.completed", paid), sign=False)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_signature"
    r = deliver(client, event("evt_1", "checkout.session.completed", paid), secret="whsec_other")
    assert r.status_code == 400
    r = client.post("/stripe/webhook", data="{}", content_type="application/json")
    assert r.status_code == 400
    assert client.get("/stripe/webhook").status_code == 405
    assert selectors.wallet_balance(agent) == 0 and not StripeEvent.objects.exists()


def test_connect_onboarding_creates_the_account_once(publisher):
    with responses.RequestsMock() as rsps:
        rsps.post(f"{API}/v1/accounts", json={"id": "acct_1", "object": "account"})
        rsps.post(
            f"{API}/v1/account_links",
            json={"object": "account_link", "url": "https://connect.stripe.com/setup/e/acct_1/x"},
        )
        url = services.connect_onboarding_link(
            publisher=publisher, return_url="https://x/back", refresh_url="https://x/again"
        )
        assert parse_qs(rsps.calls[0].request.body)["type"] == ["express"]
        assert parse_qs(rsps.calls[1].request.body)["account"] == ["acct_1"]
        url2 = services.connect_onboarding_link(
            publisher=publisher, return_url="https://x/back", refresh_url="https://x/again"
        )
        assert [c.request.url for c in rsps.calls].count(f"{API}/v1/accounts") == 1
    assert url == url2 == "https://connect.stripe.com/setup/e/acct_1/x"
    assert ConnectAccount.objects.get(publisher=publisher).stripe_account_id == "acct_1"


def _approved_payout(agent, publisher, cents: int = 1234) -> Payout:
    ConnectAccount.objects.create(publisher=publisher, stripe_account_id="acct_pub")
    services.credit_topup(agent=agent, amount_nano=10**11, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=10**11, idempotency_key="b")
    services.settle_load(
        license_ref="L", publisher=publisher, amount_nano=cents * CENT + 5,
        publisher_share=Decimal(1), idempotency_key="s",
    )
    payout = services.create_payout(publisher=publisher)
    assert payout.amount_nano == cents * CENT
    return services.approve_payout(payout=payout, actor=None, send_transfer=False)


def test_transfer_retried_sends_once(agent, publisher):
    payout = _approved_payout(agent, publisher)
    url = f"{API}/v1/transfers"
    body = transfer("tr_1", amount_cents=1234, destination="acct_pub", payout_id=payout.pk)
    with responses.RequestsMock() as rsps:
        rsps.post(url, body=requests.exceptions.ConnectionError("connection reset"))
        rsps.post(url, json={"error": {"type": "api_error", "message": "boom"}}, status=500)
        rsps.post(url, json=body)
        for _ in range(2):  # network failure, then a Stripe 500: still approved, retryable
            with pytest.raises(PaymentProviderError):
                services.send_payout_transfer(payout_id=payout.pk)
            assert Payout.objects.get(pk=payout.pk).status == PayoutStatus.APPROVED
        assert services.send_payout_transfer(payout_id=payout.pk).status == PayoutStatus.PAID
        services.send_payout_transfer(payout_id=payout.pk)  # already paid: no HTTP call
        keys = [c.request.headers["Idempotency-Key"] for c in rsps.calls]
    assert keys == [f"payout-{payout.pk}"] * 3  # every attempt carries the payout's key
    payout.refresh_from_db()
    assert payout.stripe_transfer_id == "tr_1"
    assert list(payout.events.values_list("to_status", flat=True)) == [
        "pending_review", "approved", "paid"
    ]
    assert selectors.payable_balance(publisher) == 5  # the sub-cent remainder stays payable


def test_transfer_refused_fails_and_reverses(agent, publisher):
    payout = _approved_payout(agent, publisher)
    assert selectors.payable_balance(publisher) == 5
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{API}/v1/transfers",
            status=400,
            json={"error": {"type": "invalid_request_error", "message": "No such destination"}},
        )
        result = services.send_payout_transfer(payout_id=payout.pk)
    assert result.status == PayoutStatus.FAILED
    assert "No such destination" in result.failure_reason
    assert selectors.payable_balance(publisher) == 1234 * CENT + 5
    assert result.reversal_transaction.kind == "payout_reversal"


def test_transfer_reversed_webhook_reverses_payout(client, agent, publisher):
    payout = _approved_payout(agent, publisher)
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{API}/v1/transfers",
            json=transfer("tr_9", amount_cents=1234, destination="acct_pub", payout_id=payout.pk),
        )
        services.send_payout_transfer(payout_id=payout.pk)
    reversed_ = transfer("tr_9", amount_cents=1234, destination="acct_pub", payout_id=payout.pk)
    reversed_["reversed"] = True
    deliver(client, event("evt_r", "transfer.reversed", reversed_))
    deliver(client, event("evt_r", "transfer.reversed", reversed_))
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.FAILED
    assert selectors.payable_balance(publisher) == 1234 * CENT + 5


def test_account_updated_webhook(client, publisher):
    ConnectAccount.objects.create(publisher=publisher, stripe_account_id="acct_2")
    deliver(client, event("evt_u", "account.updated", {"id": "acct_2", "payouts_enabled": True}))
    assert ConnectAccount.objects.get(publisher=publisher).payouts_enabled


def test_webhook_without_secret_is_unavailable(client, settings):
    settings.STRIPE_WEBHOOK_SECRET = ""
    r = client.post("/stripe/webhook", data=json.dumps({}), content_type="application/json")
    assert r.status_code == 503
