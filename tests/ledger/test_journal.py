"""The posting core (ledger/services/journal.py): the only way money is posted."""

from decimal import Decimal

import pytest
from django.db import IntegrityError, connection

from ledger import selectors, services
from ledger.errors import IdempotencyConflict, InsufficientFunds, LedgerError
from ledger.models import Posting, Transaction, TransactionKind
from ledger.services import journal
from marketplace.models import Role

from .conftest import make_user

pytestmark = pytest.mark.django_db


def _legs(tx: Transaction) -> dict[str, int]:
    return dict(
        Posting.objects.filter(transaction=tx).values_list("account__key", "amount")
    )


def test_the_database_function_path_is_gone():
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_proc WHERE proname = 'ledger_post'")
        assert cur.fetchone()[0] == 0
    assert not hasattr(services, "USE_PG_FAST_PATH")


def test_unbalanced_legs_are_refused_and_nothing_is_written(agent):
    wallet, clearing = journal.wallet(agent.pk), journal.system("stripe_clearing")

    entry = journal.Entry(kind=TransactionKind.TOPUP, legs=[(clearing, -5), (wallet, 6)])
    with pytest.raises(LedgerError, match="unbalanced"):
        journal.post(idempotency_key="u", fingerprint="f", entry=entry)
    assert not Transaction.objects.exists() and not Posting.objects.exists()


@pytest.mark.parametrize(
    "amount,share,compute,wallet_left,expected_charged",
    [
        (37_741, "0.8", 0, 1_000, 0),
        (37_741, "0.8", 1_000, 1_000, 1_000),
        (37_741, "0.8", 5_000, 1_000, 1_000),  # capped at the wallet
        (3, "0.333333", 7, 0, 0),  # nothing left to charge
        (9, "1", 1, 1_000, 1),
        (9, "0", 1, 1_000, 1),
        (0, "0.8", 300, 1_000, 300),  # a free load: compute only
    ],
)
def test_a_settlement_posts_exactly_its_legs(
    agent, publisher, amount, share, compute, wallet_left, expected_charged
):
    price = 100_000
    services.credit_topup(agent=agent, amount_nano=price + wallet_left, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=price, idempotency_key="b")
    tx = services.settle_load(
        license_ref="L", publisher=publisher, amount_nano=amount,
        publisher_share=Decimal(share), idempotency_key="s", agent=agent, compute_nano=compute,
    )  # fmt: skip
    to_publisher, to_platform = services.split_amount(amount, Decimal(share))
    expected = {
        "escrow:L": -amount,
        f"payable:{publisher.pk}": to_publisher,
        "platform:revenue": to_platform,
        f"wallet:{agent.pk}": -expected_charged,
        "platform:compute_revenue": expected_charged,
    }
    assert _legs(tx) == {key: value for key, value in expected.items() if value}
    assert tx.details["compute_charged_nano"] == expected_charged
    assert tx.details["compute_uncharged_nano"] == compute - expected_charged
    assert Transaction.objects.get(pk=tx.pk).details == tx.details


def test_replay_returns_the_stored_transaction_and_posts_nothing(agent, publisher):
    services.credit_topup(agent=agent, amount_nano=10**6, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=10**5, idempotency_key="b")
    kwargs = dict(
        license_ref="L", publisher=publisher, amount_nano=1_000,
        publisher_share=Decimal("0.8"), idempotency_key="s", compute_nano=10,
    )  # fmt: skip
    first = services.settle_load(**kwargs)
    before = Posting.objects.count()
    again = services.settle_load(**kwargs)
    assert (again.pk, again.details, again.memo) == (first.pk, first.details, first.memo)
    assert Posting.objects.count() == before


def test_an_escrow_belongs_to_one_agent_on_every_path(agent):
    other = make_user(Role.AGENT)
    services.credit_topup(agent=other, amount_nano=10, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=0, idempotency_key="b")
    with pytest.raises(LedgerError, match="belongs to another user"):
        services.purchase_license(agent=other, license_ref="L", amount_nano=1, idempotency_key="c")


