"""Ledger tests run on PostgreSQL only: the money rules are enforced by PostgreSQL triggers,
row locks and constraints, which SQLite does not have. CI always runs them on PostgreSQL."""

import pytest
from django.db import connection

from marketplace.models import Role
from tests.support.accounts import make_user

from .invariants import assert_ledger_invariants


@pytest.fixture(autouse=True)
def _require_postgresql():
    if connection.vendor != "postgresql":
        pytest.fail(
            "tests/ledger must run on PostgreSQL (money rules live in the database): set "
            "DATABASE_URL=postgres://postgres@127.0.0.1:5432/kvm_ledger",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _books_balance_when_the_test_ends(request):
    """After each test that ran in a rolled-back transaction (most of them), fire the deferred
    zero-sum triggers on everything it posted and check the invariants: without this, such a
    test never commits, so PostgreSQL would never check that its transactions balance."""
    yield
    marker = request.node.get_closest_marker("django_db")
    if marker is None or marker.kwargs.get("transaction") or connection.needs_rollback:
        return  # no database, or committed for real (the triggers already ran)
    assert connection.in_atomic_block, "the test database transaction ended before this check"
    with connection.cursor() as cur:
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert_ledger_invariants()


@pytest.fixture(autouse=True)
def _stripe_settings(settings):
    settings.STRIPE_SECRET_KEY = "sk_test_kvmarket"
    settings.STRIPE_WEBHOOK_SECRET = "whsec_test_kvmarket"
    settings.STRIPE_API_BASE = ""
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    settings.PAYOUT_THRESHOLD_NANO_USD = 10 * 10**9


def insert_unbalanced_transaction(cur, account_id: int) -> None:
    """Raw SQL: a 'raw' top-up transaction with one +5 posting on the account (sums to 5)."""
    cur.execute(
        "INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo,"
        " license_ref, document_ref, external_ref, details, created_at)"
        " VALUES ('raw', '', 'topup', '', '', '', '', '{}', now()) RETURNING id"
    )
    tx_id = cur.fetchone()[0]
    cur.execute(
        "INSERT INTO ledger_posting (transaction_id, account_id, amount, created_at)"
        " VALUES (%s, %s, 5, now())",
        [tx_id, account_id],
    )


@pytest.fixture
def agent(db):
    return make_user(Role.AGENT)


@pytest.fixture
def publisher(db):
    return make_user(Role.PUBLISHER)


@pytest.fixture
def staff(db):
    return make_user(Role.STAFF, is_superuser=True)
