"""Reads for the browser pages (publisher dashboard, document page, agent console).

Everything here is scoped to one user: a publisher's documents and earnings, an agent's
licenses, loads and wallet. Amounts are int nano-USD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum

from marketplace.models import Document, DocumentStatus, License, Load, LoadStatus, User
from marketplace.selectors.documents import catalogue, documents_of, price_per_load_nano

ACTIVE_STATUSES = (DocumentStatus.QUEUED, DocumentStatus.PRECOMPUTING)


def document_ref(document: Document | int) -> str:
    """The ledger's document reference (transaction.document_ref) of a document."""
    pk = document if isinstance(document, int) else document.pk
    return f"document:{pk}"


def _earnings_by_document(publisher: User) -> dict[str, int]:
    """All-time publisher earnings (payable credits from load settlements) per document ref."""
    from ledger.accounts import payable_key
    from ledger.models import Posting, TransactionKind

    rows = (
        Posting.objects.filter(
            account__key=payable_key(publisher.pk),
            transaction__kind=TransactionKind.LOAD_SETTLEMENT,
        )
        .values("transaction__document_ref")
        .annotate(earned=Sum("amount"))
    )
    return {r["transaction__document_ref"]: int(r["earned"] or 0) for r in rows}


def _with_load_stats(qs: QuerySet[Document]) -> QuerySet[Document]:
    ok = Q(licenses__loads__status=LoadStatus.SUCCEEDED)
    return qs.annotate(
        n_loads=Count("licenses__loads", filter=ok),
        n_billed=Sum("licenses__loads__amount_nano", filter=ok),
        n_cached=Sum("licenses__loads__cached_tokens", filter=ok),
    )


@dataclass
class DocumentRow:
    document: Document
    loads: int
    billed_nano: int
    earned_nano: int
    cached_tokens_served: int
    prefill_tokens_saved: int
    prefill_flops_saved: float | None
    price_nano: int | None

    @property
    def is_active(self) -> bool:
        return self.document.status in ACTIVE_STATUSES


def _row(doc: Document, earned: dict[str, int]) -> DocumentRow:
    loads = int(getattr(doc, "n_loads", 0) or 0)
    return DocumentRow(
        document=doc,
        loads=loads,
        billed_nano=int(getattr(doc, "n_billed", 0) or 0),
        earned_nano=earned.get(document_ref(doc), 0),
        cached_tokens_served=int(getattr(doc, "n_cached", 0) or 0),
        prefill_tokens_saved=loads * (doc.n_tokens or 0),
        prefill_flops_saved=(loads * doc.precompute_flops) if doc.precompute_flops else None,
        price_nano=price_per_load_nano(doc),
    )


def publisher_document_rows(publisher: User) -> list[DocumentRow]:
    """The publisher's documents (newest first) with loads served, earnings and compute saved."""
    earned = _earnings_by_document(publisher)
    docs = _with_load_stats(documents_of(publisher))
    return [_row(doc, earned) for doc in docs]


def publisher_document_row(*, publisher: User, document_id: int) -> DocumentRow | None:
    """One of the publisher's own documents with its numbers; None for anyone else's."""
    doc = _with_load_stats(documents_of(publisher).filter(pk=document_id)).first()
    if doc is None:
        return None
    return _row(doc, _earnings_by_document(publisher))


def publisher_totals(publisher: User, rows: list[DocumentRow]) -> dict[str, Any]:
    from ledger.selectors import payable_balance

    flops = [r.prefill_flops_saved for r in rows if r.prefill_flops_saved is not None]
    return {
        "documents": len(rows),
        "ready": sum(1 for r in rows if r.document.status == DocumentStatus.READY),
        "loads": sum(r.loads for r in rows),
        "earned_nano": sum(r.earned_nano for r in rows),
        "payable_nano": payable_balance(publisher),
        "prefill_tokens_saved": sum(r.prefill_tokens_saved for r in rows),
        "prefill_flops_saved": sum(flops) if flops else None,
    }


def any_precomputing(publisher: User) -> bool:
    return documents_of(publisher).filter(status__in=ACTIVE_STATUSES).exists()


def connect_account_of(publisher: User):
    from ledger.models import ConnectAccount

    return ConnectAccount.objects.filter(publisher=publisher).first()