def _post_with_the_key_taken_meanwhile(agent) -> None:
    """Post an egress whose idempotency key gets taken between the lock and the write."""
    wallet, revenue = journal.wallet(agent.pk), journal.system("platform_revenue")

    def decide(balances: dict) -> journal.Entry:
        with connection.cursor() as cur:
            cur.execute(
                "INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo,"
                " license_ref, document_ref, external_ref, details, created_at)"
                " VALUES ('taken', 'other', 'egress', '', '', '', '', '{}', now())"
            )
        return journal.Entry(
            kind=TransactionKind.EGRESS,
            legs=[(wallet, -40), (revenue, 40)],
        )

    journal.post_once(idempotency_key="taken", fingerprint="f", accounts=[wallet], decide=decide)


def test_a_write_refused_by_the_database_rolls_back_only_its_own_savepoint(agent):
    """Inside a caller's transaction, a write the database refuses surfaces inside the
    posting's savepoint: nothing of it stays, and the caller's transaction goes on."""
    services.credit_topup(agent=agent, amount_nano=100, idempotency_key="t")
    with pytest.raises(IntegrityError):
        _post_with_the_key_taken_meanwhile(agent)
    assert not Transaction.objects.filter(idempotency_key="taken").exists()
    assert services.record_egress(agent=agent, amount_nano=40, idempotency_key="e").pk
    assert Posting.objects.filter(account__key=f"wallet:{agent.pk}").count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_write_refused_by_the_database_rolls_back_its_transaction(agent):
    services.credit_topup(agent=agent, amount_nano=100, idempotency_key="t")
    with pytest.raises(IntegrityError):
        _post_with_the_key_taken_meanwhile(agent)
    assert connection.get_autocommit() and not connection.in_atomic_block
    assert not Transaction.objects.filter(idempotency_key="taken").exists()
    assert services.record_egress(agent=agent, amount_nano=40, idempotency_key="e").pk
    assert Posting.objects.filter(account__key=f"wallet:{agent.pk}").count() == 2


def test_a_payable_is_debited_only_under_its_lock_and_never_below_zero(agent, publisher):
    services.credit_topup(agent=agent, amount_nano=10**6, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=10**5, idempotency_key="b")
    services.settle_load(license_ref="L", publisher=publisher, amount_nano=1_000,
                         publisher_share=Decimal(1), idempotency_key="s")  # fmt: skip
    payable, clearing = journal.payable(publisher.pk), journal.system("stripe_clearing")

    def payout(amount: int) -> journal.Entry:
        legs = [(payable, -amount), (clearing, amount)]
        return journal.Entry(kind=TransactionKind.PAYOUT, legs=legs)

    with pytest.raises(LedgerError, match="without its lock"):
        journal.post(idempotency_key="p0", fingerprint="f", entry=payout(1))
    with pytest.raises(InsufficientFunds):
        journal.post_once(idempotency_key="p1", fingerprint="f", accounts=[payable],
                          decide=lambda balances: payout(balances[payable.key] + 1))  # fmt: skip
    journal.post_once(idempotency_key="p2", fingerprint="f", accounts=[payable],
                      decide=lambda balances: payout(balances[payable.key]))  # fmt: skip
    assert selectors.payable_balance(publisher) == 0
    assert not Transaction.objects.filter(idempotency_key__in=["p0", "p1"]).exists()


def test_a_settlement_without_compute_is_replayed_and_conflicts_on_the_same_key(
    agent, publisher
):
    services.credit_topup(agent=agent, amount_nano=10**6, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=10**5, idempotency_key="b")
    kwargs = dict(license_ref="L", publisher=publisher, amount_nano=1_000,
                  publisher_share=Decimal("0.8"), idempotency_key="s")  # fmt: skip
    first = services.settle_load(**kwargs)
    before = Posting.objects.count()
    assert services.settle_load(**kwargs).pk == first.pk
    with pytest.raises(IdempotencyConflict):
        services.settle_load(**{**kwargs, "amount_nano": 999})
    assert Posting.objects.count() == before
    assert selectors.escrow_balance("L") == 10**5 - 1_000
