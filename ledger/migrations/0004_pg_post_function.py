"""ledger_post(): one balanced, idempotent ledger transaction in ONE round trip (PostgreSQL).

The money-moving services (top-up, license purchase, load settlement, egress) call this
function on PostgreSQL instead of issuing several statements; Python still computes every
amount (the publisher-share split, the legs) and passes them in. Called outside a
transaction, the one statement is its own transaction (no BEGIN/COMMIT round trips); the
deferred zero-sum trigger of 0002 still checks the postings at commit.

What the function does, in order:

1. Resolve the legs' accounts by key; create the missing ones that may be created (INSERT ...
   ON CONFLICT DO NOTHING, in key order, before any row lock is taken, so creation never
   waits while holding a lock).
2. Lock the bounded accounts (wallet, escrow, payable: balance IS NOT NULL) with SELECT ... FOR
   UPDATE in ascending id order, in one statement; check the owners. System accounts are
   not locked (see models.py).
3. Look the idempotency key up AFTER the locks: in READ COMMITTED each statement of a volatile
   function takes a new snapshot, so a racing call with the same key that committed while we
   waited for its row locks is seen here and its transaction is returned ("replay").
4. A leg whose account does not exist (and may not be created) must be zero, else error LDG03.
5. Optional capped transfer: up to p_cap_amount from leg p_cap_from to leg p_cap_to, capped at
   the from-account's balance (the compute charge: capped at the wallet);
   details.compute_charged_nano / compute_uncharged_nano record the split.
6. Every bounded balance must stay >= 0, else error LDG01 (the CHECK constraint is the
   backstop); the legs must sum to zero (the deferred trigger is the database guarantee).
7. INSERT the transaction ... ON CONFLICT (idempotency_key) DO NOTHING: the unique key is the
   last word on a same-key race (it waits for the other inserter; when that one committed, the
   result is "replay" and nothing is written). Then the postings (non-zero legs, in leg order)
   and the balance updates.

Errors: SQLSTATE LDG01 insufficient funds, LDG02 account of another user, LDG03 missing
account. Returns (status 'ok' | 'replay', tx_id, fingerprint of that transaction, charged).
SQLite (the demo) has no such function; the services use the ORM path there.
"""

from django.db import migrations

