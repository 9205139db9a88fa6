"""Ledger writes. Every money-moving call is ONE database transaction with a unique idempotency
key; a retry with the same key (and the same request) returns the first Transaction without
posting again, a retry with the same key and a different request raises IdempotencyConflict.

All amounts are int nano-USD (1 USD = 10**9). All functions are keyword-only.

Transactions: each money-moving call runs its body in `transaction.atomic()` (its own database
transaction, or a savepoint when the caller already has one open). We open it inside the
function instead of decorating it, so that the one race we expect - two calls with the same
idempotency key at the same moment - can be resolved after the loser's savepoint rolled back:
the loser returns the winner's Transaction.

Locking: accounts with a floor (wallet, escrow, payable) are locked with SELECT ... FOR UPDATE
in ascending id order in one statement, before anything is written, so two transactions that
touch the same accounts queue instead of deadlocking, and the balance check in Python runs on
the locked, current balance (the CHECK constraint in the database is the backstop). System
accounts (platform revenue, compute revenue, Stripe clearing) are not locked (see models.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import stripe
from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from ledger import stripe_gateway
from ledger.accounts import SYSTEM_KEYS, escrow_key, payable_key, wallet_key
from ledger.errors import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    PaymentProviderError,
    PayoutStateError,
    SandboxDisabled,
)
from ledger.models import (
    BOUNDED_KINDS,
    NANO_PER_CENT,
    OPEN_PAYOUT_STATUSES,
    Account,
    AccountKind,
    ConnectAccount,
    Payout,
    PayoutEvent,
    PayoutStatus,
    Posting,
    StripeEvent,
    Tariff,
    TopUp,
    TopUpStatus,
    Transaction,
    TransactionKind,
)
from ledger.selectors import default_tariff

log = logging.getLogger(__name__)


# --- the posting engine ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    key: str
    kind: str
    owner_id: int | None = None  # when set, the account must belong to this user
    license_ref: str = ""
    create: bool = True  # create the account when missing (else it is just absent)

    @property
    def bounded(self) -> bool:
        return self.kind in BOUNDED_KINDS


def _wallet(agent_id: int) -> _Spec:
    return _Spec(wallet_key(agent_id), AccountKind.AGENT_WALLET, agent_id)


def _payable(publisher_id: int) -> _Spec:
    return _Spec(payable_key(publisher_id), AccountKind.PUBLISHER_PAYABLE, publisher_id)


def _escrow(license_ref: str, agent_id: int | None, *, create: bool = True) -> _Spec:
    return _Spec(
        escrow_key(license_ref), AccountKind.LICENSE_ESCROW, agent_id, license_ref, create
    )


def _system(kind: AccountKind) -> _Spec:
    return _Spec(SYSTEM_KEYS[kind], kind)


def _fingerprint(kind: str, **params: Any) -> str:
    raw = json.dumps([kind, params], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


def _check_key(idempotency_key: str) -> None:
    if not isinstance(idempotency_key, str) or not idempotency_key.strip():
        raise LedgerError("An idempotency key is required.")
    if len(idempotency_key) > 200:
        raise LedgerError("Idempotency keys are at most 200 characters.")


def _check_amount(amount_nano: int, *, allow_zero: bool = False) -> None:
    if isinstance(amount_nano, bool) or not isinstance(amount_nano, int):
        raise InvalidAmount("Amounts are integers in nano-USD.")
    if amount_nano < 0 or (amount_nano == 0 and not allow_zero):
        raise InvalidAmount(f"Amount must be {'>= 0' if allow_zero else '> 0'} nano-USD.")


def _existing(idempotency_key: str, fingerprint: str) -> Transaction | None:
    tx = Transaction.objects.filter(idempotency_key=idempotency_key).first()
    if tx is not None and tx.fingerprint != fingerprint:
        raise IdempotencyConflict(
            f"Idempotency key {idempotency_key!r} was already used for a different request."
        )
    return tx


class _Replay(Exception):  # noqa: N818 - control flow, never escapes this module
    """The idempotency key is already recorded: return its transaction, post nothing."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx


def _idempotent(
    idempotency_key: str, fingerprint: str, body: Callable[[], Transaction | None]
) -> Transaction | None:
    """Run `body` atomically unless the key is already recorded (then return that transaction).

    `body` calls `_lock(..., idempotency_key=...)`, which looks the key up in the same query
    that locks the accounts and raises _Replay when it exists. A racing call with the same key
    sees it only after its own statement (READ COMMITTED), so when the body fails - unique
    violation on the key, or a balance check that the winner's debit made fail - we look again
    after the rollback and return the winner's transaction if there is one.
    """
    _check_key(idempotency_key)
    try:
        with transaction.atomic():
            return body()
    except _Replay as replay:
        if replay.tx.fingerprint != fingerprint:
            raise IdempotencyConflict(
                f"Idempotency key {idempotency_key!r} was already used for a different request."
            ) from None
        return replay.tx
    except (IntegrityError, LedgerError) as exc:
        if isinstance(exc, IdempotencyConflict):
            raise
        tx = _existing(idempotency_key, fingerprint)
        if tx is not None:
            return tx
        if isinstance(exc, IntegrityError) and "ledger_account_balance_non_negative" in str(exc):
            raise InsufficientFunds("The account cannot pay this amount.") from exc
        raise


