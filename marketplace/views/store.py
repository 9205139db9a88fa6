"""The public storefront: the catalogue, a document's card (with its economics and a
quickstart), and buying a pack of loads in the browser.

Thin: reads from marketplace.selectors.storefront / economics, the purchase goes through
marketplace.services.licenses.purchase_license (the same service as the API), keyed by a token
rendered into the form, so a double click buys once.
"""

from __future__ import annotations

import uuid
from decimal import Decimal, InvalidOperation

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from ledger.errors import InsufficientFunds, LedgerError
from marketplace.economics import cost_plot
from marketplace.models import Role
from marketplace.selectors import storefront
from marketplace.selectors.economics import document_economics
from marketplace.services.errors import MarketplaceError
from marketplace.services.licenses import purchase_license
from marketplace.views.accounts import agent_required

DEFAULT_QUESTION = "What is this document about?"


def _filters(request: HttpRequest) -> dict:
    g = request.GET
    max_price = g.get("max_price", "").strip()
    try:
        max_price_nano = int(Decimal(max_price) * 10**9) if max_price else None
    except (InvalidOperation, ValueError):
        max_price_nano = None
    sort = g.get("sort", "popular")
    return {
        "q": g.get("q", "").strip()[:200],
        "model": g.get("model", ""),
        "length": g.get("length", ""),
        "max_price": max_price if max_price_nano is not None else "",
        "max_price_nano": max_price_nano,
        "publisher": g.get("publisher", "").strip()[:200],
        "verified": g.get("verified") == "1",
        "sort": sort if sort in storefront.SORTS else "popular",
    }


@require_GET
def catalogue(request: HttpRequest) -> HttpResponse:
    f = _filters(request)
    listings = storefront.search_catalogue(
        q=f["q"], model=f["model"], length=f["length"], max_price_nano=f["max_price_nano"],
        publisher=f["publisher"], verified=f["verified"], sort=f["sort"],
    )
    return render(request, "store/catalogue.html", {
        "listings": listings, "f": f, "sorts": storefront.SORTS,
        "lengths": {k: v[0] for k, v in storefront.LENGTHS.items()},
        "models": storefront.catalogue_models(),
        "filtered": any(f[k] for k in ("q", "model", "length", "max_price", "publisher",
                                        "verified")),
    })


def _wallet(request: HttpRequest) -> int | None:
    if request.user.is_authenticated and request.user.role == Role.AGENT:
        from ledger.selectors import wallet_balance

        return wallet_balance(request.user)
    return None


def quickstart(request: HttpRequest, *, document, license_id: int | None,
               question: str) -> dict:
    """The snippets of a document page and the licenses page, with the real ids."""
    return {
        "base_url": request.build_absolute_uri("/api/v1").rstrip("/"),
        "document_id": document.pk,
        "license_id": license_id,
        "model": document.model_slug,
        "question": question,
    }


@require_GET
def document_page(request: HttpRequest, document_id: int) -> HttpResponse:
    document = storefront.visible_document(user=request.user, document_id=document_id)
    if document is None:
        raise Http404("No such document.")
    listing = storefront.document_listing(document)
    wallet = _wallet(request)
    econ = document_economics(document)
    questions = [q for q in (document.example_questions or []) if isinstance(q, str)]
    preview, more = storefront.preview(document)
    live_license = None
    if wallet is not None:
        live_license = next((lic for lic in request.user.licenses.filter(document=document)
                             .order_by("-created_at") if lic.is_live and lic.loads_left), None)
    return render(request, "store/document.html", {
        "document": document, "listing": listing, "preview": preview, "preview_more": more,
        "questions": questions,
        "econ": econ, "plot": cost_plot(econ) if econ else None,
        "wallet_nano": wallet,
        "packs": storefront.packs(listing.price_nano, wallet),
        "buy_token": uuid.uuid4().hex,
        "is_owner": request.user.is_authenticated and document.publisher_id == request.user.pk,
        "live_license": live_license,
        "qs": quickstart(request, document=document,
                         license_id=live_license.pk if live_license else None,
                         question=questions[0] if questions else DEFAULT_QUESTION),
    })


@agent_required
@require_POST
def document_buy(request: HttpRequest, document_id: int) -> HttpResponse:
    """Buy a pack: the token in the form is the purchase's idempotency key, so a second click
    (or a resubmitted form) returns the license the first one bought."""
    back = reverse("document-page", args=[document_id])
    try:
        loads = int(request.POST.get("loads", ""))
    except ValueError:
        messages.error(request, "Pick a pack of loads.")
        return redirect(back)
    token = request.POST.get("token", "").strip()[:64] or None
    try:
        license, created = purchase_license(
            agent=request.user, document_id=document_id, loads=loads,
            idempotency_key=f"web:{token}" if token else None,
        )
    except MarketplaceError as exc:
        messages.error(request, exc.message)
        return redirect(back)
    except InsufficientFunds:
        messages.error(request, "Your wallet cannot pay for this pack. Add credits first; "
                                "nothing was charged.")
        return redirect(back)
    except LedgerError:
        messages.error(request, "The purchase could not be completed; nothing was charged.")
        return redirect(back)
    if created:
        messages.success(request, f"You bought {license.loads_total:,} loads of "
                                  f"“{license.document.title}”: license {license.pk}.")
    return redirect(f"{reverse('agent-licenses')}#license-{license.pk}")
