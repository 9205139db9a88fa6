"""Writes for licenses: purchase (paid into escrow), expiry and revocation (escrow refunded)."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.models import Document, DocumentStatus, License, LicenseStatus, Role, User
from marketplace.selectors.documents import price_per_load_nano
from marketplace.services.errors import MarketplaceError, conflict, forbidden, not_found

log = logging.getLogger(__name__)

LICENSE_DAYS = 30
MAX_LOADS_PER_LICENSE = 1_000_000


def require_agent(user: User) -> None:
    if user.role != Role.AGENT:
        raise forbidden("agent_only", "Only agent accounts can buy and use licenses.")


def purchase_license(
    *,
    agent: User,
    document_id: int,
    loads: int,
    idempotency_key: str | None = None,
    days: int = LICENSE_DAYS,
) -> tuple[License, bool]:
    """Buy ``loads`` loads of a ready, listed document. Returns (license, created).

    The price per load is snapshotted on the license; the whole pack is paid from the agent's
    wallet into the license's escrow (ledger ref ``license:<id>``) in the same transaction, so
    a refused payment (InsufficientFunds, 402) leaves no license. With an ``idempotency_key``
    a retry returns the first license (created=False) without paying twice.
    """
    require_agent(agent)
    if not 1 <= loads <= MAX_LOADS_PER_LICENSE:
        raise MarketplaceError(
            code="invalid_request",
            message=f"loads must be between 1 and {MAX_LOADS_PER_LICENSE}.",
            status=422,
        )
    if idempotency_key:
        existing = _existing(agent=agent, key=idempotency_key, document_id=document_id, loads=loads)
        if existing is not None:
            return existing, False
    try:
        return _purchase(
            agent=agent, document_id=document_id, loads=loads,
            idempotency_key=idempotency_key or None, days=days,
        ), True
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race.
        existing = _existing(agent=agent, key=idempotency_key, document_id=document_id, loads=loads)
        if existing is None:
            raise
        return existing, False


def _existing(*, agent: User, key: str | None, document_id: int, loads: int) -> License | None:
    if not key:
        return None
    existing = License.objects.filter(agent=agent, idempotency_key=key).first()
    if existing is not None and (
        existing.document_id != document_id or existing.loads_total != loads
    ):
        raise conflict(
            "idempotency_key_reused",
            "This Idempotency-Key was already used for a different request.",
        )
    return existing


@transaction.atomic
def _purchase(
    *, agent: User, document_id: int, loads: int, idempotency_key: str | None, days: int
) -> License:
    from ledger import services as ledger_services

    document = Document.objects.select_for_update().filter(pk=document_id).first()
    if document is None or (document.status != DocumentStatus.READY and not document.listed):
        raise not_found("document")
    if not document.listed:
        raise conflict("document_unlisted", "This document is no longer listed.")
    if document.status != DocumentStatus.READY:
        raise conflict("document_not_ready", "This document's KV cache is not ready yet.")
    price = price_per_load_nano(document)
    assert price is not None  # a ready document has n_tokens
    license = License.objects.create(
        agent=agent,
        document=document,
        loads_total=loads,
        price_per_load_nano=price,
        expires_at=timezone.now() + timedelta(days=days),
        idempotency_key=idempotency_key,
    )
    amount = price * loads
    if amount > 0:
        ledger_services.purchase_license(
            agent=agent,
            license_ref=license.ledger_ref,
            amount_nano=amount,
            idempotency_key=f"{license.ledger_ref}:purchase",
            document_ref=f"document:{document.pk}",
        )
    return license


def _close(*, license: License, status: LicenseStatus) -> License:
    """Close a license and refund its unused escrow (no pending load may be in flight)."""
    from ledger import services as ledger_services

    license.status = status
    license.closed_at = timezone.now()
    license.save(update_fields=["status", "closed_at", "updated_at"])
    if license.loads_used < license.loads_total and license.price_per_load_nano > 0:
        ledger_services.refund_escrow(
            license_ref=license.ledger_ref,
            agent=license.agent,
            idempotency_key=f"{license.ledger_ref}:refund",
        )
    return license


@transaction.atomic
def revoke_license(*, license: License) -> License:
    """Staff action: stop the license now and refund the unused loads."""
    from marketplace.models import LoadStatus

    license = License.objects.select_for_update().get(pk=license.pk)
    if license.status != LicenseStatus.ACTIVE:
        return license
    if license.loads.filter(status=LoadStatus.PENDING).exists():
        raise conflict("load_in_progress", "A load is in progress; try again in a moment.")
    return _close(license=license, status=LicenseStatus.REVOKED)


def expire_licenses(*, now=None) -> int:
    """Close licenses past their expiry and refund unused escrow. Returns how many closed."""
    from marketplace.models import LoadStatus

    now = now or timezone.now()
    closed = 0
    ids = list(
        License.objects.filter(status=LicenseStatus.ACTIVE, expires_at__lte=now)
        .values_list("pk", flat=True)
    )
    for license_id in ids:
        with transaction.atomic():
            license = License.objects.select_for_update().get(pk=license_id)
            if license.status != LicenseStatus.ACTIVE or license.expires_at > now:
                continue
            if license.loads.filter(status=LoadStatus.PENDING).exists():
                continue  # next run
            _close(license=license, status=LicenseStatus.EXPIRED)
            closed += 1
    return closed