# PostgreSQL runs the hot path in two statements (lock + write) instead of ~8 ORM queries.
# The portable ORM path below does the same thing step by step; it serves SQLite (the demo)
# and is also tested on PostgreSQL (tests/ledger force it with USE_PG_FAST_PATH = False).
USE_PG_FAST_PATH = True

_ACCOUNT_COLUMNS = "id, key, kind, owner_id, license_ref, currency, balance, created_at"
_LOCK_SQL = f"""
WITH locked AS (
    SELECT {_ACCOUNT_COLUMNS} FROM ledger_account
     WHERE key = ANY(%(bounded)s) ORDER BY id FOR UPDATE
)
SELECT {_ACCOUNT_COLUMNS} FROM locked
UNION ALL
SELECT {_ACCOUNT_COLUMNS} FROM ledger_account WHERE key = ANY(%(system)s)
UNION ALL
SELECT id, idempotency_key, '#transaction', NULL, '', '', NULL, created_at
  FROM ledger_transaction WHERE idempotency_key = %(idem)s
"""

_WRITE_SQL = """
WITH t AS (
    INSERT INTO ledger_transaction (idempotency_key, fingerprint, kind, memo, license_ref,
                                    document_ref, external_ref, details, created_at)
    VALUES (%(idem)s, %(fp)s, %(kind)s, %(memo)s, %(license_ref)s, %(document_ref)s,
            %(external_ref)s, %(details)s::jsonb, %(now)s)
    RETURNING id
), p AS (
    INSERT INTO ledger_posting (transaction_id, account_id, amount, balance_after, created_at)
    SELECT t.id, x.account_id, x.amount, x.balance_after, %(now)s
      FROM t, unnest(%(p_account)s::bigint[], %(p_amount)s::bigint[],
                     %(p_after)s::bigint[]) AS x(account_id, amount, balance_after)
), u AS (
    UPDATE ledger_account a SET balance = a.balance + d.delta
      FROM unnest(%(u_account)s::bigint[], %(u_delta)s::bigint[]) AS d(id, delta)
     WHERE a.id = d.id
)
SELECT id FROM t
"""


def _fast() -> bool:
    return USE_PG_FAST_PATH and connection.vendor == "postgresql"


def _pg_cursor():
    """A server-side-binding psycopg cursor on Django's connection (same transaction): the
    parameters (arrays included) travel as binary values instead of being quoted into the SQL
    text by Django's client-side-binding cursor, which was most of the hot path's client CPU."""
    import psycopg

    connection.ensure_connection()
    return psycopg.Cursor(connection.connection)


def _ensure(specs: Iterable[_Spec]) -> None:
    Account.objects.bulk_create(
        [
            Account(
                key=s.key,
                kind=s.kind,
                owner_id=s.owner_id,
                license_ref=s.license_ref,
                balance=0 if s.bounded else None,
            )
            for s in specs
            if s.create
        ],
        ignore_conflicts=True,
    )


def _fetch_pg(bounded: list[str], system: list[str], idem: str) -> tuple[dict, int | None]:
    with _pg_cursor() as cur:
        cur.execute(
            _LOCK_SQL, {"bounded": bounded, "system": system, "idem": idem}
        )
        rows = cur.fetchall()
    found: dict[str, Account] = {}
    tx_id = None
    for row in rows:
        if row[2] == "#transaction":
            tx_id = row[0]
            continue
        account = Account(*row)
        account._state.adding = False
        account._state.db = connection.alias
        found[account.key] = account
    return found, tx_id


def _fetch_orm(bounded: list[str], system: list[str], idem: str) -> tuple[dict, int | None]:
    found = {
        a.key: a
        for a in Account.objects.select_for_update().filter(key__in=bounded).order_by("id")
    }
    found.update({a.key: a for a in Account.objects.filter(key__in=system)})
    tx_id = None
    if idem:
        tx_id = Transaction.objects.filter(idempotency_key=idem).values_list("id", flat=True)
        tx_id = tx_id.first()
    return found, tx_id


def _lock(specs: list[_Spec], *, idempotency_key: str = "") -> dict[str, Account]:
    """Lock the bounded accounts of `specs` (SELECT ... FOR UPDATE, in id order, one
    statement), read the system accounts (no lock), creating missing accounts, and raise
    _Replay if `idempotency_key` is already recorded."""
    bounded = [s.key for s in specs if s.bounded]
    system = [s.key for s in specs if not s.bounded]
    fetch = _fetch_pg if _fast() else _fetch_orm
    found, tx_id = fetch(bounded, system, idempotency_key)
    missing = [s for s in specs if s.key not in found and s.create]
    if missing:
        _ensure(missing)
        found, tx_id = fetch(bounded, system, idempotency_key)
    if tx_id is not None:
        raise _Replay(Transaction.objects.get(pk=tx_id))
    for s in specs:
        account = found.get(s.key)
        if account is not None and s.owner_id is not None and account.owner_id != s.owner_id:
            raise LedgerError(f"Account {s.key} belongs to another user.")
    return found


