"""Money rules enforced by PostgreSQL itself (not only by Python):

1. The postings of a transaction sum to zero per currency: a DEFERRABLE INITIALLY DEFERRED
   constraint trigger checks each transaction touched, at commit.
2. Postings and transactions are immutable: a trigger rejects UPDATE and DELETE
   (corrections are new transactions). TRUNCATE is left alone for test-database flushes.
3. Non-negative balances: CHECK constraints from models.py (ledger_account_balance_non_negative).
4. Unique idempotency keys: UNIQUE constraint from models.py.

On SQLite (the one-command demo) the triggers are skipped; the CHECK and UNIQUE constraints
still apply there.
"""

from django.db import migrations

FORWARD = [
    """
    CREATE OR REPLACE FUNCTION ledger_check_transaction_balanced() RETURNS trigger AS $$
    DECLARE
        bad record;
    BEGIN
        SELECT a.currency AS currency, SUM(p.amount) AS total
          INTO bad
          FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
         WHERE p.transaction_id = NEW.transaction_id
         GROUP BY a.currency
        HAVING SUM(p.amount) <> 0
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'ledger: postings of transaction % sum to % %, not zero',
                NEW.transaction_id, bad.total, bad.currency
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'ledger_transaction_balanced';
        END IF;
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql;
    """,
    """
    CREATE CONSTRAINT TRIGGER ledger_posting_balanced
        AFTER INSERT ON ledger_posting
        DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW EXECUTE FUNCTION ledger_check_transaction_balanced();
    """,
    """
    CREATE OR REPLACE FUNCTION ledger_reject_change() RETURNS trigger AS $$
    BEGIN
        RAISE EXCEPTION 'ledger: % rows are immutable (% rejected); post a correcting transaction',
            TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'restrict_violation',
                  CONSTRAINT = 'ledger_immutable';
    END;
    $$ LANGUAGE plpgsql;
    """,
    """
    CREATE TRIGGER ledger_posting_immutable
        BEFORE UPDATE OR DELETE ON ledger_posting
        FOR EACH ROW EXECUTE FUNCTION ledger_reject_change();
    """,
    """
    CREATE TRIGGER ledger_transaction_immutable
        BEFORE UPDATE OR DELETE ON ledger_transaction
        FOR EACH ROW EXECUTE FUNCTION ledger_reject_change();
    """,
]

BACKWARD = [
    "DROP TRIGGER IF EXISTS ledger_transaction_immutable ON ledger_transaction;",
    "DROP TRIGGER IF EXISTS ledger_posting_immutable ON ledger_posting;",
    "DROP FUNCTION IF EXISTS ledger_reject_change();",
    "DROP TRIGGER IF EXISTS ledger_posting_balanced ON ledger_posting;",
    "DROP FUNCTION IF EXISTS ledger_check_transaction_balanced();",
]


def _run(statements):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return  # SQLite demo: CHECK/UNIQUE constraints only
        for sql in statements:
            schema_editor.execute(sql, params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [("ledger", "0001_initial")]

    operations = [migrations.RunPython(_run(FORWARD), _run(BACKWARD), elidable=False)]
