"""The posting core: every money movement goes through here, on every database.

Two ways in, one writer:

- `post(idempotency_key=..., fingerprint=..., entry=...)`: the legs are known up front (top-up,
  license purchase, egress, a settlement without compute). Nothing is read first: the
  transaction, one UPDATE per stored balance and the postings are sent together, and the
  database's constraints decide.
- `post_once(..., accounts=..., decide=...)`: the legs depend on balances (the compute cap, a
  refund of what is left in an escrow, a payout). One read locks `accounts` and finds the
  idempotency key (a replay returns the first transaction and `decide` is not called); then
  `decide(balances)` returns the Entry, written by the same writer.

Rules and where they live (each once):
- a stored balance (wallet, escrow) never goes below zero: the CHECK constraint of models.py
  (a refused UPDATE raises InsufficientFunds);
- a publisher payable has no stored balance (the sum of its postings), so a settlement credits
  it without locking its row; only payouts debit it, under its row lock, after
  `_check_floors` here;
- the legs sum to zero: `_merge` here (the only guard on SQLite), and the deferred trigger of
  migration 0002 at commit;
- postings and transactions are never changed: trigger (0002);
- an idempotency key is used once: UNIQUE. A replay fails on it, rolls back, and returns the
  stored transaction (or raises IdempotencyConflict for a different request);
- an account belongs to its owner: a posting finds its account by key AND owner, so a foreign
  account leaves account_id NULL and the NOT NULL constraint refuses it.

The first posting to a new account fails on NOT NULL, creates the account, and runs again.

Row locks are taken in account key order on every path (the locking read, then one UPDATE per
stored balance in key order), so two postings never wait on each other in a cycle. The
statements are plain SQL that PostgreSQL and SQLite (the demo) both run; only the row lock
differs (SQLite has none: it serialises writers on the whole database). On PostgreSQL the
statements of a posting, with its transaction control (BEGIN and COMMIT, or a savepoint inside
a caller's transaction), are sent as one query string, quoted by psycopg (`_Batch`): `post` is
one round trip to the server, `post_once` two.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ledger.accounts import SYSTEM_KEYS, escrow_key, payable_key, wallet_key
from ledger.errors import IdempotencyConflict, InsufficientFunds, InvalidAmount, LedgerError
from ledger.models import (
    BOUNDED_KINDS,
    STORED_BALANCE_KINDS,
    AccountKind,
    Transaction,
    TransactionKind,
)

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

    @property
    def stored(self) -> bool:
        return self.kind in STORED_BALANCE_KINDS


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
class Entry:
    """What to post: legs are (account, signed amount) and must sum to zero."""

    kind: TransactionKind
    legs: list[tuple[AccountSpec, int]]
    memo: str = ""
    license_ref: str = ""
    document_ref: str = ""
    external_ref: str = ""
    details: dict[str, Any] = field(default_factory=dict)


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


# --- statements ------------------------------------------------------------------------------


class _Batch:
    """PostgreSQL: the statements of one database transaction, collected and sent to the server
    as one query string (one round trip; the server runs them in order and stops at the first
    error). Reading a statement's rows sends what is collected so far."""

    def __init__(self, nested: bool) -> None:
        self.pg = connection.connection
        self.quote = psycopg.ClientCursor(self.pg)
        self.nested = nested
        self.pending: list[str] = []
        self.results: list[list[tuple]] = []
        self.begun = False  # BEGIN (or SAVEPOINT) was sent
        self.after_send: list[Callable[[], None]] = []  # run once the last part was sent

    def add(self, sql: str, params: Sequence[Any]) -> Callable[[], list[tuple]]:
        self.pending.append(self.quote.mogrify(sql, params))
        index = len(self.results) + len(self.pending) - 1
        return lambda: self.rows(index)

    def rows(self, index: int) -> list[tuple]:
        if index >= len(self.results):
            self.send(last=False)
        return self.results[index]

    def send(self, *, last: bool) -> None:
        if self.nested:
            begin, end = ["SAVEPOINT ledger_post"], ["RELEASE SAVEPOINT ledger_post"]
        else:
            begin, end = ["BEGIN"], ["COMMIT"]
        head: list[str] = []
        # A query string of several statements without BEGIN is one transaction of its own
        # (committed at its end, rolled back on any error): a posting sent in one go needs no
        # BEGIN or COMMIT. One sent in two parts (a read first) opens a transaction block.
        if not self.begun and (self.nested or not last):
            head, self.begun = begin, True
        tail = end if last and self.begun else []
        statements, self.pending = self.pending, []
        if not (head or statements or tail):
            return
        cur = self.pg.cursor()
        cur.execute(";\n".join(head + statements + tail))  # no parameters: one simple query
        for _ in head:
            cur.nextset()
        for _ in statements:
            self.results.append(cur.fetchall() if cur.description else [])
            cur.nextset()

    def undo(self) -> None:
        if self.begun and not self.pg.closed:
            if self.nested:
                self.pg.execute("ROLLBACK TO SAVEPOINT ledger_post")
                self.pg.execute("RELEASE SAVEPOINT ledger_post")
            else:
                self.pg.execute("ROLLBACK")


