"""The posting core: every money movement goes through here, on every database.

A money-moving service runs `post_once(idempotency_key, fingerprint, body)`. Inside one database
transaction (a savepoint when the caller has one open) `body` calls `lock_accounts(...)`, works
out the legs from the locked balances, and calls `write_transaction(...)`. That is four
statements:

1. one SELECT that locks the bounded accounts (wallet, escrow, payable) FOR UPDATE in id order,
   reads the system accounts (platform revenue, compute revenue, Stripe clearing) without a
   lock, and finds the idempotency key if it was already used (then nothing is posted and the
   first transaction is returned);
2. INSERT the transaction; 3. INSERT its postings; 4. one UPDATE of the bounded balances.

Two callers racing with the same key: the loser does not see the winner's row in step 1 (its
snapshot predates the winner's commit), fails on the unique key (or on a balance the winner
spent), rolls back its savepoint, and `post_once` returns the winner's transaction.

Rules and where they live (each once): a bounded balance never goes below zero (checked here on
the locked balance, with the CHECK constraint of models.py as the backstop); the legs sum to
zero (checked here, and by the deferred trigger of migration 0002 at commit); postings and
transactions are never changed (trigger, 0002); an idempotency key is used once (UNIQUE).

The statements are plain SQL that PostgreSQL and SQLite (the demo) both run; only the row lock
differs (SQLite has no FOR UPDATE: it serialises writers on the whole database). On PostgreSQL
they go through a psycopg cursor with server-side binding and `prepare=True`, so each statement
is parsed and planned once per connection instead of at every call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ledger.accounts import SYSTEM_KEYS, escrow_key, payable_key, wallet_key
from ledger.errors import IdempotencyConflict, InsufficientFunds, InvalidAmount, LedgerError
from ledger.models import BOUNDED_KINDS, Account, AccountKind, Transaction, TransactionKind

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


def _execute(sql: str, params: Sequence[Any]) -> list[tuple]:
    """Run one statement on Django's connection (inside its current transaction) and return
    its rows. PostgreSQL: server-side binding, prepared once per connection."""
    if connection.vendor == "postgresql":
        connection.ensure_connection()
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cur:
            cur.execute(sql, params, prepare=True)
            return cur.fetchall() if cur.description else []
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


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
    return (
        "INSERT INTO ledger_posting (transaction_id, account_id, amount, balance_after,"
        " created_at) VALUES " + ", ".join(["(%s, %s, %s, %s, %s)"] * n)
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
    Account.objects.bulk_create(
        [
            Account(
                key=s.key,
                kind=s.kind,
                owner_id=s.owner_id,
                license_ref=s.license_ref,
                balance=0 if s.bounded else None,
            )
            # key order: concurrent creators of the same accounts insert them in one order
            for s in sorted(specs, key=lambda s: s.key)
        ],
        ignore_conflicts=True,
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
    for source, *row in _execute(sql, params):
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


def write_transaction(
    *,
    kind: TransactionKind,
    idempotency_key: str,
    fingerprint: str,
    legs: list[tuple[LockedAccount, int]],
    memo: str = "",
    license_ref: str = "",
    document_ref: str = "",
    external_ref: str = "",
    details: dict[str, Any] | None = None,
) -> Transaction:
    """Write one balanced transaction: legs are (account, signed amount); the bounded accounts
    among them must have been locked by `lock_accounts` in this database transaction."""
    merged: dict[int, list] = {}
    for account, amount in legs:
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
        kind=kind,
        memo=memo[:255],
        license_ref=license_ref,
        document_ref=document_ref,
        external_ref=external_ref,
        details=details or {},
        created_at=timezone.now(),
    )
    created_at = connection.ops.adapt_datetimefield_value(tx.created_at)
    [(tx.pk,)] = _execute(
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
    tx._state.adding = False
    tx._state.db = connection.alias
    if lines:
        params: list[Any] = []
        for account, amount, balance_after in lines:
            params += [tx.pk, account.id, amount, balance_after, created_at]
        _execute(_insert_postings_sql(len(lines)), params)
    bounded = [(account, amount) for account, amount, after in lines if after is not None]
    if bounded:
        params = []
        for account, amount in bounded:
            params += [account.id, amount]
        _execute(_update_balances_sql(len(bounded)), params + [a.id for a, _ in bounded])
        for account, amount in bounded:
            account.balance += amount
    return tx


def post_once(
    idempotency_key: str, fingerprint: str, body: Callable[[], Transaction | None]
) -> Transaction | None:
    """Run `body` in one database transaction (a savepoint inside the caller's), once per
    idempotency key: a retry with the same request returns the first transaction, a retry with
    a different request raises IdempotencyConflict."""
    _check_key(idempotency_key)
    try:
        with transaction.atomic():
            return body()
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

    def body() -> Transaction:
        accounts = lock_accounts([source, dest], idempotency_key=idempotency_key)
        return write_transaction(
            kind=kind,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            legs=[(accounts[source.key], -amount_nano), (accounts[dest.key], amount_nano)],
            memo=memo,
            license_ref=license_ref,
            document_ref=document_ref,
            external_ref=external_ref,
        )

    return post_once(idempotency_key, fingerprint, body)
