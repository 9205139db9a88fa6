"""Loads: reserve a license load, run the generation on a GPU worker, charge exactly once.

The request path
----------------
The API process reserves a load of the license (one transaction), then calls a GPU worker of
the document's model directly over HTTP (marketplace.worker_client: the registry's rendezvous
order, the worker holding the KV in memory first, failing over to the next on a connection
error or a broken stream before any token reached the agent) and reads the worker's stream of
events. Celery is not on this path.

Charge rule (what a load costs, and when)
-----------------------------------------
* A load is **served** once the worker produced its first token for the agent: a streamed load
  when its first token is relayed, a non-streamed load when its whole result came back. A
  served load is charged: the load price plus compute for its suffix tokens and the output
  tokens actually produced up to the last text the agent was sent. That holds when the client
  disconnects mid-stream (the disconnect stops the generation on the worker; the tokens made
  until then are charged) and when the worker dies mid-stream (the stream ends with an error
  event; the tokens delivered are charged).
* A load that failed before its first token (no worker, every worker busy, the engine refused
  the request, a timeout) is **not charged**: it is marked failed and its reservation is
  released. A non-streamed load whose worker dies before the result is complete is not
  served yet: it is re-run on the next worker (one charge at most, whichever finishes).

Exactly once, even when the charge fails (the outbox)
-----------------------------------------------------
The worker's result is recorded durably on the Load (status ``served``, ``response`` = the
result; a streamed load is recorded ``served`` with its partial usage before its first token
goes out, and again with its final usage) before the agent is answered, and the charge
is then made from that record: one transaction that locks the Load, moves it served ->
succeeded and calls ledger.settle_load(idempotency_key="load:<id>"). If the charge
transaction fails, the request retries it a few times; if it still fails the agent still gets
the answer and the load stays ``served``: the sweep (sweep_loads, every LOAD_SWEEP_SECONDS in
beat) charges it later, as does a retry of the request with the same Idempotency-Key. The
status check and the ledger key make a second charge impossible. A stream whose later record
fails (the database went away mid-stream) still ends normally for the agent; the load stays
``served`` with its first record and the sweep charges it.

Abandoned work
--------------
Each web process touches its in-flight loads' ``heartbeat_at`` every LOAD_HEARTBEAT_SECONDS
(marketplace.heartbeats). The sweep fails, uncharged, a pending load whose heartbeat is older
than LOAD_STALE_SECONDS (its web process died; its reservation is released within a minute),
and charges a served load whose result is final or whose heartbeat went stale. Only loads with
a fresh heartbeat count against MAX_IN_FLIGHT_LOADS_PER_AGENT (429 too_many_requests with
Retry-After beyond it).

Retries and locks
-----------------
* The Load is unique per (agent, Idempotency-Key). A retry of a succeeded load returns the
  stored first response and is not charged again (a served one is charged first); a retry
  while the first attempt is still running gets 409 request_in_progress; a retry of a failed
  or abandoned load runs it again on the same Load row (ledger key "load:<id>" either way). A
  reused key with a different body is a 409.
* A load is reserved (license.loads_used + 1, checked by a database constraint) before it is
  dispatched, so concurrent requests cannot overdraw a license; failures release it.
* Lock order: the Load row, then the License row, then the ledger's accounts (in id order).
  Only those rows are locked (``select_for_update(of=("self",))``): the Document and the agent's
  User are shared by every concurrent load and are read, never locked, or concurrent charges
  on one document deadlock.

Round trips (PostgreSQL)
------------------------
A new Idempotency-Key (the common request) is reserved in one round trip: the License row's
lock and one statement that checks the license, the in-flight cap and the wallet (402 before
anything is reserved), increments loads_used and inserts the Load, sent as one implicit
transaction (`_reserve_new`). A served load is charged in three (`_charge_served_batched`):
the Load and License locks with the tariff, the ledger's locking read, then the posting, the
Load's row and COMMIT. A retried key, a KV download, a charge the batch could not make, and
SQLite take the ORM path (`_reserve_orm`, `_charge_locked`); both paths refuse in the same
order with `_refusal` and settle with `_settle`, and tests run both.

KV downloads (shipping mode) are charged before the first byte is sent (load price plus
egress bytes, one transaction), because the bytes cannot be taken back; a retry with the same
Idempotency-Key re-sends the artifact without a new charge.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, models, transaction
from django.db.models import F
from django.utils import timezone

from marketplace import heartbeats
from marketplace.models import (
    Document,
    DocumentStatus,
    License,
    LicenseStatus,
    Load,
    LoadKind,
    LoadStatus,
    User,
)
from marketplace.services.errors import MarketplaceError, conflict, not_found
from marketplace.services.licenses import require_agent

log = logging.getLogger(__name__)

# Egress for shipping mode, billed to the agent's wallet: $0.09 per GB = 0.09 nano-USD per byte.
EGRESS_NANO_PER_GB = 90_000_000
TOO_MANY_RETRY_AFTER_SECONDS = 1
CHARGE_ATTEMPTS = 3  # in the request, before the sweep takes over
CHARGE_RETRY_SECONDS = 0.05


def request_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def egress_price_nano(n_bytes: int) -> int:
    per_gb = int(getattr(settings, "KV_EGRESS_NANO_PER_GB", EGRESS_NANO_PER_GB))
    return -(-n_bytes * per_gb // 10**9)  # rounded up to a whole nano-USD


def completion_timeout() -> float:
    return float(settings.COMPLETION_TIMEOUT_SECONDS)


def stale_after() -> timedelta:
    """A load whose heartbeat is older than this was abandoned by its web process."""
    return timedelta(seconds=float(settings.LOAD_STALE_SECONDS))


def _is_stale(load: Load) -> bool:
    return timezone.now() - load.heartbeat_at > stale_after()


def _is_final(load: Load) -> bool:
    return bool((load.response or {}).get("final"))


@dataclass
class Reservation:
    load: Load
    license: License
    document: Document
    replay: bool  # the load already succeeded: answer with load.response, charge nothing


@dataclass
class Phases:
    """Where one load's time went, in seconds, by phase (auth, reserve, route, queue,
    engine_ttft, decode, charge, ...): the Server-Timing header, the response and the log."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float | None) -> None:
        if value is not None:
            self.seconds[name] = round(float(value), 6)

    def from_worker(self, timings: dict[str, Any]) -> None:
        self.add("queue", timings.get("queue_s"))
        ttft = timings.get("ttft_s")
        self.add("engine_ttft", ttft)
        total = timings.get("total_s")
        if ttft is not None and total is not None:
            self.add("decode", max(0.0, float(total) - float(ttft)))

    def header(self) -> str:
        return ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in self.seconds.items())

    def log_text(self) -> str:
        return " ".join(f"{k}={v * 1000:.1f}ms" for k, v in self.seconds.items())


