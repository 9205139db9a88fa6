"""Settlement (beat task), payout review in the Django admin, reversals."""

from decimal import Decimal

import pytest
import responses

from ledger import selectors, services, tasks
from ledger.errors import PayoutStateError
from ledger.models import ConnectAccount, Payout, PayoutEvent, PayoutStatus, Posting, Tariff
from marketplace.models import Role

from .conftest import make_user
from .stripe_stubs import API, transfer

pytestmark = pytest.mark.django_db

CENT = 10**7
USD = 10**9


def earn(agent, publisher, amount_nano: int, tag: str) -> None:
    services.credit_topup(agent=agent, amount_nano=amount_nano, idempotency_key=f"t-{tag}")
    services.purchase_license(
        agent=agent, license_ref=f"L-{tag}", amount_nano=amount_nano, idempotency_key=f"b-{tag}"
    )
    services.settle_load(
        license_ref=f"L-{tag}", publisher=publisher, amount_nano=amount_nano,
        publisher_share=Decimal(1), idempotency_key=f"s-{tag}",
    )


def test_settle_payouts_task_creates_reviewed_payouts_above_threshold(agent, settings):
    settings.PAYOUT_THRESHOLD_NANO_USD = 10 * USD
    rich, poor = make_user(Role.PUBLISHER), make_user(Role.PUBLISHER)
    earn(agent, rich, 10 * USD + 123_456_789, "rich")  # 10.123456789 USD
    earn(agent, poor, 9 * USD, "poor")
    result = tasks.settle_payouts()
    payout = Payout.objects.get()
    assert result == {"created": [payout.pk], "retried": []}
    assert payout.publisher == rich and payout.status == PayoutStatus.PENDING_REVIEW
    assert payout.amount_nano == 1012 * CENT  # rounded down to cents
    assert tasks.settle_payouts()["created"] == []  # one open payout per publisher
    services.approve_payout(payout=payout, actor=None, send_transfer=False)
    assert selectors.payable_balance(rich) == 3_456_789  # the remainder stays payable


def test_payout_state_machine(agent, publisher, staff):
    earn(agent, publisher, 5 * USD, "a")
    payout = services.create_payout(publisher=publisher, amount_nano=2 * USD)
    with pytest.raises(PayoutStateError):
        services.create_payout(publisher=publisher, amount_nano=USD)
    with pytest.raises(PayoutStateError):
        services.mark_payout_failed(payout=payout, reason="x")
    services.reject_payout(payout=payout, actor=staff, note="looks wrong")
    with pytest.raises(PayoutStateError):
        services.approve_payout(payout=payout, actor=staff)
    assert selectors.payable_balance(publisher) == 5 * USD
    events = list(PayoutEvent.objects.filter(payout=payout).values_list("to_status", "actor"))
    assert events == [("pending_review", None), ("rejected", staff.pk)]


def test_approval_without_connect_account_fails_and_reverses(agent, publisher, staff,
                                                             django_capture_on_commit_callbacks):
    earn(agent, publisher, 3 * USD, "a")
    payout = services.create_payout(publisher=publisher)
    with django_capture_on_commit_callbacks(execute=True):
        services.approve_payout(payout=payout, actor=staff)
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.FAILED
    assert selectors.payable_balance(publisher) == 3 * USD


def test_admin_bulk_approve_sends_transfers(
    client, agent, staff, django_capture_on_commit_callbacks
):
    pubs = [make_user(Role.PUBLISHER) for _ in range(2)]
    payouts = []
    for i, pub in enumerate(pubs):
        ConnectAccount.objects.create(publisher=pub, stripe_account_id=f"acct_{i}")
        earn(agent, pub, (i + 1) * USD, f"p{i}")
        payouts.append(services.create_payout(publisher=pub))
    client.force_login(staff)
    r = client.get("/admin/ledger/payout/?status__exact=pending_review")
    assert r.status_code == 200 and b"Approve selected payouts" in r.content
    with responses.RequestsMock() as rsps:
        for i, p in enumerate(payouts):
            rsps.post(
                f"{API}/v1/transfers",
                json=transfer(f"tr_{i}", amount_cents=p.amount_cents, destination=f"acct_{i}",
                              payout_id=p.pk),
            )
        with django_capture_on_commit_callbacks(execute=True):
            r = client.post(
                "/admin/ledger/payout/?status__exact=pending_review",
                {"action": "approve_selected", "_selected_action": [p.pk for p in payouts]},
            )
        assert r.status_code == 302
        assert len(rsps.calls) == 2
    for p in payouts:
        p.refresh_from_db()
        assert p.status == PayoutStatus.PAID and p.stripe_transfer_id.startswith("tr_")
        trail = list(p.events.values_list("to_status", "actor"))
        assert trail == [("pending_review", None), ("approved", staff.pk), ("paid", None)]
        assert all(e.created_at for e in p.events.all())
        assert selectors.payable_balance(p.publisher) == 0
    # the payout page shows the audit trail
    r = client.get(f"/admin/ledger/payout/{payouts[0].pk}/change/")
    assert r.status_code == 200 and staff.email.encode() in r.content


def test_admin_bulk_reject(client, agent, staff):
    pubs = [make_user(Role.PUBLISHER) for _ in range(3)]
    payouts = []
    for i, pub in enumerate(pubs):
        earn(agent, pub, USD, f"r{i}")
        payouts.append(services.create_payout(publisher=pub))
    client.force_login(staff)
    r = client.post(
        "/admin/ledger/payout/",
        {"action": "reject_selected", "_selected_action": [p.pk for p in payouts]},
    )
    assert r.status_code == 302
    assert set(Payout.objects.values_list("status", flat=True)) == {"rejected"}
    assert PayoutEvent.objects.filter(to_status="rejected", actor=staff).count() == 3


def test_admin_journal_is_read_only_and_tariffs_editable(client, agent, publisher, staff):
    earn(agent, publisher, USD, "x")
    client.force_login(staff)
    posting = Posting.objects.first()
    assert client.get("/admin/ledger/posting/").status_code == 200
    assert client.get(f"/admin/ledger/posting/{posting.pk}/change/").status_code == 200
    assert client.get("/admin/ledger/posting/add/").status_code == 403
    assert client.post(f"/admin/ledger/posting/{posting.pk}/delete/").status_code == 403
    assert client.get("/admin/ledger/transaction/").status_code == 200
    assert client.get("/admin/ledger/account/").status_code == 200
    tariff = services.ensure_tariff(model_slug="tiny-qwen3")
    r = client.post(
        f"/admin/ledger/tariff/{tariff.pk}/change/",
        {
            "model_slug": "tiny-qwen3",
            "input_price_usd_per_mtok": "0.20",
            "output_price_usd_per_mtok": "0.40",
            "cache_read_multiplier": "0.1",
            "publisher_share": "0.75",
        },
    )
    assert r.status_code == 302, r.content[:2000]
    tariff = Tariff.objects.get(pk=tariff.pk)
    assert tariff.load_price_nano(3774) == 75_480 and tariff.publisher_share == Decimal("0.75")
    non_staff = make_user(Role.PUBLISHER)
    client.force_login(non_staff)
    assert client.get("/admin/ledger/payout/").status_code == 302  # to the admin login