FORWARD = [
    r"""
    CREATE OR REPLACE FUNCTION ledger_post(
        p_idem text, p_fp text, p_kind text, p_memo text, p_license_ref text,
        p_document_ref text, p_external_ref text, p_details jsonb, p_now timestamptz,
        p_keys text[], p_kinds text[], p_owners bigint[], p_license_refs text[],
        p_bounded boolean[], p_create boolean[], p_amounts bigint[],
        p_cap_from integer, p_cap_to integer, p_cap_amount bigint,
        OUT status text, OUT tx_id bigint, OUT tx_fingerprint text, OUT charged bigint)
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        n integer := cardinality(p_keys);
        ids bigint[] := array_fill(NULL::bigint, ARRAY[n]);
        bal bigint[] := array_fill(NULL::bigint, ARRAY[n]);
        afters bigint[] := array_fill(NULL::bigint, ARRAY[n]);
        amt bigint[] := p_amounts;
        lock_ids bigint[] := '{}';
        missing boolean := false;
        total bigint := 0;
        r record;
        i integer;
    BEGIN
        charged := 0;
        -- 1. resolve; create the missing accounts that may be created (no lock held yet)
        FOR r IN SELECT a.id, a.key FROM ledger_account a WHERE a.key = ANY(p_keys) LOOP
            ids[array_position(p_keys, r.key::text)] := r.id;
        END LOOP;
        FOR i IN 1..n LOOP
            IF ids[i] IS NULL AND p_create[i] THEN
                missing := true;
            END IF;
        END LOOP;
        IF missing THEN
            INSERT INTO ledger_account (key, kind, owner_id, license_ref, currency, balance,
                                        created_at)
            SELECT k.key, k.kind, k.owner, k.lref, 'usd', CASE WHEN k.bounded THEN 0 END, p_now
              FROM unnest(p_keys, p_kinds, p_owners, p_license_refs, p_bounded, p_create)
                   AS k(key, kind, owner, lref, bounded, cr)
             WHERE k.cr
             ORDER BY k.key
            ON CONFLICT (key) DO NOTHING;
            FOR r IN SELECT a.id, a.key FROM ledger_account a WHERE a.key = ANY(p_keys) LOOP
                ids[array_position(p_keys, r.key::text)] := r.id;
            END LOOP;
        END IF;
        -- 2. lock the bounded accounts in id order (one statement); check the owners
        FOR i IN 1..n LOOP
            IF p_bounded[i] AND ids[i] IS NOT NULL THEN
                lock_ids := lock_ids || ids[i];
            END IF;
        END LOOP;
        FOR r IN SELECT a.id, a.key, a.owner_id, a.balance FROM ledger_account a
                  WHERE a.id = ANY(lock_ids) ORDER BY a.id FOR UPDATE LOOP
            i := array_position(p_keys, r.key::text);
            bal[i] := r.balance;
            IF p_owners[i] IS NOT NULL AND r.owner_id IS DISTINCT FROM p_owners[i] THEN
                RAISE EXCEPTION 'Account % belongs to another user.', r.key
                    USING ERRCODE = 'LDG02';
            END IF;
        END LOOP;
        -- 3. the idempotency key, read after the locks (fresh snapshot)
        SELECT t.id, t.fingerprint INTO tx_id, tx_fingerprint
          FROM ledger_transaction t WHERE t.idempotency_key = p_idem;
        IF FOUND THEN
            status := 'replay';
            RETURN;
        END IF;
        -- 4. an account that does not exist can only take a zero leg
        FOR i IN 1..n LOOP
            IF ids[i] IS NULL AND (amt[i] <> 0 OR i = p_cap_from OR i = p_cap_to) THEN
                RAISE EXCEPTION 'No account %.', p_keys[i]
                    USING ERRCODE = 'LDG03', DETAIL = p_keys[i];
            END IF;
        END LOOP;
        -- 5. the capped transfer (compute: capped at the wallet balance)
        IF p_cap_from IS NOT NULL AND p_cap_amount > 0 THEN
            charged := LEAST(p_cap_amount, GREATEST(bal[p_cap_from] + amt[p_cap_from], 0));
            amt[p_cap_from] := amt[p_cap_from] - charged;
            amt[p_cap_to] := amt[p_cap_to] + charged;
            p_details := p_details || jsonb_build_object(
                'compute_charged_nano', charged,
                'compute_uncharged_nano', p_cap_amount - charged);
        END IF;
        -- 6. floors and balance
        FOR i IN 1..n LOOP
            total := total + amt[i];
            IF p_bounded[i] AND ids[i] IS NOT NULL THEN
                afters[i] := bal[i] + amt[i];
                IF afters[i] < 0 THEN
                    RAISE EXCEPTION '% has % nano-USD; % needed.', p_keys[i], bal[i], -amt[i]
                        USING ERRCODE = 'LDG01', DETAIL = p_keys[i];
                END IF;
            END IF;
        END LOOP;
        IF total <> 0 THEN
            RAISE EXCEPTION 'ledger: legs of % sum to %, not zero', p_idem, total
                USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_transaction_balanced';
        END IF;
        -- 7. write: the transaction (unique key decides a same-key race), postings, balances
        INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo, license_ref,
                                        document_ref, external_ref, details, created_at)
        VALUES (p_idem, p_fp, p_kind, p_memo, p_license_ref, p_document_ref, p_external_ref,
                p_details, p_now)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id INTO tx_id;
        IF tx_id IS NULL THEN
            SELECT t.id, t.fingerprint INTO tx_id, tx_fingerprint
              FROM ledger_transaction t WHERE t.idempotency_key = p_idem;
            status := 'replay';
            RETURN;
        END IF;
        INSERT INTO ledger_posting (transaction_id, account_id, amount, balance_after,
                                    created_at)
        SELECT tx_id, x.id, x.amount, x.after, p_now
          FROM unnest(ids, amt, afters) WITH ORDINALITY AS x(id, amount, after, ord)
         WHERE x.amount <> 0
         ORDER BY x.ord;
        FOR i IN 1..n LOOP
            IF afters[i] IS NOT NULL AND amt[i] <> 0 THEN
                UPDATE ledger_account SET balance = balance + amt[i] WHERE id = ids[i];
            END IF;
        END LOOP;
        status := 'ok';
        tx_fingerprint := p_fp;
    END;
    $$;
    """,
]

BACKWARD = [
    "DROP FUNCTION IF EXISTS ledger_post(text, text, text, text, text, text, text, jsonb,"
    " timestamptz, text[], text[], bigint[], text[], boolean[], boolean[], bigint[], integer,"
    " integer, bigint);",
]


def _run(statements):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return  # SQLite demo: the services use the ORM path
        for sql in statements:
            schema_editor.execute(sql, params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [("ledger", "0003_trim_hot_path_indexes")]

    operations = [migrations.RunPython(_run(FORWARD), _run(BACKWARD), elidable=False)]