# --- reserve ---------------------------------------------------------------------------------


def reserve_load(
    *,
    agent: User,
    license_id: int,
    document_id: int | None,
    kind: LoadKind,
    idempotency_key: str | None,
    payload: dict[str, Any],
    key_seen: bool | None = True,
    funds_needed: int = 0,
) -> Reservation:
    """Reserve one load of the agent's license for this request (or find the retried one).

    ``key_seen=False``: the caller saw no Load with this Idempotency-Key, so none is looked
    for (a concurrent first use of the key still ends in the IntegrityError retry below).
    ``key_seen=None``: the caller did not look; none is looked for first either, but a refusal
    is checked against an earlier Load of the key (a retry of a license's last load is a
    replay, not license_exhausted).
    ``funds_needed``: nothing is reserved (402 insufficient_funds) unless the agent's wallet
    holds at least this much (the worst compute charge of the request, funds_needed_nano).

    A new key on PostgreSQL is reserved by one query (`_reserve_new`); a retried key, and
    SQLite, by the ORM (`_reserve_orm`). Both refuse with `_refusal` in the same order."""
    require_agent(agent)
    digest = request_hash({"kind": kind, "license": license_id, "document": document_id, **payload})
    key = idempotency_key or f"auto:{uuid.uuid4().hex}"
    # A generated key is new: no earlier Load to find.
    retried = idempotency_key is not None and key_seen
    args = {"agent": agent, "license_id": license_id, "document_id": document_id, "kind": kind,
            "key": key, "digest": digest, "funds_needed": funds_needed}
    try:
        if not retried and _one_query():
            return _reserve_new(**args)
        return _reserve_orm(**args, find=retried)
    except IntegrityError:
        # Two requests with one Idempotency-Key raced to create the Load: the loser retries
        # and finds the winner's row (pending: 409 in progress).
        return _reserve_orm(**args, find=True)
    except MarketplaceError:
        if key_seen is not None or idempotency_key is None:
            raise
        return _reserve_orm(**args, find=True)  # refused as new: it may be a retry


def max_in_flight() -> int:
    return int(settings.MAX_IN_FLIGHT_LOADS_PER_AGENT)


# Tests turn this off to run the ORM path (SQLite's, and the retries') on PostgreSQL too.
ONE_QUERY_PATHS = True


def _one_query() -> bool:
    """Whether the one-query paths (a new key's reservation, a served load's charge) run."""
    return ONE_QUERY_PATHS and connection.vendor == "postgresql"


_CONFLICTS = {
    "license_document_mismatch": "This license is for another document.",
    "license_revoked": "This license was revoked.",
    "license_expired": "This license has expired.",
    "license_exhausted": "This license has no loads left.",
    "document_not_ready": "This document's KV cache is not available.",
}


def _refusal(reason: str) -> MarketplaceError:
    """The error of a refused reservation, by reason (the ORM's and the query's codes)."""
    if reason == "not_found":
        return not_found("license")  # another agent's license is indistinguishable
    if reason == "too_many_requests":
        return MarketplaceError(
            code="too_many_requests",
            message=f"At most {max_in_flight()} loads may run at once per agent "
            "(MAX_IN_FLIGHT_LOADS_PER_AGENT); retry when one finishes.",
            status=429, retry_after_seconds=TOO_MANY_RETRY_AFTER_SECONDS,
        )
    if reason == "insufficient_funds":
        return MarketplaceError(
            code="insufficient_funds",
            message="Your wallet cannot pay for this request's output tokens; top it up.",
            status=402,
        )
    return conflict(reason, _CONFLICTS[reason])


@transaction.atomic
def _reserve_orm(
    *, agent: User, license_id: int, document_id: int | None, kind: LoadKind, key: str,
    digest: str, find: bool = True, funds_needed: int = 0,
) -> Reservation:
    load = None
    if find:
        load = Load.objects.select_for_update().filter(agent=agent, idempotency_key=key).first()
    if load is not None:
        if load.request_hash != digest:
            raise conflict(
                "idempotency_key_reused",
                "This Idempotency-Key was already used for a different request.",
            )
        if load.status == LoadStatus.SERVED and (_is_final(load) or _is_stale(load)):
            load = charge_load(load=load)  # the outbox, charged by the retry
        if load.status == LoadStatus.SUCCEEDED:
            license = License.objects.select_related("document").get(pk=load.license_id)
            load.license = license
            return Reservation(load=load, license=license, document=license.document, replay=True)
        if load.status in (LoadStatus.PENDING, LoadStatus.SERVED):
            if not _is_stale(load):
                raise conflict(
                    "request_in_progress",
                    "A request with this Idempotency-Key is still running; retry later.",
                )
            _fail_locked(load=load, code="abandoned", message="The request was abandoned.")

    license = (
        License.objects.select_for_update(of=("self",)).select_related("document")
        .filter(pk=license_id, agent=agent).first()
    )
    if license is None:
        raise _refusal("not_found")
    document = license.document
    if document_id is not None and document.pk != document_id:
        raise _refusal("license_document_mismatch")
    _check_usable(license=license, document=document)
    in_flight = Load.objects.filter(
        agent=agent, status__in=[LoadStatus.PENDING, LoadStatus.SERVED],
        heartbeat_at__gte=timezone.now() - stale_after(),
    ).count()
    if in_flight >= max_in_flight():
        raise _refusal("too_many_requests")
    if funds_needed > 0:
        from ledger.selectors import wallet_balance

        if wallet_balance(agent) < funds_needed:
            raise _refusal("insufficient_funds")
    now = timezone.now()
    License.objects.filter(pk=license.pk).update(loads_used=F("loads_used") + 1, updated_at=now)
    # The row is locked: the increment is exactly what the database now holds.
    license.loads_used += 1
    license.updated_at = now
    if load is None:
        load = Load.objects.create(
            license=license, agent=agent, idempotency_key=key, request_hash=digest, kind=kind,
            heartbeat_at=now,
        )
    else:  # re-attempt of a failed load, on the same row (one ledger key: load:<id>)
        load.license = license
        load.status = LoadStatus.PENDING
        load.attempts += 1
        load.error = ""
        load.error_code = ""
        load.finished_at = None
        load.response = None
        load.created_at = now
        load.heartbeat_at = now
        load.save()
    return Reservation(load=load, license=license, document=document, replay=False)