_batch: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("_batch", default=None)


def _send(sql: str, params: Sequence[Any]) -> Callable[[], list[tuple]]:
    """Run one statement on Django's connection; returns a function that gives its rows. On
    PostgreSQL inside `_unit` the statement is only collected: reading its rows sends what is
    collected and waits for the answer."""
    batch = _batch.get()
    if batch is not None:
        return batch.add(sql, params)
    with connection.cursor() as cur:
        cur.execute(sql, params)
        result = cur.fetchall() if cur.description else []
    return lambda: result


def _placeholders(n: int) -> str:
    return ", ".join(["%s"] * n)


@functools.cache
def _lock_sql(n: int) -> str:
    # A lock in its own statement: the balances are read by the next one, whose snapshot is
    # taken after the lock was granted (a sum of postings read in the locking statement could
    # miss a posting committed while it waited).
    return (
        f"SELECT 1 FROM ledger_account WHERE key IN ({_placeholders(n)})"
        " ORDER BY key FOR NO KEY UPDATE"
    )


@functools.cache
def _read_sql(n: int, with_key: bool) -> str:
    sql = (
        "SELECT 0, key, COALESCE(balance, (SELECT COALESCE(SUM(p.amount), 0)"
        " FROM ledger_posting p WHERE p.account_id = ledger_account.id))"
        f" FROM ledger_account WHERE key IN ({_placeholders(n)})"
    )
    if with_key:
        sql += " UNION ALL SELECT 1, '', id FROM ledger_transaction WHERE idempotency_key = %s"
    return sql


_INSERT_TRANSACTION = (
    "INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo, license_ref,"
    " document_ref, external_ref, details, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
)
_UPDATE_BALANCE = "UPDATE ledger_account SET balance = balance + %s WHERE key = %s"


@functools.cache
def _insert_postings_sql(shape: tuple[tuple[bool, bool], ...]) -> str:
    """One row per (stored balance, owner checked) in `shape`. Each row finds its transaction
    by key (so it can be queued before the INSERT of the transaction has answered) and its
    account by key and owner (NULL, refused, when the account is missing or foreign); a stored
    balance is read after its UPDATE, under the row lock that UPDATE took."""
    rows = []
    for stored, owned in shape:
        account = "(SELECT id FROM ledger_account WHERE key = %s" + (
            " AND owner_id = %s)" if owned else ")"
        )
        after = "(SELECT balance FROM ledger_account WHERE key = %s)" if stored else "NULL"
        rows.append(
            f"((SELECT id FROM ledger_transaction WHERE idempotency_key = %s), {account},"
            f" %s, {after}, %s)"
        )
    return (
        "INSERT INTO ledger_posting (transaction_id, account_id, amount, balance_after,"
        " created_at) VALUES " + ", ".join(rows)
    )


def _open_accounts(legs: list[tuple[AccountSpec, int]]) -> None:
    """Create the accounts of `legs` that are missing and may be created (an existing key is
    left alone), then refuse a leg whose account is still missing or is another user's."""
    specs = {spec.key: (spec, amount) for spec, amount in legs}
    rows: list[Any] = []
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    # key order: concurrent creators of the same accounts insert them in one order
    creatable = sorted((s for s, _ in specs.values() if s.create), key=lambda s: s.key)
    for s in creatable:
        rows += [s.key, s.kind, s.owner_id, s.license_ref, "usd", 0 if s.stored else None, now]
    if creatable:
        _send(
            "INSERT INTO ledger_account (key, kind, owner_id, license_ref, currency, balance,"
            " created_at) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(creatable))
            + " ON CONFLICT (key) DO NOTHING",
            rows,
        )
    found = dict(
        _send(
            f"SELECT key, owner_id FROM ledger_account WHERE key IN ({_placeholders(len(specs))})",
            list(specs),
        )()
    )
    for key, (spec, amount) in specs.items():
        if key not in found:
            if amount < 0:
                raise InsufficientFunds(f"No account {key}.")
            raise LedgerError(f"No account {key}.")
        if spec.owner_id is not None and found[key] != spec.owner_id:
            raise LedgerError(f"Account {key} belongs to another user.")


