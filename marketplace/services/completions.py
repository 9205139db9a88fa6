"""Loads: reserve a license load, run the generation on a GPU worker, charge exactly once.

Metering decision (where the charge happens)
--------------------------------------------
The charge is made in the API process, after the worker's result has come back within the
timeout, in one database transaction that marks the Load succeeded and calls
ledger.settle_load(idempotency_key="load:<id>"). The worker only computes: it never touches
money or the Load row. Consequences:

* A load that fails (engine error, worker exception) or times out (the API stops waiting and
  answers 504) is never charged: it is marked failed and its reserved load is released. If the
  worker finishes it later anyway, nobody reads that result, so it cannot be charged.
* A success is charged once: the Load row is locked and moved pending -> succeeded in the same
  transaction as settle_load, whose idempotency key is the load id (a duplicate settlement is
  impossible even if this code ran twice).
* Client retries: the Load is unique per (agent, Idempotency-Key). A retry of a succeeded load
  returns the stored first response and is not charged again; a retry while the first attempt
  is still running gets 409 request_in_progress; a retry of a failed or timed-out load runs it
  again on the same Load row (nothing was charged, and the ledger key stays "load:<id>", so at
  most one attempt can ever be charged). A reused key with a different body is a 409.
* A load is reserved (license.loads_used + 1, checked by a database constraint) before it is
  dispatched, so concurrent requests cannot overdraw a license; failures release it.
* Lock order: the Load row, then the License row, then the ledger's accounts (in id order).
  Only those rows are locked (``select_for_update(of=("self",))``): the Document and the agent's
  User are shared by every concurrent load and are read, never locked, or concurrent charges
  on one document deadlock.
* If the API process dies between dispatch and charge, the Load stays pending; it is failed
  (uncharged, reservation released) by expire_stale_loads after the timeout plus a grace period,
  or at once when the client retries with the same key after that.

KV downloads (shipping mode) are charged before the first byte is sent (load price plus
egress bytes, one transaction), because the bytes cannot be taken back; a retry with the same
Idempotency-Key re-sends the artifact without a new charge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

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

MAX_PENDING_LOADS_PER_AGENT = 8
STALE_GRACE_SECONDS = 60.0
# Egress for shipping mode, billed to the agent's wallet: $0.09 per GB = 0.09 nano-USD per byte.
EGRESS_NANO_PER_GB = 90_000_000


def request_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def egress_price_nano(n_bytes: int) -> int:
    per_gb = int(getattr(settings, "KV_EGRESS_NANO_PER_GB", EGRESS_NANO_PER_GB))
    return -(-n_bytes * per_gb // 10**9)  # rounded up to a whole nano-USD


def completion_timeout() -> float:
    return float(settings.COMPLETION_TIMEOUT_SECONDS)


def stale_after() -> timedelta:
    return timedelta(seconds=completion_timeout() + STALE_GRACE_SECONDS)


@dataclass
class Reservation:
    load: Load
    license: License
    document: Document
    replay: bool  # the load already succeeded: answer with load.response, charge nothing


# --- reserve ---------------------------------------------------------------------------------


def reserve_load(
    *,
    agent: User,
    license_id: int,
    document_id: int | None,
    kind: LoadKind,
    idempotency_key: str | None,
    payload: dict[str, Any],
) -> Reservation:
    """Reserve one load of the agent's license for this request (or find the retried one)."""
    require_agent(agent)
    digest = request_hash({"kind": kind, "license": license_id, "document": document_id, **payload})
    key = idempotency_key or f"auto:{uuid.uuid4().hex}"
    try:
        return _reserve(agent=agent, license_id=license_id, document_id=document_id, kind=kind,
                        key=key, digest=digest)
    except IntegrityError:
        # Two requests with one Idempotency-Key raced to create the Load: the loser retries
        # and finds the winner's row (pending: 409 in progress).
        return _reserve(agent=agent, license_id=license_id, document_id=document_id, kind=kind,
                        key=key, digest=digest)


