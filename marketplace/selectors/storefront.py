"""Reads for the public storefront: the catalogue with search, filters and sorting, one
document's card, and what a visitor may see."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Q, QuerySet

from marketplace.models import Document, DocumentStatus, LoadStatus, Role, User
from marketplace.selectors.documents import catalogue, model_label, price_per_load_nano

SORTS = {
    "popular": "Most loaded",
    "newest": "Newest",
    "price": "Price: low to high",
    "-price": "Price: high to low",
}
LENGTHS = {
    "short": ("Under 1,000 tokens", 0, 999),
    "medium": ("1,000 – 4,000 tokens", 1000, 4000),
    "long": ("Over 4,000 tokens", 4001, None),
}
PACKS = (10, 100, 1000)
PREVIEW_CHARS = 600
MAX_RESULTS = 200


@dataclass
class Listing:
    document: Document
    loads: int
    price_nano: int | None

    @property
    def verified(self) -> bool:
        return bool((self.document.verification or {}).get("passed"))

    @property
    def model_label(self) -> str:
        return model_label(self.document.model_slug)

    @property
    def publisher_name(self) -> str:
        publisher = self.document.publisher
        return publisher.display_name or publisher.email.split("@")[0]


def _with_loads(qs: QuerySet[Document]) -> QuerySet[Document]:
    return qs.annotate(
        n_loads=Count("licenses__loads", filter=Q(licenses__loads__status=LoadStatus.SUCCEEDED))
    )


def _listing(doc: Document) -> Listing:
    return Listing(document=doc, loads=int(getattr(doc, "n_loads", 0) or 0),
                   price_nano=price_per_load_nano(doc))


def search_catalogue(
    *,
    q: str = "",
    model: str = "",
    length: str = "",
    max_price_nano: int | None = None,
    publisher: str = "",
    verified: bool = False,
    sort: str = "popular",
) -> list[Listing]:
    """Listed, ready documents matching the filters. Prices depend on the tariff, so the price
    filter and sort run on the computed price (the catalogue is small)."""
    qs = catalogue()
    if q:
        qs = qs.filter(Q(title__icontains=q) | Q(description__icontains=q) | Q(text__icontains=q))
    if model:
        qs = qs.filter(model_slug=model)
    if length in LENGTHS:
        _, lo, hi = LENGTHS[length]
        qs = qs.filter(n_tokens__gte=lo)
        if hi is not None:
            qs = qs.filter(n_tokens__lte=hi)
    if publisher:
        qs = qs.filter(
            Q(publisher__display_name__icontains=publisher) | Q(publisher__email__iexact=publisher)
        )
    if verified:
        qs = qs.filter(verification__passed=True)
    qs = _with_loads(qs).order_by("-n_loads", "-ready_at", "-pk")
    if sort == "newest":
        qs = qs.order_by("-ready_at", "-pk")
    listings = [_listing(doc) for doc in qs[:MAX_RESULTS]]
    if max_price_nano is not None:
        listings = [x for x in listings if x.price_nano is not None
                    and x.price_nano <= max_price_nano]
    if sort in ("price", "-price"):
        listings.sort(key=lambda x: (x.price_nano or 0), reverse=sort == "-price")
    return listings


def catalogue_models() -> list[tuple[str, str]]:
    return [(slug, cfg.get("label", slug)) for slug, cfg in settings.KVMARKET_MODELS.items()]


def visible_document(*, user: User, document_id: int) -> Document | None:
    """The document page: anyone sees a listed, ready document; its publisher and staff see it
    in any state."""
    doc = Document.objects.select_related("publisher").filter(pk=document_id).first()
    if doc is None:
        return None
    if doc.listed and doc.status == DocumentStatus.READY:
        return doc
    if user.is_authenticated and (
        doc.publisher_id == user.pk or user.role == Role.STAFF or user.is_superuser
    ):
        return doc
    return None


def document_listing(document: Document) -> Listing:
    return _listing(_with_loads(Document.objects.filter(pk=document.pk)).get())


def preview(document: Document) -> tuple[str, bool]:
    """The opening of the text, cut at a word boundary, and whether there is more."""
    text = document.text.strip()
    if len(text) <= PREVIEW_CHARS:
        return text, False
    cut = text[:PREVIEW_CHARS].rsplit(" ", 1)[0]
    return cut, True


def packs(price_nano: int | None, wallet_nano: int | None) -> list[dict]:
    """The packs offered on the document page: loads, total and the wallet after buying."""
    if price_nano is None:
        return []
    rows = []
    for loads in PACKS:
        total = price_nano * loads
        rows.append({
            "loads": loads, "total_nano": total,
            "wallet_after_nano": None if wallet_nano is None else wallet_nano - total,
            "affordable": wallet_nano is None or wallet_nano >= total,
        })
    return rows
