"""Every leg of a load settlement, for amounts and shares that round.

Deterministic on purpose: the property test (test_properties.py) reaches a paid settlement
only when its random sequence happens to top up, buy and settle in that order.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection

from ledger import selectors, services
from ledger.models import AccountKind, Posting, Transaction
from marketplace.models import Role, User
from tests.support.accounts import make_user

from .invariants import assert_ledger_invariants

pytestmark = pytest.mark.django_db

CASES = [  # (amount, publisher share, compute)
    (37_740, Decimal("0.8"), 0),
    (1, Decimal("0.8"), 0),  # the publisher's floor is 0: the platform keeps the nano
    (1_000_003, Decimal("0.333333"), 2_500),
    (999, Decimal("1"), 7),
    (999, Decimal("0"), 0),
]


def _legs(tx: Transaction) -> dict[str, int]:
    return {p.account.key: p.amount for p in Posting.objects.filter(transaction=tx)
            .select_related("account")}  # fmt: skip


@pytest.mark.parametrize(("amount", "share", "compute"), CASES)
def test_settlement_posts_each_leg_once_and_balances(
    amount: int, share: Decimal, compute: int
) -> None:
    agent: User = make_user(Role.AGENT)
    publisher: User = make_user(Role.PUBLISHER)
    services.credit_topup(agent=agent, amount_nano=amount + compute, idempotency_key="top")
    services.purchase_license(agent=agent, license_ref="L1", amount_nano=amount,
                              idempotency_key="buy")  # fmt: skip
    revenue = selectors.system_balance(AccountKind.PLATFORM_REVENUE)
    compute_revenue = selectors.system_balance(AccountKind.PLATFORM_COMPUTE_REVENUE)

    tx = services.settle_load(
        license_ref="L1", publisher=publisher, amount_nano=amount, publisher_share=share,
        compute_nano=compute, idempotency_key="load:1",
    )  # fmt: skip

    publisher_part = int(amount * share)  # floor: amounts and shares are non-negative
    legs = _legs(tx)
    assert sum(legs.values()) == 0
    assert sorted(v for v in legs.values() if v) == sorted(
        v for v in (-amount, publisher_part, amount - publisher_part, -compute, compute) if v
    )
    assert selectors.escrow_balance("L1") == 0
    assert selectors.payable_balance(publisher) == publisher_part
    assert selectors.system_balance(AccountKind.PLATFORM_REVENUE) == (
        revenue + amount - publisher_part
    )
    assert selectors.system_balance(AccountKind.PLATFORM_COMPUTE_REVENUE) == (
        compute_revenue + compute
    )
    assert selectors.wallet_balance(agent) == 0
    # a retry returns the first transaction and posts nothing
    again = services.settle_load(
        license_ref="L1", publisher=publisher, amount_nano=amount, publisher_share=share,
        compute_nano=compute, idempotency_key="load:1",
    )  # fmt: skip
    assert again.pk == tx.pk
    assert Transaction.objects.filter(idempotency_key="load:1").count() == 1
    assert_ledger_invariants()
    with connection.cursor() as cur:
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the deferred zero-sum triggers fire now
