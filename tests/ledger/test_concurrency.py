"""Races on PostgreSQL: threads, each with its own database connection, committing for real."""

import threading
from collections import Counter
from decimal import Decimal

import pytest
from django.db import connection

from ledger import selectors, services
from ledger.errors import InsufficientFunds
from ledger.models import Account, AccountKind, Transaction
from marketplace.models import Role

from .conftest import insert_unbalanced_transaction, make_user
from .invariants import assert_ledger_invariants

pytestmark = pytest.mark.django_db(transaction=True)


def run_threads(n: int, target) -> list:
    """Start n threads together (barrier); each closes its own DB connection at the end."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def wrapper(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=wrapper, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    return results


def test_32_concurrent_purchases_from_a_wallet_that_affords_10():
    agent = make_user(Role.AGENT)
    price = 37_740
    services.credit_topup(agent=agent, amount_nano=10 * price, idempotency_key="topup")

    def buy(i: int):
        return services.purchase_license(
            agent=agent, license_ref=f"lic-{i}", amount_nano=price, idempotency_key=f"buy-{i}"
        )

    results = run_threads(32, buy)
    kinds = Counter(type(r).__name__ for r in results)
    assert kinds == {"Transaction": 10, "InsufficientFunds": 22}, kinds
    assert all(isinstance(r, (Transaction, InsufficientFunds)) for r in results)
    assert selectors.wallet_balance(agent) == 0
    assert not Account.objects.filter(balance__lt=0).exists()
    assert sum(selectors.escrow_balance(f"lic-{i}") for i in range(32)) == 10 * price
    assert_ledger_invariants()


def test_1000_concurrent_load_settlements_are_exact():
    agent = make_user(Role.AGENT)
    publisher = make_user(Role.PUBLISHER)
    price, share = 37_740, Decimal("0.8")
    extra = 12_345
    services.credit_topup(
        agent=agent, amount_nano=1000 * price + extra + 10**6, idempotency_key="t"
    )
    services.purchase_license(
        agent=agent, license_ref="hot", amount_nano=1000 * price + extra, idempotency_key="b"
    )

    def settle(i: int) -> int:
        done = 0
        for j in range(125):
            n = i * 125 + j
            for _attempt in range(2 if j % 25 == 0 else 1):  # some client retries, same key
                services.settle_load(
                    license_ref="hot", publisher=publisher, amount_nano=price,
                    publisher_share=share, idempotency_key=f"load-{n}",
                    agent=agent, compute_nano=1_000 if n % 2 else 0,
                )
            done += 1
        return done

    results = run_threads(8, settle)
    assert results == [125] * 8, results
    assert Transaction.objects.filter(kind="load_settlement").count() == 1000
    assert selectors.escrow_balance("hot") == extra
    assert selectors.payable_balance(publisher) == 1000 * 30_192
    assert selectors.system_balance(AccountKind.PLATFORM_REVENUE) == 1000 * 7_548
    assert selectors.system_balance(AccountKind.PLATFORM_COMPUTE_REVENUE) == 500 * 1_000
    assert selectors.wallet_balance(agent) == 10**6 - 500 * 1_000
    assert_ledger_invariants()


def test_same_idempotency_key_racing_posts_once():
    agent = make_user(Role.AGENT)

    def credit(i: int):
        return services.credit_topup(agent=agent, amount_nano=777, idempotency_key="same-key")

    results = run_threads(8, credit)
    assert all(isinstance(r, Transaction) for r in results), results
    assert len({r.pk for r in results}) == 1
    assert selectors.wallet_balance(agent) == 777
    assert_ledger_invariants()


def test_deferred_zero_sum_trigger_rejects_unbalanced_commit():
    from django.db import IntegrityError, transaction

    agent = make_user(Role.AGENT)
    services.credit_topup(agent=agent, amount_nano=5, idempotency_key="t")
    wallet = Account.objects.get(key=f"wallet:{agent.pk}")
    with pytest.raises(IntegrityError, match="sum to"):
        with transaction.atomic():  # the check runs at COMMIT (deferred constraint trigger)
            with connection.cursor() as cur:
                insert_unbalanced_transaction(cur, wallet.pk)
    assert not Transaction.objects.filter(idempotency_key="raw").exists()


def test_settlements_for_one_publisher_do_not_wait_on_each_other():
    """A settlement (with compute, as the charge path does) commits while another for the same
    publisher is still open in its caller's transaction: a payable is credited without a row
    lock, so a lock wait would hit the lock timeout and fail this test."""
    from django.db import transaction

    publisher = make_user(Role.PUBLISHER)
    agents = [make_user(Role.AGENT) for _ in range(2)]
    for i, agent in enumerate(agents):
        services.credit_topup(agent=agent, amount_nano=10**6, idempotency_key=f"t{i}")
        services.purchase_license(
            agent=agent, license_ref=f"L{i}", amount_nano=10**5, idempotency_key=f"b{i}"
        )

    def settle(i: int, key: str) -> None:
        services.settle_load(
            license_ref=f"L{i}", publisher=publisher, amount_nano=1_000,
            publisher_share=Decimal("0.8"), idempotency_key=key, agent=agents[i],
            compute_nano=10,
        )  # fmt: skip

    settle(0, "first")  # creates the payable (a new account's creator holds its key until commit)
    settled, release = threading.Event(), threading.Event()

    def first() -> None:
        try:
            with transaction.atomic():
                settle(0, "open")
                settled.set()
                assert release.wait(timeout=30)
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert settled.wait(timeout=30)
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '500ms'")
            settle(1, "other")
    finally:
        release.set()
        thread.join(timeout=30)
    assert selectors.payable_balance(publisher) == 3 * 800
    assert_ledger_invariants()
