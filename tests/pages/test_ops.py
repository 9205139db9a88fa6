"""The operations console (staff): payouts awaiting review with the loads behind them, approve
(one clear message per outcome), reject with a reason the publisher sees, retry a transfer not
sent, run settlement now, ledger health."""

from __future__ import annotations

import pytest
import responses
from django.test import Client
from django.urls import reverse

from ledger import services
from ledger.models import ConnectAccount, Payout, PayoutStatus
from ledger.selectors import payable_balance
from tests.ledger.stripe_stubs import API, transfer
from tests.pages.conftest import NANO, fund, login_client, make_document, settled_load

pytestmark = pytest.mark.django_db


@pytest.fixture
def stripe_keys(settings):
    settings.STRIPE_SECRET_KEY = "sk_test_kvmarket_ops"
    settings.STRIPE_API_BASE = ""
    settings.STRIPE_MAX_NETWORK_RETRIES = 0


@pytest.fixture
def staff_client(staff_user) -> Client:
    return login_client(staff_user)


@pytest.fixture
def earned_payout(publisher_user, agent_user):
    """A payout pending review, for a publisher who earned it from two loads."""
    doc = make_document(publisher_user, title="Tide tables", price=3 * 10**9)  # $3 a load
    fund(agent_user, amount_nano=20 * NANO)
    settled_load(agent_user, doc)
    settled_load(agent_user, doc)
    return services.create_payout(publisher=publisher_user)


def test_console_is_for_staff_only(client: Client, publisher_client: Client) -> None:
    assert client.get(reverse("ops-console"))["Location"].startswith("/account/login")
    assert publisher_client.get(reverse("ops-console")).status_code == 403
    assert publisher_client.post(reverse("ops-settle")).status_code == 403


def test_pending_payout_shows_publisher_amount_connect_status_and_loads(
    staff_client: Client, earned_payout
) -> None:
    html = staff_client.get(reverse("ops-console")).content.decode()
    assert f'id="payout-{earned_payout.pk}"' in html
    assert "$4.80" in html  # 2 loads x $3 x 80%
    assert "not connected" in html and "2 loads" in html and "2 × Tide tables" in html
    assert "✓ Reconciled" in html
    assert "confirm('Approve payout" in html and "confirm('Reject payout" in html


def test_approve_without_a_stripe_account_is_refused_and_stays_pending(
    staff_client: Client, earned_payout
) -> None:
    r = staff_client.post(reverse("ops-payout-approve", args=[earned_payout.pk]), follow=True)
    html = r.content.decode()
    assert "was not approved" in html and "has no Stripe account" in html
    assert "Approved" not in html.split('id="pending-payouts"')[0]  # no contradictory message
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.PENDING_REVIEW


def test_approve_sends_the_transfer(
    staff_client: Client, earned_payout, publisher_user, stripe_keys
) -> None:
    ConnectAccount.objects.create(publisher=publisher_user, stripe_account_id="acct_ops",
                                  payouts_enabled=True)
    with responses.RequestsMock() as rsps:
        rsps.post(f"{API}/v1/transfers", json=transfer(
            "tr_ops", amount_cents=480, destination="acct_ops", payout_id=earned_payout.pk))
        r = staff_client.post(reverse("ops-payout-approve", args=[earned_payout.pk]),
                              follow=True)
    assert "approved: $4.80 sent" in r.content.decode()
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.PAID
    assert payable_balance(publisher_user) == 0


def test_a_transfer_not_sent_can_be_retried(
    staff_client: Client, earned_payout, publisher_user, stripe_keys
) -> None:
    ConnectAccount.objects.create(publisher=publisher_user, stripe_account_id="acct_ops")
    with responses.RequestsMock() as rsps:
        rsps.post(f"{API}/v1/transfers", status=500, json={"error": {"message": "down"}})
        r = staff_client.post(reverse("ops-payout-approve", args=[earned_payout.pk]),
                              follow=True)
    assert "is not sent yet" in r.content.decode()
    assert f'id="retry-{earned_payout.pk}"' in r.content.decode()
    with responses.RequestsMock() as rsps:
        rsps.post(f"{API}/v1/transfers", json=transfer(
            "tr_retry", amount_cents=480, destination="acct_ops", payout_id=earned_payout.pk))
        r = staff_client.post(reverse("ops-payout-retry", args=[earned_payout.pk]), follow=True)
    assert "sent (transfer tr_retry)" in r.content.decode()