def _check_usable(*, license: License, document: Document) -> None:
    if license.status == LicenseStatus.REVOKED:
        raise _refusal("license_revoked")
    if license.status == LicenseStatus.EXPIRED or license.is_expired:
        raise _refusal("license_expired")
    if license.status == LicenseStatus.EXHAUSTED or license.loads_used >= license.loads_total:
        raise _refusal("license_exhausted")
    if document.status != DocumentStatus.READY or not document.artifact_key:
        raise _refusal("document_not_ready")


# --- the reservation of a new key in one query (PostgreSQL) ----------------------------------

# Columns of a reserved load's document that nothing on the request path reads (large text);
# they are loaded on access.
_DOCUMENT_DEFERRED = ("text", "description", "example_questions", "verification", "error")


def _columns(model: type[models.Model], skip: tuple[str, ...] = ()) -> list[Any]:
    return [f for f in model._meta.concrete_fields if f.name not in skip]


def _select_list(fields: list[Any], alias: str) -> str:
    """The fields' columns of the table aliased `alias`, named <alias>_<column> (unique)."""
    return ", ".join(f'{alias}."{f.column}" AS "{alias}_{f.column}"' for f in fields)


def _instance(model: type[models.Model], fields: list[Any], values: Sequence[Any]) -> Any:
    """A model instance from a row of `fields` (converted as the ORM converts them)."""
    converted = []
    for f, value in zip(fields, values, strict=True):
        for convert in f.get_db_converters(connection):
            value = convert(value, None, connection)
        converted.append(value)
    return model.from_db(connection.alias, [f.attname for f in fields], converted)


@functools.cache
def _reserve_sql() -> tuple[str, list[Any], list[Any], list[Any]]:
    """The statement that reserves a new key's load (the License row is locked by the
    statement sent before it, so this one's snapshot sees every load committed before the
    lock was granted: the in-flight count is exact, as the ORM's).

    Refusals in `_reserve_orm`'s order, as `_refusal` reasons: license_document_mismatch,
    `_check_usable`'s, too_many_requests, insufficient_funds; a refused one changes nothing.
    Returns (sql, license fields, document fields, load fields inserted)."""
    lic_fields = _columns(License)
    doc_fields = _columns(Document, _DOCUMENT_DEFERRED)
    load_fields = [f for f in Load._meta.concrete_fields if not f.primary_key]
    load_values = ", ".join(f"%({f.attname})s::{f.cast_db_type(connection)}"
                            for f in load_fields)
    sql = f"""
WITH verdict AS (
  SELECT {_select_list(lic_fields, "l")}, {_select_list(doc_fields, "d")},
    CASE
      WHEN %(document)s::bigint IS NOT NULL AND l.document_id <> %(document)s::bigint
        THEN 'license_document_mismatch'
      WHEN l.status = %(revoked)s THEN 'license_revoked'
      WHEN l.status = %(expired)s OR l.expires_at <= %(now)s THEN 'license_expired'
      WHEN l.status = %(exhausted)s OR l.loads_used >= l.loads_total THEN 'license_exhausted'
      WHEN d.status <> %(ready)s OR d.artifact_key = '' THEN 'document_not_ready'
      WHEN (SELECT count(*) FROM marketplace_load WHERE agent_id = %(agent)s
            AND status IN (%(pending)s, %(served)s) AND heartbeat_at >= %(cutoff)s)
           >= %(max_in_flight)s THEN 'too_many_requests'
      WHEN %(funds)s > 0 AND COALESCE((SELECT balance FROM ledger_account
            WHERE key = %(wallet)s), 0) < %(funds)s THEN 'insufficient_funds'
      ELSE '' END AS refused
  FROM marketplace_license l JOIN marketplace_document d ON d.id = l.document_id
  WHERE l.id = %(license)s AND l.agent_id = %(agent)s
), bump AS (
  UPDATE marketplace_license SET loads_used = loads_used + 1, updated_at = %(now)s
  WHERE id = (SELECT l_id FROM verdict WHERE refused = '')
  RETURNING loads_used
), made AS (
  INSERT INTO marketplace_load ({", ".join(f'"{f.column}"' for f in load_fields)})
  SELECT {load_values} FROM bump
  RETURNING id
)
SELECT verdict.*, (SELECT id FROM made) FROM verdict"""
    return sql, lic_fields, doc_fields, load_fields


_LOCK_LICENSE_SQL = "SELECT 1 FROM marketplace_license WHERE id = %s AND agent_id = %s FOR UPDATE"


def _reserve_new(
    *, agent: User, license_id: int, document_id: int | None, kind: LoadKind, key: str,
    digest: str, funds_needed: int = 0,
) -> Reservation:
    """`_reserve_orm` for a key not seen before, in one round trip on PostgreSQL: the
    license's row lock, then the statement of `_reserve_sql`, sent together as one implicit
    transaction (a savepoint inside the caller's). A first use of the key that lost a race
    raises IntegrityError (the unique key), with nothing reserved."""
    from ledger.accounts import wallet_key
    from ledger.services import journal

    sql, lic_fields, doc_fields, load_fields = _reserve_sql()
    now = timezone.now()
    load = Load(agent=agent, license_id=license_id, idempotency_key=key, request_hash=digest,
                kind=kind, heartbeat_at=now, created_at=now)
    params: dict[str, Any] = {
        f.attname: f.get_db_prep_save(getattr(load, f.attname), connection) for f in load_fields
    }
    params.update(
        document=document_id, license=license_id, agent=agent.pk, now=now,
        cutoff=now - stale_after(), max_in_flight=max_in_flight(), funds=funds_needed,
        wallet=wallet_key(agent.pk), revoked=LicenseStatus.REVOKED.value,
        expired=LicenseStatus.EXPIRED.value, exhausted=LicenseStatus.EXHAUSTED.value,
        ready=DocumentStatus.READY.value, pending=LoadStatus.PENDING.value,
        served=LoadStatus.SERVED.value,
    )
    with journal.unit():
        journal.send(_LOCK_LICENSE_SQL, [license_id, agent.pk])
        read = journal.send(sql, params)
    rows = read()
    if not rows:
        raise _refusal("not_found")
    row = rows[0]
    n_lic, n_doc = len(lic_fields), len(doc_fields)
    refused, load_id = row[n_lic + n_doc], row[n_lic + n_doc + 1]
    if refused:
        raise _refusal(refused)
    license = _instance(License, lic_fields, row[:n_lic])
    document = _instance(Document, doc_fields, row[n_lic:n_lic + n_doc])
    # The row was locked: what the statement wrote is what the database now holds.
    license.loads_used += 1
    license.updated_at = now
    license.document = document
    load.pk = load_id
    load._state.adding = False
    load._state.db = connection.alias
    load.license = license
    return Reservation(load=load, license=license, document=document, replay=False)


# --- finish ----------------------------------------------------------------------------------


