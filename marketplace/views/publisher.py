"""Publisher pages: dashboard (with live precompute progress), new document, document page.

Thin: reads come from marketplace.selectors.pages, writes go through
marketplace.services.documents, payouts onboarding through ledger.services.
Another publisher's document is a 404 (indistinguishable from a missing one).
"""

from __future__ import annotations

import logging
from decimal import Decimal
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from ledger import stripe_gateway
from marketplace.economics import cost_plot
from marketplace.forms.documents import DocumentCreateForm, DocumentEditForm
from marketplace.models import Document, DocumentStatus, Role
from marketplace.selectors import ops as ops_selectors
from marketplace.selectors import pages as page_selectors
from marketplace.selectors.documents import model_label
from marketplace.selectors.economics import document_economics
from marketplace.selectors.models import model_status
from marketplace.services import documents as document_services

log = logging.getLogger(__name__)

POLL_SECONDS = 1
CHART_DAYS = 30


def publisher_required(view):
    """Logged-in publishers only; others get a 403 page that says why."""

    @wraps(view)
    @login_required
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if request.user.role != Role.PUBLISHER:
            return render(
                request,
                "accounts/forbidden.html",
                {"reason": "This page is for publisher accounts: publishers list documents "
                           "and earn per load. Sign up as a publisher to list one."},
                status=403,
            )
        return view(request, *args, **kwargs)

    return wrapper


def _own_row(request: HttpRequest, document_id: int) -> page_selectors.DocumentRow:
    row = page_selectors.publisher_document_row(publisher=request.user, document_id=document_id)
    if row is None:
        raise Http404("No such document.")
    return row


def _dashboard_context(request: HttpRequest) -> dict:
    rows = page_selectors.publisher_document_rows(request.user)
    return {
        "rows": rows,
        "polling": any(r.is_active for r in rows),
        "poll_seconds": POLL_SECONDS,
        "totals": page_selectors.publisher_totals(request.user, rows),
    }


@publisher_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    context = _dashboard_context(request)
    context["connect"] = page_selectors.connect_account_of(request.user)
    context["payouts"] = ops_selectors.publisher_payouts(request.user)
    context["models"] = model_status()
    context["sandbox_payouts"] = stripe_gateway.sandbox()
    ready = [r for r in context["rows"] if r.document.n_tokens]
    if ready:
        top = max(ready, key=lambda r: (r.loads, r.document.pk))
        econ = document_economics(top.document)
        context.update(econ_document=top.document, econ=econ,
                       plot=cost_plot(econ) if econ else None)
    return render(request, "marketplace/publisher_dashboard.html", context)


@publisher_required
@require_GET
def dashboard_documents(request: HttpRequest) -> HttpResponse:
    """The dashboard's documents panel (htmx polls it while a precompute runs)."""
    return render(request, "marketplace/_publisher_documents.html", _dashboard_context(request))


@publisher_required
@require_http_methods(["GET", "POST"])
def document_create(request: HttpRequest) -> HttpResponse:
    form = DocumentCreateForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            document = document_services.create_document(
                publisher=request.user,
                title=data["title"],
                text=data["document_text"],
                model_slug=data["model"],
                price_per_load_nano=data["price_per_load"],
                description=data.get("description") or "",
            )
        except ValidationError as exc:
            _errors_to_form(form, exc)
        else:
            messages.success(
                request, f"“{document.title}” is queued: a worker is prefilling its KV cache."
            )
            return redirect("document-detail", document_id=document.pk)
    return render(
        request,
        "marketplace/document_create.html",
        {"form": form, "tariffs": page_selectors.tariff_hints(), "models": model_status()},
    )


_SERVICE_FIELDS = {"title": "title", "text": "text", "model": "model",
                   "price_per_load_nano": "price_per_load", "description": "description"}