def _post(
    *,
    kind: TransactionKind,
    idempotency_key: str,
    fingerprint: str,
    legs: list[tuple[Account, int]],
    memo: str = "",
    license_ref: str = "",
    document_ref: str = "",
    external_ref: str = "",
    details: dict[str, Any] | None = None,
) -> Transaction:
    """Write one balanced transaction. Bounded accounts in `legs` must be locked by `_lock`."""
    merged: dict[int, list] = {}
    for account, amount in legs:
        entry = merged.setdefault(account.pk, [account, 0])
        entry[1] += amount
    if sum(amount for _, amount in merged.values()) != 0:
        raise LedgerError("Internal error: unbalanced transaction.")
    lines: list[tuple[Account, int, int | None]] = []
    for account, amount in merged.values():
        if amount == 0:
            continue
        balance_after = None
        if account.is_bounded:
            balance_after = account.balance + amount
            if balance_after < 0:
                raise InsufficientFunds(
                    f"{account.get_kind_display()} has {account.balance} nano-USD; "
                    f"{-amount} needed."
                )
            account.balance = balance_after
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
    deltas = {a.pk: amount for a, amount, after in lines if after is not None}
    if _fast():
        with _pg_cursor() as cur:
            cur.execute(
                _WRITE_SQL,
                {
                    "idem": tx.idempotency_key,
                    "fp": tx.fingerprint,
                    "kind": str(tx.kind),
                    "memo": tx.memo,
                    "license_ref": tx.license_ref,
                    "document_ref": tx.document_ref,
                    "external_ref": tx.external_ref,
                    "details": json.dumps(tx.details),
                    "now": tx.created_at,
                    "p_account": [a.pk for a, _, _ in lines],
                    "p_amount": [amount for _, amount, _ in lines],
                    "p_after": [after for _, _, after in lines],
                    "u_account": list(deltas),
                    "u_delta": list(deltas.values()),
                },
            )
            tx.pk = cur.fetchone()[0]
        tx._state.adding = False
        tx._state.db = connection.alias
        return tx
    tx.save(force_insert=True)
    if lines:
        Posting.objects.bulk_create(
            Posting(transaction=tx, account=a, amount=amount, balance_after=after,
                    created_at=tx.created_at)
            for a, amount, after in lines
        )
    if deltas:
        Account.objects.filter(pk__in=list(deltas)).update(
            balance=F("balance")
            + Case(*(When(pk=pk, then=Value(d)) for pk, d in deltas.items()), default=Value(0))
        )
    return tx


# --- the PostgreSQL one-round-trip path ------------------------------------------------------
#
# On PostgreSQL the idempotent services (top-up, purchase, settlement, egress) call the
# ledger_post() function of migration 0004: account creation, the row locks (bounded accounts,
# id order), the idempotency check, the balance floors, the transaction, its postings and the
# balance updates happen in ONE statement. Outside a transaction that statement is its own
# transaction (no BEGIN/COMMIT round trips); inside one (e.g. the marketplace's settlement) it
# runs in a savepoint, like the ORM path. Python still computes every amount (the split, the
# legs) and the fingerprint; the database enforces the floors, the zero sum (deferred trigger),
# immutability and the unique key exactly as for the ORM path.

_POST_SQL = (
    "SELECT status, tx_id, tx_fingerprint, charged FROM ledger_post("
    "%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::timestamptz, %s::text[], %s::text[],"
    " %s::bigint[], %s::text[], %s::boolean[], %s::boolean[], %s::bigint[], %s::integer,"
    " %s::integer, %s::bigint)"
)
_psycopg = None


def _call_post(params: tuple) -> tuple:
    global _psycopg
    if _psycopg is None:
        import psycopg

        _psycopg = psycopg
    connection.ensure_connection()
    with connection.wrap_database_errors, _psycopg.Cursor(connection.connection) as cur:
        cur.execute(_POST_SQL, params, prepare=True)  # server-side binding, prepared once
        return cur.fetchone()


# Array parameters travel as PostgreSQL array literals (cast in _POST_SQL): psycopg's generic
# list dumper (type detection per element) was a third of the fast path's client CPU.
def _text_array(values: list[str]) -> str:
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'"{v}"' for v in quoted) + "}"


def _int_array(values: list[int | None]) -> str:
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


def _bool_array(values: list[bool]) -> str:
    return "{" + ",".join("t" if v else "f" for v in values) + "}"