@transaction.atomic
def _reserve(
    *, agent: User, license_id: int, document_id: int | None, kind: LoadKind, key: str, digest: str
) -> Reservation:
    load = Load.objects.select_for_update().filter(agent=agent, idempotency_key=key).first()
    if load is not None:
        if load.request_hash != digest:
            raise conflict(
                "idempotency_key_reused",
                "This Idempotency-Key was already used for a different request.",
            )
        if load.status == LoadStatus.SUCCEEDED:
            license = License.objects.select_related("document").get(pk=load.license_id)
            return Reservation(load=load, license=license, document=license.document, replay=True)
        if load.status == LoadStatus.PENDING:
            if timezone.now() - load.created_at < stale_after():
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
        # Another agent's license is indistinguishable from a missing one.
        raise not_found("license")
    document = license.document
    if document_id is not None and document.pk != document_id:
        raise conflict("license_document_mismatch", "This license is for another document.")
    _check_usable(license=license, document=document)
    pending = Load.objects.filter(agent=agent, status=LoadStatus.PENDING).count()
    if pending >= MAX_PENDING_LOADS_PER_AGENT:
        raise MarketplaceError(
            code="too_many_requests",
            message=f"At most {MAX_PENDING_LOADS_PER_AGENT} loads may run at once per agent.",
            status=429,
        )
    License.objects.filter(pk=license.pk).update(
        loads_used=F("loads_used") + 1, updated_at=timezone.now()
    )
    license.refresh_from_db()
    if load is None:
        load = Load.objects.create(
            license=license, agent=agent, idempotency_key=key, request_hash=digest, kind=kind
        )
    else:  # re-attempt of a failed load, on the same row (one ledger key: load:<id>)
        load.status = LoadStatus.PENDING
        load.attempts += 1
        load.error = ""
        load.error_code = ""
        load.finished_at = None
        load.created_at = timezone.now()
        load.save()
    return Reservation(load=load, license=license, document=document, replay=False)


def _check_usable(*, license: License, document: Document) -> None:
    if license.status == LicenseStatus.REVOKED:
        raise conflict("license_revoked", "This license was revoked.")
    if license.status == LicenseStatus.EXPIRED or license.is_expired:
        raise conflict("license_expired", "This license has expired.")
    if license.status == LicenseStatus.EXHAUSTED or license.loads_used >= license.loads_total:
        raise conflict("license_exhausted", "This license has no loads left.")
    if document.status != DocumentStatus.READY or not document.artifact_key:
        raise conflict("document_not_ready", "This document's KV cache is not available.")


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
    """Mark a pending load failed and release its reservation. Never charges."""
    locked = Load.objects.select_for_update().get(pk=load.pk)
    if locked.status == LoadStatus.PENDING:
        _fail_locked(load=locked, code=code, message=message)
    return locked