def _fail_locked(*, load: Load, code: str, message: str) -> None:
    load.status = LoadStatus.FAILED
    load.error_code = code[:64]
    load.error = message
    load.finished_at = timezone.now()
    load.save(update_fields=["status", "error_code", "error", "finished_at"])
    License.objects.filter(pk=load.license_id, loads_used__gt=0).update(
        loads_used=F("loads_used") - 1, updated_at=timezone.now()
    )


@transaction.atomic
def fail_load(*, load: Load, code: str, message: str) -> Load:
    """Mark a pending load failed and release its reservation. Never charges; a served load
    is left as it is (it is charged, not failed)."""
    locked = Load.objects.select_for_update().get(pk=load.pk)
    if locked.status == LoadStatus.PENDING:
        _fail_locked(load=locked, code=code, message=message)
    return locked


def _load_update(load_pk: int, values: list[tuple[Any, Any]]) -> tuple[str, list[Any]]:
    """An UPDATE of one Load's row from (field, value) pairs, the values prepared as the ORM
    prepares them: on the request path the ORM builds such a statement in more time than the
    database runs it."""
    sql = (f"UPDATE {Load._meta.db_table} SET "
           + ", ".join(f"{connection.ops.quote_name(f.column)} = %s" for f, _ in values)
           + " WHERE id = %s")
    return sql, [f.get_db_prep_save(value, connection) for f, value in values] + [load_pk]


def record_served(*, load: Load, result: dict[str, Any]) -> Load:
    """The outbox: record the worker's result on the Load (pending or served -> served).

    ``result["final"]`` says whether it is the load's last word (a streamed load is recorded
    once with its partial usage before its first chunk, and again at its end). One conditional
    UPDATE (one round trip, on the path to the first token): a load already charged, or failed
    by a sweep that thought it abandoned, is left as it is and returned as stored."""
    usage = result.get("usage") or {}
    fields: dict[str, Any] = {
        "status": LoadStatus.SERVED,
        "response": result,
        "cached_tokens": int(usage.get("cached_tokens", 0)),
        "suffix_tokens": int(usage.get("suffix_tokens", 0)),
        "output_tokens": int(usage.get("output_tokens", 0)),
        "heartbeat_at": timezone.now(),
    }
    if result.get("worker"):
        fields["worker"] = str(result["worker"])[:255]
    sql, params = _load_update(load.pk, [(Load._meta.get_field(name), value)
                                         for name, value in fields.items()])
    with connection.cursor() as cursor:
        cursor.execute(sql + " AND status IN (%s, %s)",
                       [*params, LoadStatus.PENDING, LoadStatus.SERVED])
        updated = cursor.rowcount
    if not updated:
        return Load.objects.get(pk=load.pk)
    for name, value in fields.items():
        setattr(load, name, value)
    return load


def charge_load(
    *,
    load: Load,
    result: dict[str, Any] | None = None,
    egress_bytes: int = 0,
    wall_seconds: float | None = None,
) -> Load:
    """Charge a load once (ledger key ``load:<id>``) and mark it succeeded.

    A served load is charged from its recorded result (the outbox); a pending one from
    ``result`` (KV downloads, callers without a worker). The result is stored as the response
    that retries replay. Raises InsufficientFunds only for a KV download's egress (the
    transaction rolls back, nothing is charged, and the caller fails the load). The ledger caps
    a generation's compute charge at the wallet balance, so a served load always settles; the
    amount actually charged is what the Load records.

    On PostgreSQL a served load is charged in three round trips (`_charge_served_batched`);
    everything else, and a charge that the batch could not make, by the ORM (`_charge_locked`).
    Both lock the same rows in the same order and settle with `_settle`.
    """
    if result is None and not egress_bytes and _one_query():
        try:
            charged = _charge_served_batched(load_pk=load.pk, wall_seconds=wall_seconds)
        except IntegrityError:
            # Rolled back, nothing charged: e.g. the first posting to a new ledger account
            # (a publisher's first sale), which the ledger's own retry creates.
            charged = None
        if charged is not None:
            return charged
    return _charge_locked(load=load, result=result, egress_bytes=egress_bytes,
                          wall_seconds=wall_seconds)


def _user_ref(pk: int) -> User:
    """A user by id only: the ledger needs the pk of the agent and the publisher, no row."""
    return User(pk=pk)


def _settle(
    *, load: Load, license: License, document: Document, tariff: Any, result: dict[str, Any],
    egress_bytes: int, wall_seconds: float | None,
) -> None:
    """Post the load's charge (and a KV download's egress) and set the load's succeeded
    fields; the caller holds the Load and License row locks and writes the load."""
    from ledger import services as ledger_services

    usage = result.get("usage") or {}
    suffix = int(usage.get("suffix_tokens", 0))
    output = int(usage.get("output_tokens", 0))
    compute = 0
    if load.kind != LoadKind.KV_DOWNLOAD:
        compute = int(tariff.compute_price_nano(suffix, output))
    amount = license.price_per_load_nano
    memo = f"{load.kind} load {load.pk} of document {document.pk}"
    ledger_key = load.ledger_idempotency_key
    agent = _user_ref(license.agent_id)

    def settle(compute_nano: int) -> int:
        """Returns the compute actually charged (the ledger caps it at the wallet balance)."""
        if amount <= 0 and compute_nano <= 0:
            return 0
        tx = ledger_services.settle_load(
            license_ref=license.ledger_ref,
            publisher=_user_ref(document.publisher_id),
            amount_nano=amount,
            publisher_share=tariff.publisher_share,
            idempotency_key=ledger_key,
            agent=agent,
            compute_nano=compute_nano,
            memo=memo,
            document_ref=f"document:{document.pk}",
        )
        details = getattr(tx, "details", None) or {}
        return int(details.get("compute_charged_nano", compute_nano))

    compute = settle(compute)

    egress_nano = 0
    if egress_bytes:
        egress_nano = egress_price_nano(egress_bytes)
        if egress_nano > 0:
            ledger_services.record_egress(
                agent=agent,
                amount_nano=egress_nano,
                idempotency_key=f"{ledger_key}:egress",
                license_ref=license.ledger_ref,
                document_ref=f"document:{document.pk}",
            )

    timings = result.get("timings") or {}
    load.status = LoadStatus.SUCCEEDED
    load.cached_tokens = int(usage.get("cached_tokens", 0))
    load.suffix_tokens = suffix
    load.output_tokens = output
    load.load_seconds = timings.get("load_s")
    load.ttft_seconds = timings.get("ttft_s")
    load.total_seconds = timings.get("total_s")
    load.cache_tier = str(timings.get("tier") or "")[:8]
    if wall_seconds is not None:
        load.wall_seconds = wall_seconds
    load.worker = str(result.get("worker") or load.worker)[:255]
    load.amount_nano = amount
    load.compute_nano = compute
    load.egress_nano = egress_nano
    load.egress_bytes = egress_bytes
    load.response = {**result, "loads_left": license.loads_left}
    load.finished_at = timezone.now()


