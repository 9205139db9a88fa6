"""Reads for documents: the agents' catalogue, publishers' own documents, prices, stats."""

from __future__ import annotations

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum

from marketplace.models import Document, DocumentStatus, LoadStatus, Role, User


def catalogue() -> QuerySet[Document]:
    """What agents can browse and buy: ready and listed."""
    return Document.objects.filter(status=DocumentStatus.READY, listed=True).select_related(
        "publisher"
    )


def documents_visible_to(user: User) -> QuerySet[Document]:
    """Agents see the catalogue; publishers their own documents (any status); staff all."""
    if user.role == Role.PUBLISHER:
        return Document.objects.filter(publisher=user).select_related("publisher")
    if user.role == Role.STAFF or user.is_superuser:
        return Document.objects.all().select_related("publisher")
    return catalogue()


def documents_of(publisher: User) -> QuerySet[Document]:
    return Document.objects.filter(publisher=publisher).order_by("-created_at")


def document_of(*, publisher: User, document_id: int) -> Document | None:
    return Document.objects.filter(publisher=publisher, pk=document_id).first()


def default_price_per_load_nano(*, model_slug: str, n_tokens: int) -> int:
    """The tariff's cache-read price of one load of ``n_tokens`` cached tokens."""
    from ledger.selectors import tariff_for

    return int(tariff_for(model_slug).load_price_nano(n_tokens))


def price_per_load_nano(document: Document) -> int | None:
    """The publisher's price, else the tariff's; None while the token count is unknown."""
    if document.price_per_load_nano is not None:
        return document.price_per_load_nano
    if document.n_tokens is None:
        return None
    return default_price_per_load_nano(model_slug=document.model_slug, n_tokens=document.n_tokens)


def model_label(slug: str) -> str:
    return settings.KVMARKET_MODELS.get(slug, {}).get("label", slug)


def document_stats(document: Document) -> dict[str, int | float]:
    """Loads served, revenue billed for loads, and prefill compute saved (tokens and FLOPs)."""
    ok = Q(loads__status=LoadStatus.SUCCEEDED)
    agg = document.licenses.aggregate(
        n_loads=Count("loads", filter=ok),
        n_billed=Sum("loads__amount_nano", filter=ok),
        n_cached=Sum("loads__cached_tokens", filter=ok),
        n_licenses=Count("id", distinct=True),
    )
    loads = agg["n_loads"] or 0
    n = document.n_tokens or 0
    per_load_flops = document.precompute_flops or 0.0
    return {
        "licenses": agg["n_licenses"] or 0,
        "loads": loads,
        "billed_nano": int(agg["n_billed"] or 0),
        "cached_tokens_served": int(agg["n_cached"] or 0),
        "prefill_tokens_saved": loads * n,
        "prefill_flops_saved": loads * per_load_flops,
    }