def _post_fast(
    *,
    kind: TransactionKind,
    idempotency_key: str,
    fingerprint: str,
    legs: list[tuple[_Spec, int]],
    cap: tuple[_Spec, _Spec, int] | None = None,
    memo: str = "",
    license_ref: str = "",
    document_ref: str = "",
    external_ref: str = "",
    details: dict[str, Any] | None = None,
    missing_message: str = "",
) -> Transaction:
    """Post one idempotent transaction through ledger_post() (see migration 0004).

    `legs` are (account spec, signed amount); `cap` is (from, to, at most): a transfer capped
    at the from-account's balance (the compute charge), recorded in details as
    compute_charged_nano / compute_uncharged_nano.
    """
    _check_key(idempotency_key)
    merged: dict[str, list] = {}
    for spec, amount in legs:
        entry = merged.get(spec.key)
        if entry is None:
            merged[spec.key] = [spec, amount]
        else:
            entry[1] += amount
    cap_from = cap_to = None
    cap_amount = 0
    if cap is not None:
        for spec in cap[:2]:
            merged.setdefault(spec.key, [spec, 0])
        keys = list(merged)
        cap_from, cap_to = keys.index(cap[0].key) + 1, keys.index(cap[1].key) + 1
        cap_amount = cap[2]
    entries = list(merged.values())
    if sum(amount for _, amount in entries) != 0:
        raise LedgerError("Internal error: unbalanced transaction.")
    details = details or {}
    memo = memo[:255]
    now = timezone.now()
    specs = [s for s, _ in entries]
    params = (
        idempotency_key, fingerprint, str(kind), memo, license_ref, document_ref, external_ref,
        json.dumps(details), now,
        _text_array([s.key for s in specs]),
        _text_array([str(s.kind) for s in specs]),
        _int_array([s.owner_id for s in specs]),
        _text_array([s.license_ref for s in specs]),
        _bool_array([s.bounded for s in specs]),
        _bool_array([s.create for s in specs]),
        _int_array([amount for _, amount in entries]),
        cap_from, cap_to, cap_amount,
    )
    try:
        if connection.in_atomic_block:
            with transaction.atomic():  # a savepoint: a failure leaves the caller's tx usable
                status, tx_id, tx_fp, charged = _call_post(params)
        else:
            status, tx_id, tx_fp, charged = _call_post(params)  # one statement, one transaction
    except DatabaseError as exc:
        state = getattr(exc.__cause__, "sqlstate", None)
        message = getattr(getattr(exc.__cause__, "diag", None), "message_primary", "") or ""
        # as in _idempotent: a failure may be the loser's side of a same-key race
        tx = _existing(idempotency_key, fingerprint)
        if tx is not None:
            return tx
        if state == "LDG01" or (
            isinstance(exc, IntegrityError) and "ledger_account_balance_non_negative" in str(exc)
        ):
            raise InsufficientFunds(message or "The account cannot pay this amount.") from None
        if state == "LDG02":
            raise LedgerError(message) from None
        if state == "LDG03":
            raise InsufficientFunds(missing_message or message) from None
        raise
    if status == "replay":
        if tx_fp != fingerprint:
            raise IdempotencyConflict(
                f"Idempotency key {idempotency_key!r} was already used for a different request."
            )
        return Transaction.objects.get(pk=tx_id)
    if cap is not None:
        details = {
            **details,
            "compute_charged_nano": charged,
            "compute_uncharged_nano": cap_amount - charged,
        }
    tx = Transaction(
        id=tx_id,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        kind=kind,
        memo=memo,
        license_ref=license_ref,
        document_ref=document_ref,
        external_ref=external_ref,
        details=details,
        created_at=now,
    )
    tx._state.adding = False
    tx._state.db = connection.alias
    return tx


# --- money-moving services -------------------------------------------------------------------


def _transfer(
    *,
    source: _Spec,
    dest: _Spec,
    amount_nano: int,
    kind: TransactionKind,
    idempotency_key: str,
    fingerprint: str,
    **fields: str,
) -> Transaction:
    """Post `amount_nano` from `source` to `dest` as one idempotent transaction: one
    ledger_post() call on PostgreSQL, else lock the accounts and post (ORM path). `fields` are
    the transaction's memo / license_ref / document_ref / external_ref."""
    if _fast():
        return _post_fast(
            kind=kind,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            legs=[(source, -amount_nano), (dest, amount_nano)],
            **fields,
        )

    def body() -> Transaction:
        # A bounded account first (missing accounts are created in list order).
        specs = [source, dest] if source.bounded else [dest, source]
        acc = _lock(specs, idempotency_key=idempotency_key)
        return _post(
            kind=kind,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            legs=[(acc[source.key], -amount_nano), (acc[dest.key], amount_nano)],
            **fields,
        )

    return _idempotent(idempotency_key, fingerprint, body)


def credit_topup(
    *, agent, amount_nano: int, idempotency_key: str, external_ref: str = ""
) -> Transaction:
    """Stripe clearing -> agent wallet (called from the signed Stripe webhook)."""
    _check_amount(amount_nano)
    return _transfer(
        source=_system(AccountKind.STRIPE_CLEARING),
        dest=_wallet(agent.pk),
        amount_nano=amount_nano,
        kind=TransactionKind.TOPUP,
        idempotency_key=idempotency_key,
        fingerprint=_fingerprint("topup", agent=agent.pk, amount=amount_nano, ref=external_ref),
        memo="Wallet top-up",
        external_ref=external_ref,
    )


# The most one sandbox credit may add, so a test wallet stays a test wallet.
SANDBOX_CREDIT_MAX_NANO = 1000 * 10**9