@transaction.atomic
def charge_load(
    *,
    load: Load,
    result: dict[str, Any],
    egress_bytes: int = 0,
    wall_seconds: float | None = None,
) -> Load:
    """Mark a pending load succeeded and charge it, once (ledger key ``load:<id>``).

    ``result`` is the worker's result (usage, timings, text); it is stored as the response that
    retries replay. Raises InsufficientFunds only for a KV download's egress (the transaction
    rolls back, nothing is charged, and the caller fails the load). The ledger caps a
    generation's compute charge at the wallet balance, so a served load always settles; the
    amount actually charged is what the Load records.
    """
    from ledger import services as ledger_services
    from ledger.selectors import tariff_for

    load = Load.objects.select_for_update().get(pk=load.pk)
    if load.status == LoadStatus.SUCCEEDED:
        return load
    if load.status != LoadStatus.PENDING:
        raise conflict("load_not_pending", "This load is no longer pending.")
    license = (
        License.objects.select_for_update(of=("self",)).select_related("document", "agent")
        .get(pk=load.license_id)
    )
    document = license.document
    usage = result.get("usage") or {}
    tariff = tariff_for(document.model_slug)
    suffix = int(usage.get("suffix_tokens", 0))
    output = int(usage.get("output_tokens", 0))
    compute = 0
    if load.kind != LoadKind.KV_DOWNLOAD:
        compute = int(tariff.compute_price_nano(suffix, output))
    amount = license.price_per_load_nano
    memo = f"{load.kind} load {load.pk} of document {document.pk}"
    ledger_key = load.ledger_idempotency_key

    def settle(compute_nano: int) -> int:
        """Returns the compute actually charged (the ledger caps it at the wallet balance)."""
        if amount <= 0 and compute_nano <= 0:
            return 0
        tx = ledger_services.settle_load(
            license_ref=license.ledger_ref,
            publisher=document.publisher,
            amount_nano=amount,
            publisher_share=tariff.publisher_share,
            idempotency_key=ledger_key,
            agent=license.agent,
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
                agent=license.agent,
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
    load.wall_seconds = wall_seconds
    load.worker = result.get("worker") or load.worker
    load.amount_nano = amount
    load.compute_nano = compute
    load.egress_nano = egress_nano
    load.egress_bytes = egress_bytes
    load.response = {**result, "loads_left": license.loads_left}
    load.finished_at = timezone.now()
    load.save()
    if license.loads_used >= license.loads_total and license.status == LicenseStatus.ACTIVE:
        if not license.loads.filter(status=LoadStatus.PENDING).exists():
            license.status = LicenseStatus.EXHAUSTED
            license.closed_at = timezone.now()
            license.save(update_fields=["status", "closed_at", "updated_at"])
    return load


def expire_stale_loads() -> int:
    """Fail (uncharged) loads left pending by a dead API process. Returns how many."""
    cutoff = timezone.now() - stale_after()
    count = 0
    for load in Load.objects.filter(status=LoadStatus.PENDING, created_at__lt=cutoff):
        fail_load(load=load, code="abandoned", message="The request was abandoned.")
        count += 1
    return count


# --- run -------------------------------------------------------------------------------------


class CompletionTimeout(MarketplaceError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            code="timeout",
            message=f"The completion did not finish within {seconds:g} seconds; not charged.",
            status=504,
        )


def dispatch_generation(
    *, load: Load, document: Document, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Send the generation to a worker of the document's model and wait for its result.

    Returns the worker's result dict; raises CompletionTimeout or MarketplaceError (the engine
    refused the request or the worker failed). Tests replace this function to run without
    workers.
    """
    from celery.exceptions import TimeoutError as CeleryTimeout

    from kvmarket.celery import app
    from marketplace import tasks, workers

    queue, host = workers.completion_queue(document.model_slug, document.artifact_key)
    async_result = tasks.run_completion.apply_async(
        kwargs={
            "load_id": load.pk,
            "model_slug": document.model_slug,
            "artifact_key": document.artifact_key,
            **params,
        },
        queue=queue,
        expires=timeout,
    )
    Load.objects.filter(pk=load.pk).update(celery_task_id=async_result.id, worker=host or "")
    try:
        result = async_result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
    except CeleryTimeout:
        app.control.revoke(async_result.id)
        workers.forget_workers()  # the chosen worker may be gone: list the live ones again
        raise CompletionTimeout(timeout) from None
    if async_result.state == "REVOKED":
        # The task expired in the queue before a worker took it (expires=timeout): a timeout.
        async_result.forget()
        raise CompletionTimeout(timeout)
    if async_result.failed() or not isinstance(result, dict):
        log.error("Completion task %s failed: %r", async_result.id, result)
        async_result.forget()
        raise MarketplaceError(
            code="generation_failed", message="The worker failed to run this completion.",
            status=502,
        )
    async_result.forget()
    if not result.get("ok"):
        error = result.get("error") or {}
        code = error.get("code", "generation_failed")
        status = 422 if code == "invalid_request" else 502
        if code in ("artifact_not_found",):
            status = 503
        raise MarketplaceError(code=code, message=error.get("message", "Generation failed."),
                               status=status)
    return result


def run_generation(
    *,
    agent: User,
    kind: LoadKind,
    license_id: int,
    document_id: int | None,
    idempotency_key: str | None,
    params: dict[str, Any],
    timeout: float | None = None,
) -> tuple[Load, bool]:
    """Reserve, dispatch, wait, charge. Returns (succeeded Load, replayed?).

    Raises MarketplaceError (including CompletionTimeout) after failing the load uncharged.
    """
    reservation = reserve_load(
        agent=agent, license_id=license_id, document_id=document_id, kind=kind,
        idempotency_key=idempotency_key, payload=params,
    )
    load = reservation.load
    if reservation.replay:
        return load, True
    _precheck_compute_funds(agent=agent, document=reservation.document, load=load, params=params)
    timeout = completion_timeout() if timeout is None else timeout
    started = time.monotonic()
    try:
        result = dispatch_generation(
            load=load, document=reservation.document, params=params, timeout=timeout
        )
    except MarketplaceError as exc:
        fail_load(load=load, code=exc.code, message=exc.message)
        raise
    except Exception as exc:
        fail_load(load=load, code="generation_failed", message=str(exc)[:500])
        raise
    return charge_load(load=load, result=result, wall_seconds=time.monotonic() - started), False


def _precheck_compute_funds(
    *, agent: User, document: Document, load: Load, params: dict[str, Any]
) -> None:
    """402 before running when the wallet cannot pay the output tokens this request may use."""
    from ledger.selectors import tariff_for, wallet_balance

    worst = int(tariff_for(document.model_slug).compute_price_nano(0, int(params.get("max_tokens")
                                                                          or 0)))
    if worst > 0 and wallet_balance(agent) < worst:
        fail_load(load=load, code="insufficient_funds", message="Wallet too low for compute.")
        raise MarketplaceError(
            code="insufficient_funds",
            message="Your wallet cannot pay for this request's output tokens; top it up.",
            status=402,
        )


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
