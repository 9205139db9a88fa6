"""The agent console: wallet, top-up, keys, licenses, usage and wallet history."""

from __future__ import annotations

import responses
from django.urls import reverse

from tests.ledger.stripe_stubs import checkout_session
from tests.pages.conftest import NANO, fund, make_document, settled_load
from tests.support.accounts import make_api_key


def test_console_shows_wallet_keys_licenses_and_usage(
    agent_client, agent_user, publisher_user
) -> None:
    make_api_key(agent_user, name="laptop")
    doc = make_document(publisher_user, n_tokens=1000, price=1_000_000, title="Skerry Point")
    fund(agent_user, amount_nano=2 * NANO)
    license, load = settled_load(agent_user, doc, loads=3)
    r = agent_client.get(reverse("agent-console"))
    html = r.content.decode()
    assert r.status_code == 200
    assert 'id="wallet-balance"' in html
    assert "laptop" in html and reverse("api-keys") in html
    # licenses: document, loads left, status
    assert "Skerry Point" in html and "2 / 3" in html and "active" in html
    # usage: the load with its tokens and charges
    assert "1,000" in html and ">12<" in html and ">3<" in html
    assert "$0.001" in html
    # wallet history: the top-up and the purchase
    assert "+$2.00" in html and "-$0.003" in html


def test_topup_without_stripe_tells_the_agent_without_operator_details(
    agent_client, stripe_off
) -> None:
    r = agent_client.post(reverse("agent-topup"), {"amount": "10"}, follow=True)
    assert r.redirect_chain[-1][0] == reverse("agent-console")
    html = r.content.decode()
    assert "Top-ups are not available right now. Nothing was charged." in html
    assert "STRIPE_SECRET_KEY" not in html and "operator" not in html


def test_topup_redirects_to_checkout(agent_client, agent_user, stripe_on) -> None:
    from ledger.models import TopUp

    session = checkout_session("cs_pages_1", amount_cents=1250, agent_id=agent_user.pk,
                               paid=False)
    with responses.RequestsMock() as rsps:
        rsps.post("https://api.stripe.com/v1/checkout/sessions", json=session)
        r = agent_client.post(reverse("agent-topup"), {"amount": "12.50"})
        body = rsps.calls[0].request.body
    assert r.status_code == 302 and r["Location"] == session["url"]
    assert "unit_amount%5D=1250" in body or "unit_amount]=1250" in body
    assert TopUp.objects.filter(agent=agent_user).exists()


def test_topup_invalid_amount(agent_client, stripe_on) -> None:
    for amount in ("", "-5", "0.5", "abc", "12.345"):
        r = agent_client.post(reverse("agent-topup"), {"amount": amount})
        assert r.status_code == 400, amount
        assert 'class="errorlist' in r.content.decode()
