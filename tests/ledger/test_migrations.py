"""Migration 0007: a payable's stored balance becomes the sum of its postings, and back."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from marketplace.models import Role

from .conftest import make_user

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("ledger", "0006_drop_pg_post_function")]
AFTER = [("ledger", "0007_payable_balance_from_postings")]


def _migrate(target) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(target)


def _payable_balance(key: str):
    with connection.cursor() as cur:
        cur.execute("SELECT balance FROM ledger_account WHERE key = %s", [key])
        return cur.fetchone()[0]


def test_0007_moves_payable_balances_to_their_postings_and_back():
    publisher = make_user(Role.PUBLISHER)
    key = f"payable:{publisher.pk}"
    _migrate(BEFORE)
    try:
        with connection.cursor() as cur:  # a stored payable of 700, as settlements left it
            cur.execute(
                "INSERT INTO ledger_account (key, kind, owner_id, license_ref, currency, balance,"
                " created_at) VALUES (%s, 'publisher_payable', %s, '', 'usd', 700, now()),"
                " ('platform:revenue', 'platform_revenue', NULL, '', 'usd', NULL, now())"
                " RETURNING id",
                [key, publisher.pk],
            )
            payable_id, revenue_id = (row[0] for row in cur.fetchall())
            cur.execute(
                "INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo,"
                " license_ref, document_ref, external_ref, details, created_at)"
                " VALUES ('m', '', 'load_settlement', '', '', '', '', '{}', now()) RETURNING id"
            )
            tx_id = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO ledger_posting (transaction_id, account_id, amount, balance_after,"
                " created_at) VALUES (%s, %s, 700, 700, now()), (%s, %s, -700, NULL, now())",
                [tx_id, payable_id, tx_id, revenue_id],
            )
        _migrate(AFTER)
        assert _payable_balance(key) is None
        _migrate(BEFORE)
        assert _payable_balance(key) == 700
    finally:
        _migrate(AFTER)