# --- one database transaction ----------------------------------------------------------------


@contextlib.contextmanager
def _unit() -> Iterator[None]:
    """The statements sent inside run in one database transaction: a savepoint inside the
    caller's transaction, else a transaction of their own. A failure rolls all of it back and
    raises (database errors as Django's, like any other).

    PostgreSQL: the statements are collected (`_Batch`) and sent together with the transaction
    control, so nothing waits for the server until a statement's rows are read or the block
    ends. Code run inside must not open or end transactions itself. A unit opened inside
    another joins it: its statements go out with the outer unit's, which ends (or undoes)
    all of them."""
    if connection.vendor != "postgresql":
        with transaction.atomic():
            yield
        return
    if _batch.get() is not None:
        yield
        return
    connection.ensure_connection()
    batch = _Batch(nested=connection.in_atomic_block or not connection.get_autocommit())
    token = _batch.set(batch)
    with connection.wrap_database_errors:
        try:
            yield
            batch.send(last=True)
        except BaseException:
            batch.undo()
            raise
        finally:
            _batch.reset(token)
    for callback in batch.after_send:
        callback()


# Public names for callers outside the ledger whose own statements must share a unit's
# database transaction and round trips (a load's reservation, its charge with the posting).
unit = _unit
send = _send


def _joined() -> bool:
    """Inside a caller's unit (PostgreSQL): a failure can only be undone by the caller."""
    return _batch.get() is not None


# --- writing ---------------------------------------------------------------------------------


def _merge(entry: Entry) -> list[tuple[AccountSpec, int]]:
    """The legs merged per account; refuses legs that do not sum to zero."""
    merged: dict[str, list] = {}
    for spec, amount in entry.legs:
        merged.setdefault(spec.key, [spec, 0])[1] += amount
    if sum(amount for _, amount in merged.values()) != 0:
        raise LedgerError("Internal error: unbalanced transaction.")
    return [(spec, amount) for spec, amount in merged.values()]


def _check_floors(lines: list[tuple[AccountSpec, int]], balances: dict[str, int]) -> None:
    """A bounded account without a stored balance (a payable) is debited only after its row
    was locked and its balance read (`post_once`), and never below zero."""
    for spec, amount in lines:
        if amount < 0 and spec.bounded and not spec.stored:
            if spec.key not in balances:
                raise LedgerError(f"Internal error: {spec.key} is debited without its lock.")
            if balances[spec.key] + amount < 0:
                raise InsufficientFunds(
                    f"{spec.key} has {balances[spec.key]} nano-USD; {-amount} needed."
                )


def _send_transaction(
    entry: Entry, lines: list[tuple[AccountSpec, int]], *, idempotency_key: str,
    fingerprint: str,
) -> tuple[Transaction, Callable[[], list[tuple]]]:
    """Send the writes of one balanced transaction; returns it (without its id yet) and the
    reader of its id."""
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
        [idempotency_key, fingerprint, str(tx.kind), tx.memo, tx.license_ref, tx.document_ref,
         tx.external_ref, json.dumps(tx.details), created_at],
    )  # fmt: skip
    for spec, amount in sorted(lines, key=lambda line: line[0].key):
        if spec.stored:
            _send(_UPDATE_BALANCE, [amount, spec.key])
    if lines:
        params: list[Any] = []
        for spec, amount in lines:
            params += [idempotency_key, spec.key]
            if spec.owner_id is not None:
                params.append(spec.owner_id)
            params.append(amount)
            if spec.stored:
                params.append(spec.key)
            params.append(created_at)
        shape = tuple((spec.stored, spec.owner_id is not None) for spec, _ in lines)
        _send(_insert_postings_sql(shape), params)
    tx._state.adding = False
    tx._state.db = connection.alias
    return tx, read_id


def lock_balances(specs: list[AccountSpec]) -> dict[str, int]:
    """Lock the rows of bounded accounts (key order) and read their balances (a payable's is
    the sum of its postings), in the caller's transaction; a missing account is left out."""
    balances, _ = _lock_and_read(specs, "")
    return balances


def _lock_and_read(specs: list[AccountSpec], idempotency_key: str) -> tuple[dict[str, int], Any]:
    keys = sorted({s.key for s in specs})
    if any(not s.bounded for s in specs):
        raise LedgerError("Internal error: only bounded accounts are locked.")
    if connection.features.has_select_for_update:
        _send(_lock_sql(len(keys)), keys)
    params = keys + ([idempotency_key] if idempotency_key else [])
    balances: dict[str, int] = {}
    replay_id = None
    for source, key, value in _send(_read_sql(len(keys), bool(idempotency_key)), params)():
        if source:
            replay_id = value
        else:
            balances[key] = int(value)
    return balances, replay_id