def _errors_to_form(form: DocumentCreateForm | DocumentEditForm, exc: ValidationError) -> None:
    if hasattr(exc, "error_dict"):
        for field, errors in exc.error_dict.items():
            target = _SERVICE_FIELDS.get(field)
            for error in errors:
                form.add_error(target if target in form.fields else None, error)
    else:
        form.add_error(None, exc)


def _detail_context(request: HttpRequest, row: page_selectors.DocumentRow) -> dict:
    document = row.document
    return {
        "row": row,
        "document": document,
        "model_label": model_label(document.model_slug),
        "polling": row.is_active,
        "poll_seconds": POLL_SECONDS,
        "verification": document.verification or None,
        "progress": page_selectors.precompute_progress(document),
    }


@publisher_required
@require_GET
def document_detail(request: HttpRequest, document_id: int) -> HttpResponse:
    row = _own_row(request, document_id)
    context = _detail_context(request, row)
    days = page_selectors.document_daily(
        publisher=request.user, document=row.document, days=CHART_DAYS
    )
    context["chart"] = daily_chart(days)
    context["econ"] = econ = document_economics(row.document)
    context["plot"] = cost_plot(econ) if econ else None
    return render(request, "marketplace/document_detail.html", context)


@publisher_required
@require_http_methods(["GET", "POST"])
def document_edit(request: HttpRequest, document_id: int) -> HttpResponse:
    """Title, description and price; the text and model stay fixed."""
    document = _own_row(request, document_id).document
    initial = {
        "title": document.title, "description": document.description,
        "price_per_load": (Decimal(document.price_per_load_nano) / 10**9
                           if document.price_per_load_nano is not None else None),
    }
    form = DocumentEditForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            document_services.update_document(
                document=document, publisher=request.user, title=data["title"],
                description=data["description"], price_per_load_nano=data["price_per_load"],
                clear_price=data["price_per_load"] is None,
            )
        except ValidationError as exc:
            _errors_to_form(form, exc)
        else:
            messages.success(request, "Saved. A new price applies to licenses bought from now "
                                      "on; licenses already sold keep theirs.")
            return redirect("document-detail", document_id=document.pk)
    return render(request, "marketplace/document_edit.html", {"form": form, "document": document})


@publisher_required
@require_GET
def document_status(request: HttpRequest, document_id: int) -> HttpResponse:
    """The document page's status panel (htmx polls it while the precompute runs)."""
    row = _own_row(request, document_id)
    response = render(request, "marketplace/_document_status.html", _detail_context(request, row))
    if request.htmx and request.GET.get("was") in ("queued", "precomputing") and not row.is_active:
        # Finished: reload the whole page once so the numbers and buttons around it update.
        response["HX-Refresh"] = "true"
    return response


