"""Ledger invariants, checked in SQL against the live database."""

from django.db import connection

from ledger.models import Account


def assert_ledger_invariants() -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT COALESCE(SUM(amount), 0) FROM ledger_posting")
        assert cur.fetchone()[0] == 0, "trial balance is not zero"
        cur.execute(
            "SELECT transaction_id FROM ledger_posting GROUP BY transaction_id"
            " HAVING SUM(amount) <> 0"
        )
        assert cur.fetchall() == [], "unbalanced transactions"
        cur.execute(
            "SELECT a.key, a.balance, COALESCE(SUM(p.amount), 0) FROM ledger_account a"
            " LEFT JOIN ledger_posting p ON p.account_id = a.id WHERE a.balance IS NOT NULL"
            " GROUP BY a.id HAVING a.balance <> COALESCE(SUM(p.amount), 0)"
        )
        assert cur.fetchall() == [], "balance differs from the sum of postings"
        cur.execute(
            "SELECT a.key FROM ledger_account a JOIN ledger_posting p ON p.account_id = a.id"
            " WHERE a.kind = 'publisher_payable' GROUP BY a.id HAVING SUM(p.amount) < 0"
        )
        assert cur.fetchall() == [], "negative payable"
    assert not Account.objects.filter(balance__lt=0).exists(), "negative balance"