class _Replay(Exception):  # noqa: N818 - control flow, never escapes this module
    """The idempotency key is already recorded: return its transaction, post nothing."""


def _attempt(
    idempotency_key: str,
    fingerprint: str,
    entry: Entry | None,
    accounts: list[AccountSpec],
    decide: Callable[[dict[str, int]], Entry | None] | None,
    decided: list[Entry],
) -> Transaction | None:
    with _unit():
        balances: dict[str, int] = {}
        if decide is not None:
            balances, replay_id = _lock_and_read(accounts, idempotency_key)
            if replay_id is not None:
                raise _Replay
            entry = decide(balances)
            if entry is None:
                return None
            decided.append(entry)
        assert entry is not None
        merged = _merge(entry)
        lines = [(spec, amount) for spec, amount in merged if amount != 0]
        # a zero leg posts nothing but still opens its account (a free license's escrow)
        opened = [(spec, 0) for spec, amount in merged if amount == 0 and spec.create]
        if opened:
            _open_accounts(opened)
        _check_floors(lines, balances)
        tx, read_id = _send_transaction(
            entry, lines, idempotency_key=idempotency_key, fingerprint=fingerprint
        )
    batch = _batch.get()
    if batch is not None:  # joined: the writes go out with the caller's unit, the id then
        batch.after_send.append(lambda: setattr(tx, "pk", read_id()[0][0]))
        return tx
    [(tx.pk,)] = read_id()
    return tx


def _post(
    idempotency_key: str,
    fingerprint: str,
    entry: Entry | None,
    accounts: list[AccountSpec],
    decide: Callable[[dict[str, int]], Entry | None] | None,
) -> Transaction | None:
    _check_key(idempotency_key)
    decided: list[Entry] = []
    for retry in (False, True):
        try:
            return _attempt(idempotency_key, fingerprint, entry, accounts, decide, decided)
        except (_Replay, IntegrityError) as exc:
            if isinstance(exc, IntegrityError) and _joined():
                raise  # the caller's transaction is aborted: the caller undoes and retries
            tx = Transaction.objects.filter(idempotency_key=idempotency_key).first()
            if tx is not None:  # a replay, or a racing call with the same key won
                if tx.fingerprint != fingerprint:
                    raise IdempotencyConflict(
                        f"Idempotency key {idempotency_key!r} was already used for a"
                        " different request."
                    ) from None
                return tx
            message = str(exc)
            if "ledger_account_balance_non_negative" in message:
                raise InsufficientFunds("The account cannot pay this amount.") from exc
            if retry or "account_id" not in message:
                raise
            # a leg's account is missing or another user's (the first posting to a new
            # account, or a refused one): create or explain, then run once more
            legs = _merge(entry or decided[-1])
            with _unit():
                _open_accounts([(spec, n) for spec, n in legs if n != 0 or spec.create])
    raise AssertionError("unreachable")


def post(*, idempotency_key: str, fingerprint: str, entry: Entry) -> Transaction:
    """Post `entry` once per idempotency key, in one database transaction (a savepoint inside
    the caller's): a retry with the same request returns the first transaction, a retry with a
    different request raises IdempotencyConflict; InsufficientFunds when a stored balance
    cannot pay. Missing accounts that may be created are created (then it runs again)."""
    tx = _post(idempotency_key, fingerprint, entry, [], None)
    assert tx is not None
    return tx


def post_once(
    *,
    idempotency_key: str,
    fingerprint: str,
    accounts: list[AccountSpec],
    decide: Callable[[dict[str, int]], Entry | None],
) -> Transaction | None:
    """Lock `accounts` (bounded ones), let `decide` work out the Entry from their balances (by
    key; a missing account is absent), and post it as `post` does; a replay returns the first
    transaction without calling decide. `accounts` must name every stored balance (wallet,
    escrow) the Entry may touch (locks in key order); its legs may name other accounts too
    (system accounts, a payable credited). Returns None when decide does."""
    return _post(idempotency_key, fingerprint, None, accounts, decide)


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
    return post(
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        entry=Entry(
            kind=kind,
            legs=[(source, -amount_nano), (dest, amount_nano)],
            memo=memo,
            license_ref=license_ref,
            document_ref=document_ref,
            external_ref=external_ref,
        ),
    )