# A license whose loads are all used and none is in flight any more is exhausted (run after
# the charged load's row was written, under the License row lock).
_EXHAUST_SQL = (
    "UPDATE marketplace_license SET status = %s, closed_at = %s, updated_at = %s"
    " WHERE id = %s AND status = %s AND loads_used >= loads_total AND NOT EXISTS"
    " (SELECT 1 FROM marketplace_load WHERE license_id = %s AND status IN (%s, %s))"
)


def _close_if_exhausted(license_id: int) -> None:
    from ledger.services import journal

    now = connection.ops.adapt_datetimefield_value(timezone.now())
    journal.send(_EXHAUST_SQL, [
        LicenseStatus.EXHAUSTED.value, now, now, license_id, LicenseStatus.ACTIVE.value,
        license_id, LoadStatus.PENDING.value, LoadStatus.SERVED.value,
    ])


@transaction.atomic
def _charge_locked(
    *, load: Load, result: dict[str, Any] | None, egress_bytes: int, wall_seconds: float | None,
) -> Load:
    from ledger.selectors import tariff_for

    load = Load.objects.select_for_update().get(pk=load.pk)
    if load.status == LoadStatus.SUCCEEDED:
        return load
    if load.status == LoadStatus.SERVED:
        result = load.response or {}
    elif load.status != LoadStatus.PENDING or result is None:
        raise conflict("load_not_pending", "This load is no longer pending.")
    license = (
        License.objects.select_for_update(of=("self",)).select_related("document")
        .get(pk=load.license_id)
    )
    document = license.document
    _settle(load=load, license=license, document=document,
            tariff=tariff_for(document.model_slug), result=result, egress_bytes=egress_bytes,
            wall_seconds=wall_seconds)
    load.save()
    _close_if_exhausted(license.pk)
    load.license = license
    return load


def _charge_served_batched(*, load_pk: int, wall_seconds: float | None) -> Load | None:
    """`_charge_locked` for a served load, on PostgreSQL, in three round trips: (1) lock the
    Load, then the License (with its document) and read the tariff; (2) the ledger locks its
    accounts and reads their balances; (3) the posting, the Load's row, the exhausted check
    and COMMIT. Returns None (nothing done) for a load that is not served or succeeded, for
    the ORM path to answer."""
    from ledger.models import Tariff
    from ledger.selectors import default_tariff
    from ledger.services import journal

    load_fields = _columns(Load)
    lic_fields, doc_fields = _columns(License), _columns(Document, _DOCUMENT_DEFERRED)
    tariff_fields = _columns(Tariff)
    with journal.unit():
        read_load = journal.send(
            f"SELECT {_select_list(load_fields, 'x')} FROM marketplace_load x WHERE x.id = %s"
            " FOR UPDATE", [load_pk])
        read_license = journal.send(
            f"SELECT {_select_list(lic_fields, 'l')}, {_select_list(doc_fields, 'd')}"
            " FROM marketplace_license l JOIN marketplace_document d ON d.id = l.document_id"
            " WHERE l.id = (SELECT license_id FROM marketplace_load WHERE id = %s)"
            " FOR UPDATE OF l", [load_pk])
        read_tariff = journal.send(
            f"SELECT {_select_list(tariff_fields, 't')} FROM ledger_tariff t"
            " WHERE t.model_slug = (SELECT d.model_slug FROM marketplace_load x"
            " JOIN marketplace_license l ON l.id = x.license_id"
            " JOIN marketplace_document d ON d.id = l.document_id WHERE x.id = %s)", [load_pk])
        rows = read_load()
        if not rows:
            return None
        load = _instance(Load, load_fields, rows[0])
        if load.status != LoadStatus.SERVED:
            return load if load.status == LoadStatus.SUCCEEDED else None
        [row] = read_license()
        license = _instance(License, lic_fields, row[:len(lic_fields)])
        document = _instance(Document, doc_fields, row[len(lic_fields):])
        license.document = document
        tariffs = read_tariff()
        tariff = (_instance(Tariff, tariff_fields, tariffs[0]) if tariffs
                  else default_tariff(document.model_slug))
        _settle(load=load, license=license, document=document, tariff=tariff,
                result=load.response or {}, egress_bytes=0, wall_seconds=wall_seconds)
        journal.send(*_load_update(load.pk, [(f, getattr(load, f.attname))
                                             for f in load_fields if not f.primary_key]))
        _close_if_exhausted(license.pk)
    load.license = license
    return load


def charge_served(*, load: Load, wall_seconds: float | None = None) -> Load:
    """Charge a served load now, retrying a failed charge transaction a few times; if it still
    fails the load stays served and the sweep charges it (the agent is answered anyway)."""
    for attempt in range(CHARGE_ATTEMPTS):
        try:
            return charge_load(load=load, wall_seconds=wall_seconds)
        except Exception:  # noqa: BLE001 - any database or ledger error: try again, then defer
            log.warning("Charging served load %s failed (attempt %s)", load.pk, attempt + 1,
                        exc_info=True)
            time.sleep(CHARGE_RETRY_SECONDS * (attempt + 1))
    log.error("Load %s served but not charged yet; the sweep will charge it", load.pk)
    # As recorded, not read again: the database may be what failed, and the agent is answered.
    return load


def sweep_loads() -> dict[str, int]:
    """Release pending loads abandoned by their web process (uncharged) and charge served
    loads whose charge did not happen (final result recorded, or their web process died)."""
    cutoff = timezone.now() - stale_after()
    released = charged = 0
    for load in Load.objects.filter(status=LoadStatus.PENDING, heartbeat_at__lt=cutoff):
        if fail_load(load=load, code="abandoned",
                     message="The request was abandoned.").status == LoadStatus.FAILED:
            released += 1
    for load in Load.objects.filter(status=LoadStatus.SERVED):
        if not (_is_final(load) or load.heartbeat_at < cutoff):
            continue  # still streaming: its web process charges it at the end
        try:
            charge_load(load=load)
            charged += 1
        except Exception:  # noqa: BLE001 - the next sweep tries again
            log.exception("The sweep could not charge served load %s", load.pk)
    if released or charged:
        log.info("Load sweep: %s abandoned loads released, %s served loads charged",
                 released, charged)
    return {"released": released, "charged": charged}