def document_daily(*, publisher: User, document: Document, days: int = 30) -> list[dict]:
    """[{date, loads, earned_nano}] for every day of the period, oldest first (the chart)."""
    from ledger.selectors import publisher_earnings

    return publisher_earnings(publisher, days=days, document_ref=document_ref(document))["days"]


def _plain(value) -> str:
    """A Decimal without trailing zeros, never in exponent form: 0.100000 -> "0.1"."""
    from decimal import Decimal

    return format(Decimal(value).normalize(), "f")


def tariff_hints() -> list[dict[str, Any]]:
    """Per model: the tariff's default price of a load of 1,000 cached tokens (the form hint)."""
    from django.conf import settings

    from ledger.selectors import tariff_for

    hints = []
    for slug, cfg in settings.KVMARKET_MODELS.items():
        tariff = tariff_for(slug)
        hints.append(
            {
                "slug": slug,
                "label": cfg.get("label", slug),
                "per_1k_nano": int(tariff.load_price_nano(1000)),
                "per_1m_nano": int(tariff.load_price_nano(1_000_000)),
                "multiplier": _plain(tariff.cache_read_multiplier),
                "input_price_usd_per_mtok": _plain(tariff.input_price_usd_per_mtok),
                "publisher_share": tariff.publisher_share,
            }
        )
    return hints


# --- agents ----------------------------------------------------------------------------------


def agent_licenses(agent: User, *, limit: int = 50) -> list[License]:
    return list(
        License.objects.filter(agent=agent).select_related("document")
        .order_by("-created_at")[:limit]
    )


def agent_recent_loads(agent: User, *, limit: int = 25) -> list[Load]:
    return list(
        Load.objects.filter(agent=agent).select_related("license__document")
        .order_by("-created_at")[:limit]
    )


def agent_usage_totals(agent: User) -> dict[str, int]:
    agg = Load.objects.filter(agent=agent, status=LoadStatus.SUCCEEDED).aggregate(
        loads=Count("id"),
        cached=Sum("cached_tokens"),
        suffix=Sum("suffix_tokens"),
        output=Sum("output_tokens"),
        amount=Sum("amount_nano"),
        compute=Sum("compute_nano"),
        egress=Sum("egress_nano"),
    )
    return {k: int(v or 0) for k, v in agg.items()}


def catalogue_preview(*, limit: int = 10) -> list[Document]:
    return list(catalogue().order_by("-ready_at", "-created_at")[:limit])


# --- precompute progress -----------------------------------------------------------------------

STEPS = (
    ("tokenizing", "Tokenizing"),
    ("prefilling", "Prefilling"),
    ("verifying", "Writing and verifying"),
)


def precompute_progress(document: Document, *, now=None) -> dict[str, Any]:
    """The steps of a running precompute (done / current / to do) and an estimate of the time
    left: the prefill's remaining tokens at its rate so far; verification re-runs the prefill
    about twice (a two-step prefill and a one-shot one), so it is estimated at twice the
    prefill's duration."""
    from django.utils import timezone

    now = now or timezone.now()
    current = document.progress_step
    if not current and document.status == DocumentStatus.PRECOMPUTING:
        current = "prefilling" if document.tokens_done else "tokenizing"
    keys = [key for key, _ in STEPS]
    index = keys.index(current) if current in keys else -1
    steps = [
        {"key": key, "label": label,
         "state": "done" if i < index else "current" if i == index else "todo"}
        for i, (key, label) in enumerate(STEPS)
    ]
    remaining = None
    started = document.precompute_started_at
    if started and current == "prefilling" and document.tokens_done:
        elapsed = max((now - started).total_seconds(), 1e-3)
        rate = document.tokens_done / elapsed
        remaining = (document.tokens_total - document.tokens_done) / rate
    elif started and current == "verifying" and document.step_started_at:
        step_started = document.step_started_at
        prefill = max((step_started - started).total_seconds(), 0.0)
        remaining = max(2 * prefill - (now - step_started).total_seconds(), 0.0)
    label = dict(STEPS).get(current, "")
    return {"steps": steps, "current": current, "label": label, "remaining_seconds": remaining}
