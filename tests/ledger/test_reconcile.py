"""manage.py reconcile: exit 0 when the books agree, 1 on any discrepancy."""

from decimal import Decimal

import pytest
import responses
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from ledger import services
from ledger.models import Account, ConnectAccount

from .stripe_stubs import API, checkout_session, stripe_list, transfer

pytestmark = pytest.mark.django_db

CENT = 10**7


@pytest.fixture
def books(agent, publisher):
    """A credited top-up (cs_1, 50 USD) and a paid payout (tr_1, 12.34 USD)."""
    services.credit_topup(
        agent=agent, amount_nano=5000 * CENT, idempotency_key="stripe-checkout:cs_1",
        external_ref="cs_1",
    )
    services.purchase_license(agent=agent, license_ref="L", amount_nano=5000 * CENT,
                              idempotency_key="b")
    services.settle_load(license_ref="L", publisher=publisher, amount_nano=1234 * CENT,
                         publisher_share=Decimal(1), idempotency_key="s")
    ConnectAccount.objects.create(publisher=publisher, stripe_account_id="acct_1")
    payout = services.create_payout(publisher=publisher)
    services.approve_payout(payout=payout, actor=None, send_transfer=False)
    tr = transfer("tr_1", amount_cents=1234, destination="acct_1", payout_id=payout.pk)
    with responses.RequestsMock() as rsps:
        rsps.post(f"{API}/v1/transfers", json=tr)
        services.send_payout_transfer(payout_id=payout.pk)
    return {"agent": agent, "transfer": tr}


def stub_stripe(rsps, *, transfers, sessions) -> None:
    rsps.get(f"{API}/v1/transfers", json=stripe_list("/v1/transfers", transfers))
    rsps.get(f"{API}/v1/checkout/sessions", json=stripe_list("/v1/checkout/sessions", sessions))


def run(*args) -> int:
    try:
        call_command("reconcile", *args)
    except CommandError as exc:
        return exc.returncode
    return 0


def test_clean_books_exit_0(books):
    session = checkout_session("cs_1", amount_cents=5000, agent_id=books["agent"].pk, paid=True)
    with responses.RequestsMock() as rsps:
        stub_stripe(rsps, transfers=[books["transfer"]], sessions=[session])
        assert run() == 0
    assert run("--skip-stripe") == 0


def test_stripe_mismatches_exit_1(books):
    agent = books["agent"]
    good = checkout_session("cs_1", amount_cents=5000, agent_id=agent.pk, paid=True)
    stray = transfer("tr_x", amount_cents=1, destination="acct_1", payout_id=0)
    uncredited = checkout_session("cs_2", amount_cents=700, agent_id=agent.pk, paid=True)
    for transfers, sessions in [
        ([books["transfer"], stray], [good]),  # a transfer the ledger does not know
        ([], [good]),  # a paid payout whose transfer Stripe does not have
        ([{**books["transfer"], "amount": 1235}], [good]),  # amount differs
        ([books["transfer"]], [good, uncredited]),  # a paid top-up never credited
        ([books["transfer"]], [{**good, "amount_total": 5001}]),  # credited amount differs
        ([books["transfer"]], []),  # a credit with no paid session
    ]:
        with responses.RequestsMock() as rsps:
            stub_stripe(rsps, transfers=transfers, sessions=sessions)
            assert run() == 1, (transfers, sessions)


def test_tampered_balance_exit_1(books):
    with connection.cursor() as cur:
        cur.execute("UPDATE ledger_account SET balance = balance + 1 WHERE kind = 'agent_wallet'")
    assert run("--skip-stripe") == 1
    with connection.cursor() as cur:  # put it back for the end-of-test invariant check
        cur.execute("UPDATE ledger_account SET balance = balance - 1 WHERE kind = 'agent_wallet'")


def test_negative_payable_exit_1(books, publisher):
    """A payable has no stored balance: reconcile checks the sum of its postings."""
    payable = Account.objects.get(key=f"payable:{publisher.pk}")
    revenue = Account.objects.get(key="platform:revenue")

    def post(key: str, amount: int) -> None:  # raw, balanced: payable += amount
        with connection.cursor() as cur:
            cur.execute(
                "INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo,"
                " license_ref, document_ref, external_ref, details, created_at)"
                " VALUES (%s, '', 'payout', '', '', '', '', '{}', now()) RETURNING id",
                [key],
            )
            tx_id = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO ledger_posting (transaction_id, account_id, amount, created_at)"
                " VALUES (%s, %s, %s, now()), (%s, %s, %s, now())",
                [tx_id, payable.pk, amount, tx_id, revenue.pk, -amount],
            )

    assert run("--skip-stripe") == 0
    post("raw-debit", -5)
    assert run("--skip-stripe") == 1
    post("raw-credit", 5)  # whole again for the end-of-test invariant check
