"""The PostgreSQL one-round-trip path (ledger_post(), migration 0004) and the portable ORM
path post exactly the same transactions for the same inputs."""

from decimal import Decimal

import pytest
from django.db import connection, transaction

from ledger import services
from ledger.errors import IdempotencyConflict, InsufficientFunds, LedgerError
from ledger.models import Posting, Transaction
from marketplace.models import Role

from .conftest import make_user

pytestmark = pytest.mark.django_db


class _Rollback(Exception):
    pass


def _script(agent, other, publisher):
    """A sequence of calls covering every service on the fast path and its edge cases."""
    s = services
    return [
        (s.credit_topup, dict(agent=agent, amount_nano=1_000_000, external_ref="cs_1")),
        (s.credit_topup, dict(agent=other, amount_nano=50)),
        (s.purchase_license, dict(agent=agent, license_ref="L", amount_nano=500_000)),
        (s.purchase_license, dict(agent=agent, license_ref="F", amount_nano=0)),
        (s.purchase_license, dict(agent=other, license_ref="L", amount_nano=1)),  # not theirs
        (s.purchase_license, dict(agent=other, license_ref="M", amount_nano=51)),  # too poor
        (s.settle_load, dict(license_ref="L", publisher=publisher, amount_nano=37_741,
                             publisher_share=Decimal("0.8"), agent=agent, compute_nano=1_000,
                             memo="m", document_ref="document:1")),
        (s.settle_load, dict(license_ref="L", publisher=publisher, amount_nano=3,
                             publisher_share=Decimal("0.333333"))),
        (s.settle_load, dict(license_ref="L", publisher=publisher, amount_nano=10,
                             publisher_share=Decimal("0.8"), compute_nano=10**9)),  # capped
        (s.settle_load, dict(license_ref="L", publisher=publisher, amount_nano=10**9,
                             publisher_share=Decimal("0.8"))),  # escrow too small
        (s.settle_load, dict(license_ref="nope", publisher=publisher, amount_nano=1,
                             publisher_share=Decimal("0.8"))),  # no escrow
        (s.settle_load, dict(license_ref="never-bought", publisher=publisher, amount_nano=0,
                             publisher_share=Decimal("0.8"), agent=other, compute_nano=30)),
        (s.record_egress, dict(agent=other, amount_nano=5, license_ref="L")),
        (s.record_egress, dict(agent=other, amount_nano=0)),
        (s.record_egress, dict(agent=other, amount_nano=10**6)),  # too poor
        (s.refund_escrow, dict(license_ref="L", agent=agent)),
    ]


def _snapshot(agent, other, publisher, fast: bool, monkeypatch) -> tuple[list, list]:
    monkeypatch.setattr(services, "USE_PG_FAST_PATH", fast)
    outcomes: list = []
    rows: list = []
    try:
        with transaction.atomic():
            for n, (fn, kwargs) in enumerate(_script(agent, other, publisher)):
                key = f"eq-{n}"
                try:
                    tx = fn(idempotency_key=key, **kwargs)
                    again = fn(idempotency_key=key, **kwargs)  # replay: the first result
                    assert again.pk == tx.pk and again.details == tx.details
                    outcomes.append(
                        ("ok", tx.kind, tx.memo, tx.details, tx.license_ref, tx.document_ref,
                         tx.external_ref, tx.fingerprint)
                    )
                except (InsufficientFunds, LedgerError) as exc:
                    outcomes.append((type(exc).__name__,))
            with pytest.raises(IdempotencyConflict):
                services.credit_topup(agent=agent, amount_nano=2, idempotency_key="eq-0")
            for tx in Transaction.objects.filter(idempotency_key__startswith="eq-").order_by("id"):
                db_view = (
                    "ok", tx.kind, tx.memo, tx.details, tx.license_ref, tx.document_ref,
                    tx.external_ref, tx.fingerprint,
                )
                assert db_view in outcomes  # the returned object equals the stored row
                rows.append(
                    (tx.idempotency_key, tx.kind, tx.details, [
                        (p.account.key, p.amount, p.balance_after)
                        for p in Posting.objects.filter(transaction=tx).select_related("account")
                    ])
                )
            with connection.cursor() as cur:
                cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the deferred zero-sum checks
            raise _Rollback
    except _Rollback:
        pass
    return outcomes, rows


def test_pg_function_and_orm_path_post_identical_postings(monkeypatch):
    agent, other = make_user(Role.AGENT), make_user(Role.AGENT)
    publisher = make_user(Role.PUBLISHER)
    fast = _snapshot(agent, other, publisher, True, monkeypatch)
    orm = _snapshot(agent, other, publisher, False, monkeypatch)
    assert fast == orm
    outcomes, rows = fast
    assert [o[0] for o in outcomes] == [
        "ok", "ok", "ok", "ok", "LedgerError", "InsufficientFunds", "ok", "ok", "ok",
        "InsufficientFunds", "InsufficientFunds", "ok", "ok", "ok", "InsufficientFunds", "ok",
    ]
    assert len(rows) == 11
    capped = rows[6]  # the third settlement: compute capped at what the wallet had left
    assert capped[2]["compute_charged_nano"] == 1_000_000 - 500_000 - 1_000
    assert capped[2]["compute_uncharged_nano"] == 10**9 - capped[2]["compute_charged_nano"]


def test_array_literals_round_trip():
    texts = ['a"b', "c\\d", "x,y{}", "", "NULL", " sp ", "é"]
    ints = [1, None, -5, 10**15]
    with connection.cursor() as cur:
        cur.execute(
            "SELECT %s::text[], %s::bigint[], %s::boolean[]",
            [services._text_array(texts), services._int_array(ints),
             services._bool_array([True, False])],
        )
        assert cur.fetchone() == (texts, ints, [True, False])