def credit_sandbox(*, agent, amount_nano: int, idempotency_key: str) -> Transaction:
    """Sandbox funding -> agent wallet: test credits, only while settings.SANDBOX_MODE is on
    (never in production settings). Double entry like a top-up; the same key credits once."""
    if not settings.SANDBOX_MODE:
        raise SandboxDisabled("Test credits are only available in sandbox mode.")
    _check_amount(amount_nano)
    if amount_nano > SANDBOX_CREDIT_MAX_NANO:
        raise InvalidAmount("A sandbox credit is at most $1,000.")
    return _transfer(
        source=_system(AccountKind.SANDBOX_FUNDING),
        dest=_wallet(agent.pk),
        amount_nano=amount_nano,
        kind=TransactionKind.SANDBOX_CREDIT,
        idempotency_key=idempotency_key,
        fingerprint=_fingerprint("sandbox_credit", agent=agent.pk, amount=amount_nano),
        memo="Sandbox test credit",
    )


def purchase_license(
    *, agent, license_ref: str, amount_nano: int, idempotency_key: str, document_ref: str = ""
) -> Transaction:
    """Agent wallet -> escrow(license_ref). Raises InsufficientFunds (API: 402).

    A zero price (a free license) records a transaction with no postings and opens the escrow.
    """
    _check_amount(amount_nano, allow_zero=True)
    if not license_ref:
        raise LedgerError("license_ref is required.")
    return _transfer(
        source=_wallet(agent.pk),
        dest=_escrow(license_ref, agent.pk),
        amount_nano=amount_nano,
        kind=TransactionKind.LICENSE_PURCHASE,
        idempotency_key=idempotency_key,
        fingerprint=_fingerprint(
            "purchase", agent=agent.pk, license=license_ref, amount=amount_nano
        ),
        memo=f"License {license_ref}",
        license_ref=license_ref,
        document_ref=document_ref,
    )


def split_amount(amount_nano: int, publisher_share: Decimal) -> tuple[int, int]:
    """(publisher, platform): publisher = floor(amount x share), platform = the remainder."""
    share = Decimal(str(publisher_share))
    if not Decimal(0) <= share <= Decimal(1):
        raise LedgerError("publisher_share must be between 0 and 1.")
    publisher = int((share * amount_nano).to_integral_value(rounding=ROUND_FLOOR))
    return publisher, amount_nano - publisher


def settle_load(
    *,
    license_ref: str,
    publisher,
    amount_nano: int,
    publisher_share: Decimal,
    idempotency_key: str,
    agent=None,
    compute_nano: int = 0,
    memo: str = "",
    document_ref: str = "",
) -> Transaction:
    """Meter one served load, in ONE transaction:

    - escrow(license_ref) -> publisher payable (floor(amount x share)) + platform revenue (the
      remainder); raises InsufficientFunds when the escrow cannot pay `amount_nano`;
    - if compute_nano > 0: agent wallet -> platform compute revenue. The compute charge is
      CAPPED at the wallet balance, so a load that was served always settles; what could not be
      charged is recorded in `details["compute_uncharged_nano"]`. `agent` defaults to the
      license's owner (the agent who bought the escrow).
    """
    _check_amount(amount_nano, allow_zero=True)
    _check_amount(compute_nano, allow_zero=True)
    publisher_nano, platform_nano = split_amount(amount_nano, publisher_share)
    fp = _fingerprint(
        "settle",
        license=license_ref,
        publisher=publisher.pk,
        amount=amount_nano,
        share=str(publisher_share),
        agent=getattr(agent, "pk", None),
        compute=compute_nano,
    )

    def buyer_id() -> int | None:
        agent_id = getattr(agent, "pk", None)
        if compute_nano > 0 and agent_id is None:  # default: the agent who bought the license
            agent_id = (
                Account.objects.filter(key=escrow_key(license_ref))
                .values_list("owner_id", flat=True)
                .first()
            )
        return agent_id

    def details(charged: int) -> dict[str, Any]:
        return {
            "publisher_id": publisher.pk,
            "publisher_nano": publisher_nano,
            "platform_nano": platform_nano,
            "publisher_share": str(publisher_share),
            "compute_requested_nano": compute_nano,
            "compute_charged_nano": charged,
            "compute_uncharged_nano": compute_nano - charged,
        }

    if _fast():
        agent_id = buyer_id()
        cap = None
        if compute_nano > 0 and agent_id is not None:
            cap = (_wallet(agent_id), _system(AccountKind.PLATFORM_COMPUTE_REVENUE), compute_nano)
        return _post_fast(
            kind=TransactionKind.LOAD_SETTLEMENT,
            idempotency_key=idempotency_key,
            fingerprint=fp,
            legs=[
                (_escrow(license_ref, None, create=False), -amount_nano),
                (_payable(publisher.pk), publisher_nano),
                (_system(AccountKind.PLATFORM_REVENUE), platform_nano),
            ],
            cap=cap,  # the compute charge, capped at the wallet balance (in the database)
            memo=memo or f"Load of {license_ref}",
            license_ref=license_ref,
            document_ref=document_ref,
            details=details(charged=0),  # with a cap, ledger_post() records what it charged
            missing_message=f"No escrow for license {license_ref!r}.",
        )

    def body() -> Transaction:
        agent_id = buyer_id()
        specs = [
            _escrow(license_ref, None, create=False),
            _payable(publisher.pk),
            _system(AccountKind.PLATFORM_REVENUE),
        ]
        if compute_nano > 0 and agent_id is not None:
            specs += [_wallet(agent_id), _system(AccountKind.PLATFORM_COMPUTE_REVENUE)]
        acc = _lock(specs, idempotency_key=idempotency_key)
        if specs[0].key not in acc:
            if amount_nano > 0:
                raise InsufficientFunds(f"No escrow for license {license_ref!r}.")
            # a free license (no purchase, so no escrow): only compute can be charged
            acc[specs[0].key] = Account(key=specs[0].key, kind=specs[0].kind, balance=0)
        esc = acc[specs[0].key]
        if esc.balance < amount_nano:
            raise InsufficientFunds(
                f"Escrow of {license_ref!r} has {esc.balance} nano-USD; {amount_nano} needed."
            )
        legs = [
            (esc, -amount_nano),
            (acc[specs[1].key], publisher_nano),
            (acc[specs[2].key], platform_nano),
        ]
        charged = 0
        if len(specs) > 3:
            wallet = acc[specs[3].key]
            charged = min(compute_nano, wallet.balance)
            legs += [(wallet, -charged), (acc[specs[4].key], charged)]
        return _post(
            kind=TransactionKind.LOAD_SETTLEMENT,
            idempotency_key=idempotency_key,
            fingerprint=fp,
            legs=legs,
            memo=memo or f"Load of {license_ref}",
            license_ref=license_ref,
            document_ref=document_ref,
            details=details(charged),
        )

    return _idempotent(idempotency_key, fp, body)