def expire_stale_loads() -> int:
    """Release abandoned pending loads (the sweep's first half). Returns how many."""
    return sweep_loads()["released"]


# --- run -------------------------------------------------------------------------------------


class CompletionTimeout(MarketplaceError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            code="timeout",
            message=f"The completion did not finish within {seconds:g} seconds; not charged.",
            status=504,
        )


def dispatch_generation(
    *, load: Load | None, document: Document, params: dict[str, Any], timeout: float,
    exclude: frozenset[str] = frozenset(), eager: bool = True,
) -> Any:
    """Send the generation to a GPU worker of the document's model (marketplace.worker_client).

    Returns an open stream: iterable of event dicts ("delta", then "final" or "error"), with
    ``worker``, ``connect_s`` and ``close()``; iterating raises WorkerLost when the stream
    breaks. Raises MarketplaceError when no worker takes the request. ``eager=False`` returns
    once the request is written: the worker's answer is read on the first iteration, which
    raises WorkerBusy when that worker's queue is full. ``load`` is None when the generation
    starts before its reservation. Tests replace this function to run without workers.
    """
    from marketplace import worker_client

    body = params if load is None else {"load": load.pk, **params}
    return worker_client.open_stream(
        slug=document.model_slug, artifact_key=document.artifact_key, body=body,
        timeout=timeout, exclude=exclude, eager=eager,
    )


class EarlyStart:
    """A generation sent to a worker before its load was reserved.

    The request's thread writes the worker's request, reserves the load while the engine
    prefills, and reads the worker's answer only once the reservation committed: nothing
    reaches the agent (and nothing is charged) before. When the reservation fails (or is a
    replay) ``discard()`` closes the connection, which cancels the worker's job."""

    def __init__(self, *, document: Document, params: dict[str, Any], timeout: float) -> None:
        self.document = document
        self._stream: Any = None
        self._error: MarketplaceError | None = None
        try:
            self._stream = dispatch_generation(load=None, document=document, params=params,
                                               timeout=timeout, eager=False)
        except MarketplaceError as exc:  # no worker reachable: raised once the load is reserved
            self._error = exc

    def serves(self, document: Document) -> bool:
        """Whether the reserved load's document is the one this generation runs on."""
        return (document.pk == self.document.pk
                and document.artifact_key == self.document.artifact_key
                and document.model_slug == self.document.model_slug)

    def stream(self) -> Any:
        """The sent generation's stream (raises what sending it raised)."""
        if self._error is not None:
            raise self._error
        return self._stream

    def discard(self) -> None:
        """Close the stream: the worker cancels the job."""
        if self._stream is not None:
            self._stream.close()


def check_prompt_fits(*, document: Document, params: dict[str, Any]) -> None:
    """Refuse (422 context_length_exceeded) before anything is reserved or sent to a worker a
    request whose new text cannot fit in the context the document leaves. The bound is the
    text's tokens without the chat template, which only adds tokens, so nothing that fits is
    refused; the worker still checks the exact count."""
    from marketplace import engine

    texts = [m["content"] for m in params.get("messages") or []] or [params.get("prompt") or ""]
    counter = engine.token_counter(document.model_slug)
    if counter is None:
        return
    room = counter.max_context - int(document.n_tokens or 0)
    # A token covers at least one byte: text of fewer bytes than the room cannot overflow it,
    # so the common request is not tokenized here.
    if sum(len(text.encode()) + 1 for text in texts) < room:
        return
    try:
        needed = sum(len(counter.tokenizer.encode(text, add_special_tokens=False))
                     for text in texts)
    except (ValueError, UnicodeError):
        return  # the worker answers text the tokenizer cannot take with its own 422
    if needed >= room:
        raise MarketplaceError(
            code="context_length_exceeded", status=422,
            message=(f"The document takes {document.n_tokens} of the model's "
                     f"{counter.max_context}-token context; the request's text needs at least "
                     f"{needed} more, leaving no room to answer."),
        )


def request_document(
    *, agent: User, document_id: int, idempotency_key: str | None
) -> Document | None:
    """The request's document, read with one query that also says whether the agent used this
    Idempotency-Key before (``key_seen``): a retry may be a replay or still running, so only a
    new key starts early, and its reservation need not look for an earlier Load.

    Only the fields the request path reads before the reservation are fetched (not the text,
    which may be long; the reservation reads the document again). Raw SQL: the ORM took
    longer to compile this query than the database took to answer it, on every completion."""
    sql = (
        'SELECT "id", "model_slug", "artifact_key", "n_tokens", EXISTS('
        f'SELECT 1 FROM "{Load._meta.db_table}" WHERE "agent_id" = %s AND "idempotency_key" = %s'
        f') AS "key_seen" FROM "{Document._meta.db_table}" WHERE "id" = %s'
    )
    return next(iter(Document.objects.raw(sql, [agent.pk, idempotency_key, document_id])), None)


# The routing fields of the documents this process read for a completion lately, by id: a
# completion on one of them goes to its worker without a query first. What they route is
# checked by the reservation, which reads the document again (EarlyStart.serves).
DOCUMENT_CACHE_SECONDS = 2.0
DOCUMENT_CACHE_MAX = 10_000
_documents_lock = threading.Lock()
_documents: dict[int, tuple[float, tuple[str, str, int]]] = {}


def completion_document(
    *, agent: User, document_id: int, idempotency_key: str | None
) -> Document | None:
    """request_document, from this process's cache of the last DOCUMENT_CACHE_SECONDS when it
    has the document. A cached document does not say whether the Idempotency-Key was used
    (``key_seen`` None): the request starts early as for a new key, and the reservation finds
    an earlier Load of the key itself (reserve_load: a replay or a refusal, which closes the
    early start)."""
    with _documents_lock:
        hit = _documents.get(document_id)
    if hit is not None and time.monotonic() - hit[0] < DOCUMENT_CACHE_SECONDS:
        model_slug, artifact_key, n_tokens = hit[1]
        document = Document(id=document_id, model_slug=model_slug, artifact_key=artifact_key,
                            n_tokens=n_tokens)
        document.key_seen = None
        return document
    document = request_document(agent=agent, document_id=document_id,
                                idempotency_key=idempotency_key)
    if document is not None:
        with _documents_lock:
            if len(_documents) >= DOCUMENT_CACHE_MAX:
                _documents.clear()
            _documents[document_id] = (time.monotonic(), (
                document.model_slug, document.artifact_key, int(document.n_tokens or 0)))
    return document


def forget_documents() -> None:
    """Read documents again on next use (tests)."""
    with _documents_lock:
        _documents.clear()