def test_reject_needs_a_reason_which_the_publisher_sees(
    staff_client: Client, earned_payout, publisher_user
) -> None:
    url = reverse("ops-payout-reject", args=[earned_payout.pk])
    r = staff_client.post(url, {"reason": "  "}, follow=True)
    assert "give a reason" in r.content.decode()
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.PENDING_REVIEW
    staff_client.post(url, {"reason": "Loads from a test account."})
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.REJECTED
    assert payable_balance(publisher_user) == 4_800_000_000  # the money stays payable
    html = login_client(publisher_user).get(reverse("publisher-dashboard")).content.decode()
    assert f'id="my-payout-{earned_payout.pk}" data-status="rejected"' in html
    assert "Loads from a test account." in html


def test_run_settlement_now(staff_client: Client, publisher_user, agent_user, settings) -> None:
    settings.PAYOUT_THRESHOLD_NANO_USD = 10**9
    doc = make_document(publisher_user, price=3 * 10**9)
    fund(agent_user, amount_nano=10 * NANO)
    settled_load(agent_user, doc)
    r = staff_client.post(reverse("ops-settle"), follow=True)
    assert "Settlement created 1 payout(s) for review." in r.content.decode()
    assert Payout.objects.get().publisher == publisher_user
    r = staff_client.post(reverse("ops-settle"), follow=True)
    assert "found no publisher due a payout" in r.content.decode()


def test_a_failed_payout_can_be_put_up_for_review_again(
    staff_client: Client, earned_payout, publisher_user, stripe_keys
) -> None:
    ConnectAccount.objects.create(publisher=publisher_user, stripe_account_id="acct_gone")
    with responses.RequestsMock() as rsps:
        rsps.post(f"{API}/v1/transfers", status=400,
                  json={"error": {"type": "invalid_request_error", "message": "No such account"}})
        r = staff_client.post(reverse("ops-payout-approve", args=[earned_payout.pk]),
                              follow=True)
    html = r.content.decode()
    assert "could not be sent" in html and "back in" in html
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.FAILED
    assert payable_balance(publisher_user) == 4_800_000_000  # reversed
    assert f'id="repay-{earned_payout.pk}"' in html
    r = staff_client.post(reverse("ops-payout-repay", args=[earned_payout.pk]), follow=True)
    new = Payout.objects.exclude(pk=earned_payout.pk).get()
    assert new.status == PayoutStatus.PENDING_REVIEW and new.amount_nano == 4_800_000_000
    assert f"Payout #{new.pk} of $4.80 created for review" in r.content.decode()


def test_admin_approval_says_one_thing_per_payout(earned_payout) -> None:
    from marketplace.models import User

    staff_client = login_client(User.objects.create_superuser(email="root@example.test"))
    r = staff_client.post(
        "/admin/ledger/payout/",
        {"action": "approve_selected", "_selected_action": [earned_payout.pk]}, follow=True,
    )
    html = r.content.decode()
    assert "not approved: the publisher has no Stripe account" in html
    assert "Approved 1" not in html
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.PENDING_REVIEW
    assert "$4.80" in staff_client.get(
        f"/admin/ledger/payout/{earned_payout.pk}/change/").content.decode()  # dollars


def test_sandbox_payouts_are_simulated_end_to_end(
    staff_client: Client, earned_payout, publisher_user, settings
) -> None:
    settings.SANDBOX_MODE = True
    settings.STRIPE_SECRET_KEY = ""
    publisher = login_client(publisher_user)
    html = publisher.get(reverse("publisher-dashboard")).content.decode()
    assert "Connect a simulated payout account (sandbox)" in html
    r = publisher.post(reverse("publisher-connect"), follow=True)
    assert 'id="sandbox-payouts"' in r.content.decode()
    assert "sandbox (simulated)" in staff_client.get(reverse("ops-console")).content.decode()
    r = staff_client.post(reverse("ops-payout-approve", args=[earned_payout.pk]), follow=True)
    assert f"sent to {publisher_user.email} (transfer tr_sandbox_{earned_payout.pk})" in (
        r.content.decode())
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.PAID
    assert payable_balance(publisher_user) == 0


def test_no_simulated_payouts_outside_sandbox_mode(
    staff_client: Client, earned_payout, publisher_user, settings
) -> None:
    from ledger.errors import SandboxDisabled

    settings.SANDBOX_MODE = False
    settings.STRIPE_SECRET_KEY = ""
    with pytest.raises(SandboxDisabled):
        services.connect_sandbox_account(publisher=publisher_user)
    ConnectAccount.objects.create(publisher=publisher_user,
                                  stripe_account_id=f"acct_sandbox_{publisher_user.pk}")
    r = staff_client.post(reverse("ops-payout-approve", args=[earned_payout.pk]), follow=True)
    assert "is not sent yet" in r.content.decode()  # a real transfer needs Stripe
    earned_payout.refresh_from_db()
    assert earned_payout.status == PayoutStatus.APPROVED