def record_egress(
    *,
    agent,
    amount_nano: int,
    idempotency_key: str,
    memo: str = "",
    license_ref: str = "",
    document_ref: str = "",
) -> Transaction:
    """Agent wallet -> platform revenue for KV shipping bytes. Raises InsufficientFunds."""
    _check_amount(amount_nano, allow_zero=True)
    return _transfer(
        source=_wallet(agent.pk),
        dest=_system(AccountKind.PLATFORM_REVENUE),
        amount_nano=amount_nano,
        kind=TransactionKind.EGRESS,
        idempotency_key=idempotency_key,
        fingerprint=_fingerprint("egress", agent=agent.pk, amount=amount_nano, license=license_ref),
        memo=memo or "KV egress",
        license_ref=license_ref,
        document_ref=document_ref,
    )


def refund_escrow(*, license_ref: str, agent, idempotency_key: str) -> Transaction | None:
    """All remaining escrow of the license -> the agent's wallet (license expired or revoked).

    Returns None (and posts nothing) when there is nothing to refund.
    """
    fp = _fingerprint("refund", license=license_ref, agent=agent.pk)

    def body() -> Transaction | None:
        escrow, wallet = _escrow(license_ref, agent.pk, create=False), _wallet(agent.pk)
        acc = _lock([escrow, wallet], idempotency_key=idempotency_key)
        if escrow.key not in acc:
            return None
        remaining = acc[escrow.key].balance
        if remaining == 0:
            return None
        return _post(
            kind=TransactionKind.ESCROW_REFUND,
            idempotency_key=idempotency_key,
            fingerprint=fp,
            legs=[(acc[escrow.key], -remaining), (acc[wallet.key], remaining)],
            memo=f"Refund of license {license_ref}",
            license_ref=license_ref,
        )

    return _idempotent(idempotency_key, fp, body)


# --- payouts ---------------------------------------------------------------------------------


def _payout_event(payout: Payout, from_status: str, actor, note: str = "") -> None:
    PayoutEvent.objects.create(
        payout=payout,
        from_status=from_status,
        to_status=payout.status,
        actor=actor if getattr(actor, "pk", None) else None,
        note=note,
    )


def _set_status(payout: Payout, status: PayoutStatus, actor, note: str = "", **fields) -> None:
    previous = payout.status
    payout.status = status
    for name, value in fields.items():
        setattr(payout, name, value)
    payout.save(update_fields=["status", "updated_at", *fields])
    _payout_event(payout, previous, actor, note)


def _locked_payout(payout: Payout | int) -> Payout:
    pk = payout.pk if isinstance(payout, Payout) else payout
    return Payout.objects.select_for_update(of=("self",)).select_related("publisher").get(pk=pk)


