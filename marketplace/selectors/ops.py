"""Reads for the operations console (staff) and the publishers' payout history: payouts with
their publisher, Connect status, the loads behind them and the reason of each decision."""

from __future__ import annotations

import io
from dataclasses import dataclass

from django.db.models import Count

from ledger.models import ConnectAccount, Payout, PayoutEvent, PayoutStatus
from marketplace.models import Load, LoadStatus, User

RECENT = 20


@dataclass
class PayoutRow:
    payout: Payout
    connect: ConnectAccount | None
    loads: int
    documents: list[dict]
    reason: str

    @property
    def connect_status(self) -> str:
        if self.connect is None:
            return "not connected"
        if self.connect.stripe_account_id.startswith("acct_sandbox_"):
            return "sandbox (simulated)"
        return "payouts enabled" if self.connect.payouts_enabled else "onboarding unfinished"


def _reason(payout: Payout) -> str:
    """Why a payout is where it is: the failure reason, or the note of its last decision."""
    if payout.status == PayoutStatus.FAILED and payout.failure_reason:
        return payout.failure_reason
    if payout.status == PayoutStatus.REJECTED:
        event = (PayoutEvent.objects.filter(payout=payout, to_status=PayoutStatus.REJECTED)
                 .order_by("-created_at").first())
        return event.note if event else ""
    return ""


def _loads_behind(payout: Payout) -> tuple[int, list[dict]]:
    """Loads of the publisher's documents settled after the publisher's previous payout that
    took money (approved or paid) and up to this payout's creation."""
    previous = (
        Payout.objects.filter(
            publisher_id=payout.publisher_id, created_at__lt=payout.created_at,
            status__in=(PayoutStatus.APPROVED, PayoutStatus.PAID),
        ).order_by("-created_at").values_list("created_at", flat=True).first()
    )
    loads = Load.objects.filter(
        license__document__publisher_id=payout.publisher_id, status=LoadStatus.SUCCEEDED,
        finished_at__lte=payout.created_at,
    )
    if previous is not None:
        loads = loads.filter(finished_at__gt=previous)
    per_doc = list(
        loads.values("license__document_id", "license__document__title")
        .annotate(n=Count("id")).order_by("-n")[:5]
    )
    documents = [{"id": d["license__document_id"], "title": d["license__document__title"],
                  "loads": d["n"]} for d in per_doc]
    return loads.count(), documents


def _rows(payouts) -> list[PayoutRow]:
    payouts = list(payouts)
    connects = {c.publisher_id: c for c in ConnectAccount.objects.filter(
        publisher_id__in={p.publisher_id for p in payouts})}
    rows = []
    for payout in payouts:
        n, documents = _loads_behind(payout)
        rows.append(PayoutRow(payout=payout, connect=connects.get(payout.publisher_id), loads=n,
                              documents=documents, reason=_reason(payout)))
    return rows


def _payouts():
    return Payout.objects.select_related("publisher")


def ops_payouts() -> dict[str, list[PayoutRow]]:
    return {
        "pending": _rows(_payouts().filter(status=PayoutStatus.PENDING_REVIEW)
                         .order_by("created_at")),
        "unsent": _rows(_payouts().filter(status=PayoutStatus.APPROVED).order_by("updated_at")),
        "failed": _rows(_payouts().filter(status=PayoutStatus.FAILED)
                        .order_by("-updated_at")[:RECENT]),
        "decided": _rows(_payouts().filter(status__in=(PayoutStatus.PAID,
                                                            PayoutStatus.REJECTED))
                         .order_by("-updated_at")[:RECENT]),
    }


def publisher_payouts(publisher: User) -> list[PayoutRow]:
    return _rows(_payouts().filter(publisher=publisher).order_by("-created_at")[:50])


def ledger_health() -> dict:
    """manage.py reconcile's ledger checks (Stripe skipped): ok, and its report lines."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("reconcile", "--skip-stripe", stdout=out, stderr=err)
        ok = True
    except CommandError:
        ok = False
    lines = [line for line in (out.getvalue() + err.getvalue()).splitlines() if line.strip()]
    return {"ok": ok, "lines": lines}