def _worker_error(event: dict[str, Any]) -> MarketplaceError:
    code = str(event.get("code") or "generation_failed")
    status = {"invalid_request": 422, "artifact_not_found": 503}.get(code, 502)
    return MarketplaceError(code=code, message=str(event.get("message") or "Generation failed."),
                            status=status)


@dataclass
class LoadRun:
    """A load on its way: reserved, started on a worker, its first events read."""

    load: Load
    document: Document
    replayed: bool
    phases: Phases
    started: float  # time.monotonic() at the reservation
    stream: Any = None
    head: list[dict[str, Any]] = field(default_factory=list)
    deadline: float = 0.0


def start_generation(
    *,
    agent: User,
    kind: LoadKind,
    license_id: int,
    document_id: int | None,
    idempotency_key: str | None,
    params: dict[str, Any],
    until_final: bool,
    timeout: float | None = None,
    phases: Phases | None = None,
    document: Document | None = None,
) -> LoadRun:
    """Reserve, then start the load on a worker and read its events up to its first token
    (``until_final``: up to its final result), failing over to the next worker while nothing
    was produced for the agent. Raises MarketplaceError after failing the load uncharged.

    With ``document`` (the request's, read by the caller) the generation is sent to the worker
    first and the reservation runs while the engine starts (EarlyStart); the money rules are
    unchanged: the stream is read only once the reservation committed, and a failed
    reservation cancels the worker's job."""
    phases = phases or Phases()
    timeout = completion_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    # A document from request_document says whether the key is new (a cached one does not
    # know: None, and starts early); without one, assume it is not.
    key_seen = getattr(document, "key_seen", True) if idempotency_key is not None else False
    early = None
    if document is not None and settings.COMPLETION_EARLY_START and not key_seen:
        early = EarlyStart(document=document, params=params, timeout=timeout)
    # With the request's document in hand the reservation checks the wallet too (402 before
    # anything is reserved); without it, the funds are checked once the load is reserved.
    funds_checked = document is not None and document.pk == document_id
    funds = funds_needed_nano(document=document, params=params) if funds_checked else 0
    t0 = time.perf_counter()
    try:
        reservation = reserve_load(
            agent=agent, license_id=license_id, document_id=document_id, kind=kind,
            idempotency_key=idempotency_key, payload=params, key_seen=key_seen,
            funds_needed=funds,
        )
    except BaseException:
        if early is not None:
            early.discard()
        raise
    phases.add("reserve", time.perf_counter() - t0)
    load = reservation.load
    run = LoadRun(load=load, document=reservation.document, replayed=reservation.replay,
                  phases=phases, started=time.monotonic(), deadline=deadline)
    if early is not None and (reservation.replay or not early.serves(reservation.document)):
        early.discard()
        early = None
    if reservation.replay:
        return run
    heartbeats.track(load.pk)
    try:
        if not funds_checked:
            _precheck_compute_funds(agent=agent, document=reservation.document, params=params)
        _open(run, params, until_final=until_final, early=early)
        if run.head[-1].get("type") == "delta":
            # The first token goes out with the response: the load is served from then on,
            # so it is recorded served (the outbox) before. If the database cannot take the
            # record, the agent gets an error and no token, and the load is released.
            run.load = record_served(load=load, result=_partial_result(run, run.head, "length"))
    except MarketplaceError as exc:
        _abandon(run, early)
        fail_load(load=load, code=exc.code, message=exc.message)
        raise
    except Exception as exc:
        _abandon(run, early)
        fail_load(load=load, code="generation_failed", message=str(exc)[:500])
        raise
    return run


def _abandon(run: LoadRun, early: EarlyStart | None) -> None:
    heartbeats.untrack(run.load.pk)
    if run.stream is not None:
        run.stream.close()  # stops the generation on the worker
    if early is not None:
        early.discard()  # closes the early stream too, whether _open took it or not