@publisher_required
@require_POST
def document_retry(request: HttpRequest, document_id: int) -> HttpResponse:
    document = _own_row(request, document_id).document
    try:
        document_services.retry_precompute(document=document, publisher=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    except Document.DoesNotExist as exc:  # raced with a delete
        raise Http404("No such document.") from exc
    else:
        messages.success(request, "The precompute is queued again.")
    return redirect("document-detail", document_id=document.pk)


@publisher_required
@require_POST
def document_unlist(request: HttpRequest, document_id: int) -> HttpResponse:
    document = _own_row(request, document_id).document
    document_services.unlist_document(document=document, publisher=request.user)
    messages.success(
        request,
        f"“{document.title}” is unlisted: agents can no longer buy licenses for it. "
        "Licenses already sold keep working until they expire.",
    )
    return redirect("document-detail", document_id=document.pk)


@publisher_required
@require_POST
def document_relist(request: HttpRequest, document_id: int) -> HttpResponse:
    document = _own_row(request, document_id).document
    document = document_services.relist_document(document=document, publisher=request.user)
    note = " Its KV cache is being prefilled again." if document.status in (
        DocumentStatus.QUEUED, DocumentStatus.PRECOMPUTING) else ""
    messages.success(request, f"“{document.title}” is listed again.{note}")
    return redirect("document-detail", document_id=document.pk)


@publisher_required
@require_POST
def stripe_connect(request: HttpRequest) -> HttpResponse:
    """Start (or resume) Stripe Connect onboarding for payouts; in sandbox mode without Stripe,
    connect a simulated payout account instead."""
    from ledger import services as ledger_services
    from ledger.errors import LedgerError

    if stripe_gateway.sandbox():
        ledger_services.connect_sandbox_account(publisher=request.user)
        messages.success(request, "Sandbox: a simulated payout account is connected. Approved "
                                  "payouts are marked paid; no money moves.")
        return redirect("publisher-dashboard")
    back = request.build_absolute_uri(reverse("publisher-dashboard"))
    try:
        url = ledger_services.connect_onboarding_link(
            publisher=request.user, return_url=back, refresh_url=back
        )
    except LedgerError as exc:  # StripeNotConfigured, PaymentProviderError
        messages.error(request, _stripe_message(exc))
        return redirect("publisher-dashboard")
    except Exception:  # stripe.StripeError and network errors: never a stack trace
        log.exception("Stripe Connect onboarding link failed")
        messages.error(request, "Stripe could not start the onboarding right now; try again.")
        return redirect("publisher-dashboard")
    return redirect(url)


def _stripe_message(exc: Exception) -> str:
    # The reason is for the operator (logged); the publisher gets what it means for them.
    log.warning("Stripe Connect onboarding refused: %s", getattr(exc, "message", exc))
    if getattr(exc, "code", "") == "stripe_unavailable":
        return ("Payouts cannot be set up right now. Your earnings keep accruing and stay "
                "payable.")
    return "Stripe could not start the onboarding right now; try again later."


# --- chart -----------------------------------------------------------------------------------

CHART_W, CHART_H, PAD_L, PAD_R, PAD_T, PAD_B = 600, 160, 34, 50, 12, 22


def daily_chart(days: list[dict]) -> dict:
    """Geometry of an inline SVG: bars = loads per day, line = earnings per day.

    ``days`` is ledger.selectors.publisher_earnings(...)["days"] (every day present, oldest
    first). Everything is computed here; the template only draws.
    """
    n = len(days)
    plot_w = CHART_W - PAD_L - PAD_R
    plot_h = CHART_H - PAD_T - PAD_B
    max_loads = max([d["loads"] for d in days] + [1])
    max_earned = max([d["earned_nano"] for d in days] + [1])
    slot = plot_w / max(n, 1)
    bar_w = max(slot * 0.7, 1.0)
    bars, points, labels = [], [], []
    for i, d in enumerate(days):
        x = PAD_L + i * slot
        h = plot_h * d["loads"] / max_loads
        bars.append({
            "x": round(x + (slot - bar_w) / 2, 2), "y": round(PAD_T + plot_h - h, 2),
            "w": round(bar_w, 2), "h": round(h, 2), "date": d["date"], "loads": d["loads"],
            "earned_nano": d["earned_nano"],
        })
        ey = PAD_T + plot_h - plot_h * d["earned_nano"] / max_earned
        points.append(f"{x + slot / 2:.2f},{ey:.2f}")
        if i in (0, n // 2, n - 1):
            labels.append({"x": round(x + slot / 2, 2), "text": d["date"].strftime("%b %d")})
    return {
        "width": CHART_W, "height": CHART_H, "bars": bars, "line": " ".join(points),
        "labels": labels, "max_loads": max_loads if any(d["loads"] for d in days) else 0,
        "max_earned_nano": max_earned if any(d["earned_nano"] for d in days) else 0,
        "total_loads": sum(d["loads"] for d in days),
        "total_earned_nano": sum(d["earned_nano"] for d in days),
        "axis_y": PAD_T + plot_h, "axis_x0": PAD_L, "axis_x1": CHART_W - PAD_R,
        "label_y": CHART_H - 6, "top_y": PAD_T + 4, "right_x": CHART_W - PAD_R + 4,
        "left_x": PAD_L - 4, "days": n,
    }