@transaction.atomic
def create_payout(
    *, publisher, amount_nano: int | None = None, actor=None, note: str = ""
) -> Payout:
    """A payout pending review, for whole cents of the publisher's payable (default: all of it,
    rounded down to a cent; the sub-cent remainder stays payable). Nothing is posted until
    approval; at most one open payout per publisher (a partial unique index)."""
    acc = _lock([_payable(publisher.pk)])[payable_key(publisher.pk)]
    if amount_nano is None:
        amount_nano = acc.balance - acc.balance % NANO_PER_CENT
    _check_amount(amount_nano)
    if amount_nano % NANO_PER_CENT:
        raise InvalidAmount("Payouts are whole cents (multiples of 10,000,000 nano-USD).")
    if amount_nano > acc.balance:
        raise InsufficientFunds(f"Payable is {acc.balance} nano-USD; {amount_nano} requested.")
    if Payout.objects.filter(publisher=publisher, status__in=OPEN_PAYOUT_STATUSES).exists():
        raise PayoutStateError("This publisher already has an open payout.")
    payout = Payout.objects.create(publisher=publisher, amount_nano=amount_nano)
    _payout_event(payout, "", actor, note or "created")
    return payout


def create_due_payouts(*, threshold_nano: int | None = None) -> list[Payout]:
    """Settlement run: a payout (pending review) for every publisher whose payable is at least
    the threshold and who has no open payout. Each payout is its own transaction."""
    threshold = settings.PAYOUT_THRESHOLD_NANO_USD if threshold_nano is None else threshold_nano
    threshold = max(threshold, NANO_PER_CENT)
    due = (
        Account.objects.filter(kind=AccountKind.PUBLISHER_PAYABLE, balance__gte=threshold)
        .exclude(owner__payouts__status__in=OPEN_PAYOUT_STATUSES)
        .select_related("owner")
        .order_by("id")
    )
    created = []
    for account in due:
        try:
            created.append(create_payout(publisher=account.owner, note="settlement run"))
        except (PayoutStateError, IntegrityError):
            continue  # a concurrent run created it
    return created


def approve_payout(*, payout: Payout | int, actor, send_transfer: bool = True) -> Payout:
    """pending_review -> approved: posts payable -> Stripe clearing, then sends the Stripe
    transfer (outside the database transaction). Called inside an outer transaction, the
    transfer is sent after that transaction commits."""
    with transaction.atomic():
        payout = _locked_payout(payout)
        if payout.status != PayoutStatus.PENDING_REVIEW:
            raise PayoutStateError(f"Payout #{payout.pk} is {payout.status}, not pending review.")
        payable, clearing = _payable(payout.publisher_id), _system(AccountKind.STRIPE_CLEARING)
        key = f"payout:{payout.pk}"
        acc = _lock([payable, clearing])
        tx = _post(
            kind=TransactionKind.PAYOUT,
            idempotency_key=key,
            fingerprint=_fingerprint("payout", payout=payout.pk, amount=payout.amount_nano),
            legs=[(acc[payable.key], -payout.amount_nano), (acc[clearing.key], payout.amount_nano)],
            memo=f"Payout #{payout.pk}",
        )
        _set_status(payout, PayoutStatus.APPROVED, actor, "approved", transaction=tx)
    if send_transfer:
        payout_id = payout.pk
        transaction.on_commit(lambda: _send_quietly(payout_id))
    return payout


def _send_quietly(payout_id: int) -> None:
    try:
        send_payout_transfer(payout_id=payout_id)
    except LedgerError as exc:  # left approved; the retry task or an admin sends it again
        log.warning("payout %s: transfer not sent: %s", payout_id, exc)


def send_payout_transfer(*, payout_id: int) -> Payout:
    """Send the Stripe transfer of an approved payout, at most once.

    The Stripe idempotency key is "payout-<id>", so a retry after a timeout or a crash (ours or
    the network's) never creates a second transfer; a payout already paid is not sent again.
    Transient Stripe errors leave the payout approved and raise PaymentProviderError (retry);
    a refusal (invalid request, e.g. no such destination) fails the payout and reverses it.
    """
    payout = Payout.objects.select_related("publisher").get(pk=payout_id)
    if payout.status != PayoutStatus.APPROVED:
        return payout
    connect = ConnectAccount.objects.filter(publisher_id=payout.publisher_id).first()
    if connect is None:
        return mark_payout_failed(
            payout=payout, reason="The publisher has no Stripe Connect account.", actor=None
        )
    try:
        transfer = stripe_gateway.create_transfer(
            amount_cents=payout.amount_cents,
            destination=connect.stripe_account_id,
            idempotency_key=payout.stripe_idempotency_key,
            payout_id=payout.pk,
        )
    except stripe.InvalidRequestError as exc:
        return mark_payout_failed(payout=payout, reason=f"Stripe refused: {exc}", actor=None)
    except stripe.StripeError as exc:
        raise PaymentProviderError(
            f"Stripe transfer for payout #{payout.pk} failed: {exc}"
        ) from exc
    with transaction.atomic():
        payout = _locked_payout(payout)
        if payout.status == PayoutStatus.APPROVED:
            _set_status(
                payout, PayoutStatus.PAID, None, f"transfer {transfer.id}",
                stripe_transfer_id=transfer.id,
            )
    return payout


@transaction.atomic
def reject_payout(*, payout: Payout | int, actor, note: str = "") -> Payout:
    """pending_review -> rejected. Nothing had been posted; the payable stays."""
    payout = _locked_payout(payout)
    if payout.status != PayoutStatus.PENDING_REVIEW:
        raise PayoutStateError(f"Payout #{payout.pk} is {payout.status}, not pending review.")
    _set_status(payout, PayoutStatus.REJECTED, actor, note or "rejected")
    return payout


