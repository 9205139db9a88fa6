"""The posting core: every money movement goes through here, on every database.

A money-moving service calls `post_once(idempotency_key=..., fingerprint=..., accounts=...,
decide=...)`. In one database transaction (a savepoint inside the caller's) it runs four
statements:

1. one SELECT that locks the bounded accounts (wallet, escrow, payable) FOR UPDATE in id order,
   reads the system accounts (platform revenue, compute revenue, Stripe clearing) without a
   lock, and finds the idempotency key if it was already used (then nothing is posted and the
   first transaction is returned);
   then `decide(locked accounts)` returns the Entry to post (kind, legs, memo, details), or
   None for nothing to post;
2. INSERT the transaction; 3. INSERT its postings; 4. one UPDATE of the bounded balances.

Two callers racing with the same key: the loser does not see the winner's row in step 1 (its
snapshot predates the winner's commit), fails on the unique key (or on a balance the winner
spent), rolls back, and `post_once` returns the winner's transaction.

Rules and where they live (each once): a bounded balance never goes below zero (checked here on
the locked balance, with the CHECK constraint of models.py as the backstop); the legs sum to
zero (checked here, and by the deferred trigger of migration 0002 at commit); postings and
transactions are never changed (trigger, 0002); an idempotency key is used once (UNIQUE).

The statements are plain SQL that PostgreSQL and SQLite (the demo) both run; only the row lock
differs (SQLite has no FOR UPDATE: it serialises writers on the whole database). On PostgreSQL
they go through psycopg with server-side binding, each prepared once per connection, and in
pipeline mode: BEGIN and the lock travel together, then the three writes together, then COMMIT
(three round trips to the server instead of six).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ledger.accounts import SYSTEM_KEYS, escrow_key, payable_key, wallet_key
from ledger.errors import IdempotencyConflict, InsufficientFunds, InvalidAmount, LedgerError
from ledger.models import BOUNDED_KINDS, AccountKind, Transaction, TransactionKind

# --- which accounts a transaction touches ----------------------------------------------------


@dataclass(frozen=True)
class AccountSpec:
    """An account by its natural key, and how to create it when it does not exist yet."""

    key: str
    kind: str
    owner_id: int | None = None  # when set, the account must belong to this user
    license_ref: str = ""
    create: bool = True  # create the account when missing (else it is just absent)

    @property
    def bounded(self) -> bool:
        return self.kind in BOUNDED_KINDS


def wallet(agent_id: int) -> AccountSpec:
    return AccountSpec(wallet_key(agent_id), AccountKind.AGENT_WALLET, agent_id)


def payable(publisher_id: int) -> AccountSpec:
    return AccountSpec(payable_key(publisher_id), AccountKind.PUBLISHER_PAYABLE, publisher_id)


def escrow(license_ref: str, agent_id: int | None, *, create: bool = True) -> AccountSpec:
    return AccountSpec(
        escrow_key(license_ref), AccountKind.LICENSE_ESCROW, agent_id, license_ref, create
    )


def system(kind: AccountKind) -> AccountSpec:
    return AccountSpec(SYSTEM_KEYS[kind], kind)


@dataclass
class LockedAccount:
    """An account row as the lock read it. `balance` is None for system accounts."""

    id: int
    key: str
    kind: str
    owner_id: int | None
    balance: int | None

    @property
    def bounded(self) -> bool:
        return self.balance is not None


# --- request checks --------------------------------------------------------------------------


def fingerprint(kind: str, **params: Any) -> str:
    """sha256 of the request: a retry with the same key must be the same request."""
    raw = json.dumps([kind, params], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


def check_amount(amount_nano: int, *, allow_zero: bool = False) -> None:
    if isinstance(amount_nano, bool) or not isinstance(amount_nano, int):
        raise InvalidAmount("Amounts are integers in nano-USD.")
    if amount_nano < 0 or (amount_nano == 0 and not allow_zero):
        raise InvalidAmount(f"Amount must be {'>= 0' if allow_zero else '> 0'} nano-USD.")


def _check_key(idempotency_key: str) -> None:
    if not isinstance(idempotency_key, str) or not idempotency_key.strip():
        raise LedgerError("An idempotency key is required.")
    if len(idempotency_key) > 200:
        raise LedgerError("Idempotency keys are at most 200 characters.")


def _conflict(idempotency_key: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"Idempotency key {idempotency_key!r} was already used for a different request."
    )


# --- statements ------------------------------------------------------------------------------


def _send(sql: str, params: Sequence[Any]) -> Callable[[], list[tuple]]:
    """Run one statement on Django's connection (inside its current transaction); returns a
    function that gives its rows. On PostgreSQL in pipeline mode (see `post_once`) the statement
    is only queued: reading its rows sends the queue and waits for the answer."""
    if connection.vendor == "postgresql":
        connection.ensure_connection()
        with connection.wrap_database_errors:
            cur = psycopg.Cursor(connection.connection)
            cur.execute(sql, params, prepare=True)

        def rows() -> list[tuple]:
            with connection.wrap_database_errors:
                return cur.fetchall()

        return rows
    with connection.cursor() as cur:
        cur.execute(sql, params)
        result = cur.fetchall() if cur.description else []
    return lambda: result


def _placeholders(n: int) -> str:
    return ", ".join(["%s"] * n)


def _lock_sql(n_bounded: int, n_system: int, with_key: bool) -> str:
    parts = []
    columns = "id, key, kind, owner_id, balance"
    if n_bounded:
        lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
        parts.append(f"SELECT 'account', {columns} FROM locked")
        cte = (
            f"WITH locked AS (SELECT {columns} FROM ledger_account"
            f" WHERE key IN ({_placeholders(n_bounded)}) ORDER BY id{lock}) "
        )
    else:
        cte = ""
    if n_system:
        parts.append(
            f"SELECT 'account', {columns} FROM ledger_account"
            f" WHERE key IN ({_placeholders(n_system)})"
        )
    if with_key:
        parts.append(
            "SELECT 'transaction', id, idempotency_key, '', NULL, NULL FROM ledger_transaction"
            " WHERE idempotency_key = %s"
        )
    return cte + " UNION ALL ".join(parts)


_INSERT_TRANSACTION = (
    "INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo, license_ref,"
    " document_ref, external_ref, details, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
)


def _insert_postings_sql(n: int) -> str:
    # The transaction is found by its key, so this statement can be sent before the INSERT of
    # the transaction has answered (pipeline mode).
    row = "((SELECT id FROM ledger_transaction WHERE idempotency_key = %s), %s, %s, %s, %s)"
    return (
        "INSERT INTO ledger_posting (transaction_id, account_id, amount, balance_after,"
        " created_at) VALUES " + ", ".join([row] * n)
    )


def _update_balances_sql(n: int) -> str:
    return (
        "UPDATE ledger_account SET balance = balance + CASE id"
        + " WHEN %s THEN %s" * n
        + f" END WHERE id IN ({_placeholders(n)})"
    )


# --- locking and writing ---------------------------------------------------------------------


class _Replay(Exception):  # noqa: N818 - control flow, never escapes this module
    """The idempotency key is already recorded: return its transaction, post nothing."""

    def __init__(self, transaction_id: int) -> None:
        self.transaction_id = transaction_id


def _create_accounts(specs: Iterable[AccountSpec]) -> None:
    """Create the accounts that do not exist yet (an existing key is left alone)."""
    rows = []
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    # key order: concurrent creators of the same accounts insert them in one order
    for s in sorted(specs, key=lambda s: s.key):
        rows += [s.key, s.kind, s.owner_id, s.license_ref, "usd", 0 if s.bounded else None, now]
    _send(
        "INSERT INTO ledger_account (key, kind, owner_id, license_ref, currency, balance,"
        " created_at) VALUES "
        + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * (len(rows) // 7))
        + " ON CONFLICT (key) DO NOTHING",
        rows,
    )


def _read_locked(
    specs: list[AccountSpec], idempotency_key: str
) -> tuple[dict[str, LockedAccount], int | None]:
    bounded = [s.key for s in specs if s.bounded]
    unlocked = [s.key for s in specs if not s.bounded]
    sql = _lock_sql(len(bounded), len(unlocked), bool(idempotency_key))
    params = [*bounded, *unlocked] + ([idempotency_key] if idempotency_key else [])
    found: dict[str, LockedAccount] = {}
    replay_id = None
    for source, *row in _send(sql, params)():
        if source == "transaction":
            replay_id = row[0]
        else:
            account = LockedAccount(*row)
            found[account.key] = account
    return found, replay_id


def lock_accounts(
    specs: list[AccountSpec], *, idempotency_key: str = ""
) -> dict[str, LockedAccount]:
    """Lock the bounded accounts of `specs` (one statement, id order), read the system ones,
    create the missing accounts that may be created, and stop with the first transaction when
    `idempotency_key` is already recorded. Returns the accounts by key (absent: not created)."""
    found, replay_id = _read_locked(specs, idempotency_key)
    missing = [s for s in specs if s.key not in found and s.create]
    if missing and replay_id is None:
        _create_accounts(missing)
        found, replay_id = _read_locked(specs, idempotency_key)
    if replay_id is not None:
        raise _Replay(replay_id)
    for s in specs:
        account = found.get(s.key)
        if account is not None and s.owner_id is not None and account.owner_id != s.owner_id:
            raise LedgerError(f"Account {s.key} belongs to another user.")
    return found


@dataclass
class Entry:
    """What to post: legs are (locked account, signed amount) and must sum to zero."""

    kind: TransactionKind
    legs: list[tuple[LockedAccount, int]]
    memo: str = ""
    license_ref: str = ""
    document_ref: str = ""
    external_ref: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _send_transaction(
    entry: Entry, *, idempotency_key: str, fingerprint: str
) -> tuple[Transaction, Callable[[], list[tuple]]]:
    """Send the writes of one balanced transaction; returns it (without its id yet) and the
    reader of its id. The bounded accounts among the legs must be locked by `lock_accounts`."""
    merged: dict[int, list] = {}
    for account, amount in entry.legs:
        merged.setdefault(account.id, [account, 0])[1] += amount
    if sum(amount for _, amount in merged.values()) != 0:
        raise LedgerError("Internal error: unbalanced transaction.")
    lines: list[tuple[LockedAccount, int, int | None]] = []
    for account, amount in merged.values():
        if amount == 0:
            continue
        balance_after = None
        if account.bounded:
            balance_after = account.balance + amount
            if balance_after < 0:
                raise InsufficientFunds(
                    f"{account.key} has {account.balance} nano-USD; {-amount} needed."
                )
        lines.append((account, amount, balance_after))
    tx = Transaction(
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        kind=entry.kind,
        memo=entry.memo[:255],
        license_ref=entry.license_ref,
        document_ref=entry.document_ref,
        external_ref=entry.external_ref,
        details=entry.details,
        created_at=timezone.now(),
    )
    created_at = connection.ops.adapt_datetimefield_value(tx.created_at)
    read_id = _send(
        _INSERT_TRANSACTION,
        [
            tx.idempotency_key,
            tx.fingerprint,
            str(tx.kind),
            tx.memo,
            tx.license_ref,
            tx.document_ref,
            tx.external_ref,
            json.dumps(tx.details),
            created_at,
        ],
    )
    if lines:
        params: list[Any] = []
        for account, amount, balance_after in lines:
            params += [idempotency_key, account.id, amount, balance_after, created_at]
        _send(_insert_postings_sql(len(lines)), params)
    bounded = [(account, amount) for account, amount, after in lines if after is not None]
    if bounded:
        params = []
        for account, amount in bounded:
            params += [account.id, amount]
        _send(_update_balances_sql(len(bounded)), params + [a.id for a, _ in bounded])
        for account, amount in bounded:
            account.balance += amount
    tx._state.adding = False
    tx._state.db = connection.alias
    return tx, read_id


def write_transaction(entry: Entry, *, idempotency_key: str, fingerprint: str) -> Transaction:
    """Write one balanced transaction now, in the caller's database transaction (payouts: the
    payout row lock already makes the call happen once). Prefer `post_once`."""
    tx, read_id = _send_transaction(entry, idempotency_key=idempotency_key, fingerprint=fingerprint)
    [(tx.pk,)] = read_id()
    return tx


@contextlib.contextmanager
def _pipeline() -> Iterator[None]:
    """PostgreSQL: queue the statements sent inside (psycopg pipeline mode); the queue goes out
    when a statement's rows are read, and at the end, where a refused write raises (as a
    Django database error, like any other)."""
    if connection.vendor != "postgresql":
        yield
        return
    connection.ensure_connection()
    with connection.wrap_database_errors, connection.connection.pipeline():
        yield


def post_once(
    *,
    idempotency_key: str,
    fingerprint: str,
    accounts: list[AccountSpec],
    decide: Callable[[dict[str, LockedAccount]], Entry | None],
) -> Transaction | None:
    """Lock `accounts`, let `decide` work out the Entry from their balances, and post it, in
    one database transaction (a savepoint inside the caller's), once per idempotency key: a
    retry with the same request returns the first transaction (decide is not called), a retry
    with a different request raises IdempotencyConflict. Returns None when decide does."""
    _check_key(idempotency_key)
    try:
        with transaction.atomic():
            # inside the atomic block: BEGIN (or SAVEPOINT) and COMMIT stay Django's, and an
            # error of a queued write surfaces here, where the block rolls it back
            with _pipeline():
                entry = decide(lock_accounts(accounts, idempotency_key=idempotency_key))
                if entry is None:
                    return None
                tx, read_id = _send_transaction(
                    entry, idempotency_key=idempotency_key, fingerprint=fingerprint
                )
            [(tx.pk,)] = read_id()
        return tx
    except _Replay as replay:
        tx = Transaction.objects.get(pk=replay.transaction_id)
    except (IntegrityError, LedgerError) as exc:
        if isinstance(exc, IdempotencyConflict):
            raise
        # a racing call with the same key may have won while we waited: return its result
        tx = Transaction.objects.filter(idempotency_key=idempotency_key).first()
        if tx is None:
            if isinstance(exc, IntegrityError) and "ledger_account_balance_non_negative" in str(
                exc
            ):
                raise InsufficientFunds("The account cannot pay this amount.") from exc
            raise
    if tx.fingerprint != fingerprint:
        raise _conflict(idempotency_key)
    return tx


def transfer(
    *,
    source: AccountSpec,
    dest: AccountSpec,
    amount_nano: int,
    kind: TransactionKind,
    idempotency_key: str,
    fingerprint: str,
    memo: str = "",
    license_ref: str = "",
    document_ref: str = "",
    external_ref: str = "",
) -> Transaction:
    """Post `amount_nano` from `source` to `dest` as one idempotent transaction."""

    def decide(accounts: dict[str, LockedAccount]) -> Entry:
        return Entry(
            kind=kind,
            legs=[(accounts[source.key], -amount_nano), (accounts[dest.key], amount_nano)],
            memo=memo,
            license_ref=license_ref,
            document_ref=document_ref,
            external_ref=external_ref,
        )

    return post_once(
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        accounts=[source, dest],
        decide=decide,
    )
