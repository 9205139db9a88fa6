"""Property test (hypothesis): random sequences of ledger operations, including retries with
the same idempotency key, keep every invariant, and balances match a simple Python model.

Each example runs inside a savepoint that is rolled back; at its end SET CONSTRAINTS ALL
IMMEDIATE fires PostgreSQL's deferred zero-sum checks for everything it posted.
"""

import os
from decimal import Decimal

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ledger import selectors, services
from ledger.errors import InsufficientFunds
from ledger.models import NANO_PER_CENT, Transaction
from marketplace.models import Role

from .conftest import make_user
from .invariants import assert_ledger_invariants

pytestmark = pytest.mark.django_db

AGENTS, PUBLISHERS, LICENSES = 2, 2, 3
amounts = st.integers(min_value=0, max_value=3 * 10**7)
shares = st.sampled_from([Decimal("0.8"), Decimal("0.333333"), Decimal("1"), Decimal("0")])

ops = st.one_of(
    st.tuples(st.just("topup"), st.integers(0, AGENTS - 1), amounts.filter(bool)),
    st.tuples(st.just("purchase"), st.integers(0, LICENSES - 1), amounts),
    st.tuples(
        st.just("settle"), st.integers(0, LICENSES - 1), st.integers(0, PUBLISHERS - 1),
        amounts, shares, st.integers(0, 10**6),
    ),
    st.tuples(st.just("egress"), st.integers(0, AGENTS - 1), amounts),
    st.tuples(st.just("refund"), st.integers(0, LICENSES - 1)),
    st.tuples(st.just("payout"), st.integers(0, PUBLISHERS - 1), st.sampled_from(
        ["reject", "approve", "approve_fail"])),
    st.tuples(st.just("retry"), st.integers(0, 10**6)),
)


class _Rollback(Exception):
    pass


def _run(sequence) -> None:
    agents = [make_user(Role.AGENT) for _ in range(AGENTS)]
    pubs = [make_user(Role.PUBLISHER) for _ in range(PUBLISHERS)]
    owner = [agents[i % AGENTS] for i in range(LICENSES)]
    wallet = [0] * AGENTS
    escrow = [0] * LICENSES
    payable = [0] * PUBLISHERS
    opened = [False] * LICENSES  # an escrow exists once a license was bought
    done: list[tuple] = []  # (callable, kwargs, tx id) of successful money calls, for retries
    n = 0

    def call(fn, **kwargs):
        nonlocal n
        n += 1
        kwargs["idempotency_key"] = f"k{n}"
        result = fn(**kwargs)
        if result is not None:
            done.append((fn, kwargs, result.pk))
        return result

    for op in sequence:
        kind = op[0]
        if kind == "topup":
            _, a, amt = op
            call(services.credit_topup, agent=agents[a], amount_nano=amt)
            wallet[a] += amt
        elif kind == "purchase":
            _, lic, amt = op
            a = agents.index(owner[lic])
            try:
                call(services.purchase_license, agent=owner[lic], license_ref=f"L{lic}",
                     amount_nano=amt)
                assert wallet[a] >= amt
                opened[lic] = True
                wallet[a] -= amt
                escrow[lic] += amt
            except InsufficientFunds:
                assert wallet[a] < amt
        elif kind == "settle":
            _, lic, p, amt, share, compute = op
            a = agents.index(owner[lic])
            try:
                call(services.settle_load, license_ref=f"L{lic}", publisher=pubs[p],
                     amount_nano=amt, publisher_share=share, compute_nano=compute)
                assert escrow[lic] >= amt and (opened[lic] or amt == 0)
                escrow[lic] -= amt
                payable[p] += int(share * amt)
                if opened[lic]:  # compute is charged to the license's buyer (the default)
                    wallet[a] -= min(compute, wallet[a])
            except InsufficientFunds:
                assert escrow[lic] < amt or (not opened[lic] and amt > 0)
        elif kind == "egress":
            _, a, amt = op
            try:
                call(services.record_egress, agent=agents[a], amount_nano=amt)
                wallet[a] -= amt
            except InsufficientFunds:
                assert wallet[a] < amt
        elif kind == "refund":
            _, lic = op
            a = agents.index(owner[lic])
            tx = call(services.refund_escrow, license_ref=f"L{lic}", agent=owner[lic])
            assert (tx is None) == (escrow[lic] == 0)
            wallet[a] += escrow[lic]
            escrow[lic] = 0
        elif kind == "payout":
            _, p, outcome = op
            if payable[p] < NANO_PER_CENT:
                continue
            payout = services.create_payout(publisher=pubs[p])
            assert payout.amount_nano == payable[p] - payable[p] % NANO_PER_CENT
            if outcome == "reject":
                services.reject_payout(payout=payout, actor=None)
            else:
                services.approve_payout(payout=payout, actor=None, send_transfer=False)
                if outcome == "approve_fail":
                    services.mark_payout_failed(payout=payout, reason="test")
                else:
                    payable[p] -= payout.amount_nano
                    # close it as paid so the next payout can open (Stripe not involved here)
                    type(payout).objects.filter(pk=payout.pk).update(status="paid")
        elif kind == "retry" and done:
            fn, kwargs, tx_id = done[op[1] % len(done)]
            before = Transaction.objects.count()
            assert fn(**kwargs).pk == tx_id  # the first result, nothing posted again
            assert Transaction.objects.count() == before
        # after every step: the database agrees with the model and the invariants hold
        assert [selectors.wallet_balance(x) for x in agents] == wallet
        assert [selectors.escrow_balance(f"L{i}") for i in range(LICENSES)] == escrow
        assert [selectors.payable_balance(x) for x in pubs] == payable
        assert min(wallet + escrow + payable) >= 0
    assert_ledger_invariants()
    with connection.cursor() as cur:
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # fire the deferred zero-sum triggers


@settings(
    max_examples=int(os.environ.get("LEDGER_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=st.lists(ops, min_size=1, max_size=20))
# Random sequences reach a paid settlement only when they top up, buy and settle in that order:
# these run on every run, whatever hypothesis draws.
@example(sequence=[
    ("topup", 0, 3 * 10**7), ("purchase", 0, 2 * 10**7),
    ("settle", 0, 0, 37_741, Decimal("0.8"), 0),
    ("settle", 0, 1, 1_000_003, Decimal("0.333333"), 2_500),
    ("settle", 0, 0, 999, Decimal("1"), 10**6), ("settle", 0, 1, 999, Decimal("0"), 0),
    ("retry", 2), ("refund", 0), ("payout", 1, "approve"),
])
@example(sequence=[
    ("topup", 1, 10**7), ("purchase", 1, 10**7), ("settle", 1, 0, 10**7, Decimal("0.8"), 5),
    ("settle", 1, 0, 1, Decimal("0.8"), 0), ("egress", 1, 1), ("retry", 1),
])
def test_random_operation_sequences_keep_invariants(sequence):
    try:
        with transaction.atomic():
            _run(sequence)
            raise _Rollback
    except _Rollback:
        pass