@transaction.atomic
def mark_payout_failed(*, payout: Payout | int, reason: str, actor=None) -> Payout:
    """approved|paid -> failed: the transfer failed or was reversed. Posts the reversal
    (Stripe clearing -> payable), so the publisher's payable is whole again."""
    payout = _locked_payout(payout)
    if payout.status not in (PayoutStatus.APPROVED, PayoutStatus.PAID):
        raise PayoutStateError(f"Payout #{payout.pk} is {payout.status}; nothing to reverse.")
    payable, clearing = _payable(payout.publisher_id), _system(AccountKind.STRIPE_CLEARING)
    acc = _lock([payable, clearing])
    tx = _post(
        kind=TransactionKind.PAYOUT_REVERSAL,
        idempotency_key=f"payout-reversal:{payout.pk}",
        fingerprint=_fingerprint("payout_reversal", payout=payout.pk, amount=payout.amount_nano),
        legs=[(acc[clearing.key], -payout.amount_nano), (acc[payable.key], payout.amount_nano)],
        memo=f"Reversal of payout #{payout.pk}",
        details={"reason": reason[:500]},
    )
    _set_status(
        payout, PayoutStatus.FAILED, actor, reason, reversal_transaction=tx,
        failure_reason=reason,
    )
    return payout


# --- Stripe bookkeeping ----------------------------------------------------------------------


@transaction.atomic
def record_checkout_session(*, agent, session_id: str, amount_cents: int) -> TopUp:
    return TopUp.objects.create(agent=agent, session_id=session_id, amount_cents=amount_cents)


@transaction.atomic
def save_connect_account(*, publisher, stripe_account_id: str) -> ConnectAccount:
    connect, _ = ConnectAccount.objects.get_or_create(
        publisher=publisher, defaults={"stripe_account_id": stripe_account_id}
    )
    return connect


def _credit_checkout_session(session: dict[str, Any]) -> str:
    from django.contrib.auth import get_user_model

    session_id = session["id"]
    if session.get("payment_status") != "paid":
        return "not paid yet"
    amount_cents = int(session.get("amount_total") or 0)
    topup = TopUp.objects.select_for_update().filter(session_id=session_id).first()
    if topup is not None:
        agent = topup.agent
    else:
        agent_id = session.get("client_reference_id") or (session.get("metadata") or {}).get(
            "agent_id"
        )
        if not agent_id:
            return "no agent on session"
        agent = get_user_model().objects.get(pk=int(agent_id))
    tx = credit_topup(
        agent=agent,
        amount_nano=amount_cents * NANO_PER_CENT,
        idempotency_key=f"stripe-checkout:{session_id}",
        external_ref=session_id,
    )
    if topup is not None and topup.status != TopUpStatus.PAID:
        topup.status, topup.transaction, topup.paid_at = TopUpStatus.PAID, tx, timezone.now()
        topup.save(update_fields=["status", "transaction", "paid_at"])
    return f"credited {amount_cents} cents as transaction {tx.pk}"


@transaction.atomic
def handle_stripe_event(*, event_id: str, event_type: str, data_object: dict[str, Any]) -> str:
    """Apply one verified Stripe event, once: the event id is recorded in the same transaction
    (unique), so redeliveries are no-ops. Top-ups are credited from checkout.session.completed
    with payment_status "paid" and from checkout.session.async_payment_succeeded, keyed by the
    session id, so a session is credited once whichever events arrive."""
    _, created = StripeEvent.objects.get_or_create(
        event_id=event_id, defaults={"type": event_type}
    )
    if not created:
        return "duplicate"
    if event_type in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        result = _credit_checkout_session(data_object)
    elif event_type == "account.updated":
        n = ConnectAccount.objects.filter(stripe_account_id=data_object.get("id")).update(
            payouts_enabled=bool(data_object.get("payouts_enabled"))
        )
        result = f"updated {n} connect account(s)"
    elif event_type == "transfer.reversed":
        payout = Payout.objects.filter(stripe_transfer_id=data_object.get("id")).first()
        if payout is not None and payout.status == PayoutStatus.PAID:
            mark_payout_failed(payout=payout, reason="Stripe transfer reversed")
            result = f"payout {payout.pk} reversed"
        else:
            result = "no matching paid payout"
    else:
        result = "ignored"
    StripeEvent.objects.filter(event_id=event_id).update(result=result[:255])
    return result


# --- tariffs ---------------------------------------------------------------------------------


def ensure_tariff(*, model_slug: str) -> Tariff:
    """The model's stored tariff, created from the registry's default when there is none (so
    staff can edit it in the admin). KeyError for a model not in the registry."""
    tariff = Tariff.objects.filter(model_slug=model_slug).first()
    if tariff is not None:
        return tariff
    default = default_tariff(model_slug)
    try:
        with transaction.atomic():
            default.save()
    except IntegrityError:  # created meanwhile by a concurrent call
        return Tariff.objects.get(model_slug=model_slug)
    return default
