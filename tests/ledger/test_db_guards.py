"""PostgreSQL itself rejects broken money (raw SQL, bypassing the services)."""

import pytest
from django.db import IntegrityError, connection, transaction

from ledger import services
from ledger.models import Account, Posting, Transaction

from .conftest import insert_unbalanced_transaction

pytestmark = pytest.mark.django_db


@pytest.fixture
def posted(agent):
    tx = services.credit_topup(agent=agent, amount_nano=100, idempotency_key="t")
    return tx, Account.objects.get(key=f"wallet:{agent.pk}")


def sql(statement: str, params=None) -> None:
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(statement, params)


def test_postings_cannot_be_updated_or_deleted(posted):
    tx, wallet = posted
    posting = Posting.objects.get(transaction=tx, account=wallet)
    with pytest.raises(IntegrityError, match="immutable"):
        sql("UPDATE ledger_posting SET amount = 1000 WHERE id = %s", [posting.pk])
    with pytest.raises(IntegrityError, match="immutable"):
        sql("DELETE FROM ledger_posting WHERE id = %s", [posting.pk])
    with pytest.raises(IntegrityError, match="immutable"):
        sql("UPDATE ledger_transaction SET memo = 'x' WHERE id = %s", [tx.pk])
    with pytest.raises(IntegrityError, match="immutable"):
        sql("DELETE FROM ledger_transaction WHERE id = %s", [tx.pk])
    assert Posting.objects.get(pk=posting.pk).amount == 100


def test_unbalanced_transaction_is_rejected(posted):
    _, wallet = posted
    with pytest.raises(IntegrityError, match="sum to 5"):
        with transaction.atomic(), connection.cursor() as cur:
            insert_unbalanced_transaction(cur, wallet.pk)
            # The check is deferred to COMMIT; inside the test's transaction, force it now.
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")


def test_negative_bounded_balance_is_rejected(posted):
    _, wallet = posted
    with pytest.raises(IntegrityError, match="ledger_account_balance_non_negative"):
        sql("UPDATE ledger_account SET balance = -1 WHERE id = %s", [wallet.pk])


def test_duplicate_idempotency_key_is_rejected(posted):
    with pytest.raises(IntegrityError):
        sql(
            "INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo,"
            " license_ref, document_ref, external_ref, details, created_at)"
            " VALUES ('t', '', 'topup', '', '', '', '', '{}', now())"
        )
    assert Transaction.objects.filter(idempotency_key="t").count() == 1


def test_zero_posting_is_rejected(posted):
    tx, wallet = posted
    with pytest.raises(IntegrityError, match="ledger_posting_amount_nonzero"):
        sql(
            "INSERT INTO ledger_posting (transaction_id, account_id, amount, created_at)"
            " VALUES (%s, %s, 0, now())",
            [tx.pk, wallet.pk],
        )