def _partial_result(run: LoadRun, events: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    """A streamed load's result so far: the text and usage of the deltas sent (not final)."""
    text, n, usage = "", 0, {}
    for event in events:
        if event.get("type") == "delta":
            text += event.get("text", "")
            n = int(event.get("n") or n)
            usage = event.get("usage") or usage
    return {"text": text, "finish_reason": reason, "usage": {**usage, "output_tokens": n},
            "timings": {}, "worker": getattr(run.stream, "worker", ""), "final": False}


def _open(run: LoadRun, params: dict[str, Any], *, until_final: bool,
          early: EarlyStart | None = None) -> None:
    from marketplace.worker_client import WorkerBusy, WorkerLost, busy_error

    tried: set[str] = set()
    busy = False
    while True:
        remaining = run.deadline - time.monotonic()
        if remaining <= 0:
            raise CompletionTimeout(completion_timeout())
        if early is not None:
            stream, early = early.stream(), None
        else:
            try:
                stream = dispatch_generation(load=run.load, document=run.document, params=params,
                                             timeout=remaining, exclude=frozenset(tried))
            except MarketplaceError as exc:
                if busy and exc.code == "no_worker":  # the early start's worker was busy
                    raise busy_error() from None
                raise
        head: list[dict[str, Any]] = []
        try:
            for event in stream:
                if event.get("type") == "error":
                    stream.close()
                    raise _worker_error(event)
                head.append(event)
                if event.get("type") == "final" or (event.get("type") == "delta"
                                                    and not until_final):
                    run.phases.add("route", stream.connect_s)
                    run.stream, run.head = stream, head
                    return
            raise WorkerLost("the stream ended without a result")
        except WorkerBusy:
            busy = True
            tried.add(str(stream.worker))
        except WorkerLost as exc:
            stream.close()
            if time.monotonic() >= run.deadline:
                raise CompletionTimeout(completion_timeout()) from None
            log.warning("Load %s: worker %s lost before the result (%s); failing over",
                        run.load.pk, getattr(stream, "worker", "?"), exc)
            tried.add(str(getattr(stream, "worker", "")))


def _result_of(final: dict[str, Any]) -> dict[str, Any]:
    return {
        "text": final.get("text", ""),
        "finish_reason": final.get("finish_reason"),
        "usage": final.get("usage") or {},
        "timings": final.get("timings") or {},
        "worker": final.get("worker", ""),
        "batch": final.get("batch"),
        "final": True,
    }


def _finish(run: LoadRun, result: dict[str, Any]) -> Load:
    """Record the result (outbox), then charge it; the load stops being tracked."""
    try:
        load = record_served(load=run.load, result=result)
        t0 = time.perf_counter()
        load = charge_served(load=load, wall_seconds=time.monotonic() - run.started)
        run.phases.add("charge", time.perf_counter() - t0)
    finally:
        heartbeats.untrack(run.load.pk)
    run.load = load
    log.info("load %s %s: %s", load.pk, load.status, run.phases.log_text())
    return load


def run_generation(
    *,
    agent: User,
    kind: LoadKind,
    license_id: int,
    document_id: int | None,
    idempotency_key: str | None,
    params: dict[str, Any],
    timeout: float | None = None,
    phases: Phases | None = None,
) -> tuple[Load, bool]:
    """Reserve, run on a worker to the end, record, charge. Returns (Load, replayed?).

    Raises MarketplaceError (including CompletionTimeout) after failing the load uncharged."""
    run = start_generation(
        agent=agent, kind=kind, license_id=license_id, document_id=document_id,
        idempotency_key=idempotency_key, params=params, until_final=True, timeout=timeout,
        phases=phases,
    )
    if run.replayed:
        return run.load, True
    return complete(run), False


def complete(run: LoadRun) -> Load:
    """Record and charge a load started with ``until_final`` (its head ends with the result).

    The worker's stream is closed here, not left to the garbage collector: a response that
    the collector closes takes httpcore's pool lock from whatever code the collection
    interrupted, which in a thread already holding that lock (opening the next request)
    never returns, and every later request of the process waits on the lock."""
    try:
        final = run.head[-1]
        run.phases.from_worker(final.get("timings") or {})
        return _finish(run, _result_of(final))
    finally:
        if run.stream is not None:
            run.stream.close()


def stream_events(run: LoadRun) -> Iterator[dict[str, Any]]:
    """The started load's events as the worker makes them ("delta"..., then "final", or
    "error" when the worker was lost mid-stream), charging the load as documented above:
    once complete, or for what was produced when the stream stops early (a client that goes
    away closes this generator, which closes the worker's stream and stops the generation)."""
    from marketplace.worker_client import WorkerLost

    sent: list[dict[str, Any]] = []
    finished = False

    def partial(reason: str) -> dict[str, Any]:
        return {**_partial_result(run, sent, reason), "final": True}

    try:
        for event in run.head:
            sent.append(event)
            if event.get("type") == "final":
                run.phases.from_worker(event.get("timings") or {})
                _finish(run, _result_of(event))
                finished = True
            yield event
        if finished:
            return
        # The load was recorded served with its first chunk (start_generation); from here
        # on the agent has tokens, so a failed record or charge must not break the stream:
        # the load stays served and the sweep charges it.
        try:
            for event in run.stream:
                kind = event.get("type")
                if kind == "error":
                    _finish_served(run, partial("error"))
                    finished = True
                    yield event
                    return
                if kind == "final":
                    run.phases.from_worker(event.get("timings") or {})
                    _finish_served(run, _result_of(event))
                    finished = True
                    yield event
                    return
                sent.append(event)
                yield event
            raise WorkerLost("the stream ended without a result")
        except WorkerLost as exc:
            log.warning("Load %s: worker lost mid-stream (%s)", run.load.pk, exc)
            _finish_served(run, partial("error"))
            finished = True
            yield {"type": "error", "code": "worker_lost",
                   "message": "The GPU worker was lost mid-stream; charged for what was sent."}
    finally:
        if run.stream is not None:
            run.stream.close()  # stops the generation on the worker if it still runs
        if not finished:  # the client went away mid-stream: charge what was produced
            _finish_served(run, partial("disconnected"))


def _finish_served(run: LoadRun, result: dict[str, Any]) -> None:
    """_finish for a load already recorded served: a database error is logged, not raised
    (the agent has its tokens; the sweep charges the load from its last record)."""
    try:
        _finish(run, result)
    except Exception:  # noqa: BLE001 - the outbox record stands; the sweep charges it
        log.exception("Load %s: recording or charging its end failed; the sweep charges it",
                      run.load.pk)


TARIFF_CACHE_SECONDS = 5.0
_tariffs: dict[str, tuple[float, Any]] = {}


def _tariff(slug: str) -> Any:
    """The model's tariff, read at most every TARIFF_CACHE_SECONDS per process: only the
    funds pre-check uses it (the charge reads the ledger's own)."""
    from ledger.selectors import tariff_for

    now = time.monotonic()
    cached = _tariffs.get(slug)
    if cached is None or now - cached[0] > TARIFF_CACHE_SECONDS:
        cached = _tariffs[slug] = (now, tariff_for(slug))
    return cached[1]


def forget_tariffs() -> None:
    """Read tariffs again on next use (tests)."""
    _tariffs.clear()


def funds_needed_nano(*, document: Document, params: dict[str, Any]) -> int:
    """What the wallet must hold to run the request: the compute price of the output tokens it
    may use (a load is refused 402 before running when the wallet holds less)."""
    max_tokens = int(params.get("max_tokens") or 0)
    return int(_tariff(document.model_slug).compute_price_nano(0, max_tokens))


def _precheck_compute_funds(*, agent: User, document: Document, params: dict[str, Any]) -> None:
    """402 before running when the wallet cannot pay the output tokens this request may use
    (for a load reserved without `funds_needed`)."""
    from ledger.selectors import wallet_balance

    worst = funds_needed_nano(document=document, params=params)
    if worst > 0 and wallet_balance(agent) < worst:
        raise _refusal("insufficient_funds")


def start_kv_download(
    *, agent: User, license_id: int, document_id: int, idempotency_key: str | None
) -> tuple[Load, Any, bool]:
    """Reserve and charge a shipping-mode load; returns (load, artifact path, replayed)."""
    from ledger.errors import InsufficientFunds
    from marketplace import engine

    reservation = reserve_load(
        agent=agent, license_id=license_id, document_id=document_id,
        kind=LoadKind.KV_DOWNLOAD, idempotency_key=idempotency_key, payload={},
    )
    load = reservation.load
    document = reservation.document
    path = engine.artifact_path(document.artifact_key) if document.artifact_key else None
    if path is None or not path.is_file():
        if not reservation.replay:
            fail_load(load=load, code="artifact_unavailable", message="Artifact not on this host.")
        raise MarketplaceError(
            code="artifact_unavailable",
            message="The KV artifact is not available for download right now.",
            status=503,
        )
    if reservation.replay:
        return load, path, True
    size = path.stat().st_size
    result = {
        "ok": True,
        "usage": {"cached_tokens": document.n_tokens or 0, "suffix_tokens": 0,
                  "output_tokens": 0},
        "timings": {},
        "artifact_key": document.artifact_key,
        "bytes": size,
    }
    try:
        load = charge_load(load=load, result=result, egress_bytes=size)
    except InsufficientFunds as exc:
        fail_load(load=load, code="insufficient_funds", message=str(exc))
        raise MarketplaceError(
            code="insufficient_funds",
            message="Your wallet cannot pay the egress for this download; top it up.",
            status=402,
        ) from exc
    return load, path, False
