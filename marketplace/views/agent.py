"""The agent console: API keys, wallet and top-up, licenses, usage history.

Thin: reads from marketplace.selectors and ledger.selectors; the top-up goes through
ledger.services.create_topup_checkout (the wallet is credited only by Stripe's signed
webhook, never by this page).
"""

from __future__ import annotations

import logging

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from marketplace.forms.documents import TopUpForm
from marketplace.selectors import pages as page_selectors
from marketplace.selectors.accounts import api_keys_of
from marketplace.views.accounts import agent_required

log = logging.getLogger(__name__)


def _console_context(request: HttpRequest, form: TopUpForm | None = None) -> dict:
    from django.conf import settings

    from ledger.selectors import wallet_balance, wallet_history

    keys = list(api_keys_of(request.user))
    return {
        "wallet_nano": wallet_balance(request.user),
        "wallet_history": wallet_history(request.user, limit=25),
        "form": form or TopUpForm(),
        "stripe_configured": bool(settings.STRIPE_SECRET_KEY),
        "active_keys": [k for k in keys if k.is_active],
        "licenses": page_selectors.agent_licenses(request.user),
        "loads": page_selectors.agent_recent_loads(request.user),
        "usage": page_selectors.agent_usage_totals(request.user),
        "catalogue": page_selectors.catalogue_preview(),
        "topup_state": request.GET.get("topup", ""),
    }


@agent_required
@require_GET
def console(request: HttpRequest) -> HttpResponse:
    return render(request, "marketplace/agent_console.html", _console_context(request))


@agent_required
@require_POST
def topup(request: HttpRequest) -> HttpResponse:
    """Start a Stripe Checkout for a wallet top-up and send the browser there."""
    from ledger import services as ledger_services
    from ledger.errors import LedgerError

    form = TopUpForm(request.POST)
    if not form.is_valid():
        return render(
            request, "marketplace/agent_console.html", _console_context(request, form), status=400
        )
    console_url = request.build_absolute_uri(reverse("agent-console"))
    try:
        url = ledger_services.create_topup_checkout(
            agent=request.user,
            amount_cents=form.amount_cents,
            success_url=f"{console_url}?topup=success",
            cancel_url=f"{console_url}?topup=cancelled",
        )
    except LedgerError as exc:
        if getattr(exc, "code", "") == "stripe_unavailable":
            messages.error(
                request,
                "Top-ups are not available: Stripe is not configured on this kvmarket instance "
                "(an operator must set STRIPE_SECRET_KEY). Nothing was charged.",
            )
        else:
            messages.error(request, f"Stripe refused the top-up: {exc.message}")
        return redirect("agent-console")
    except Exception:  # stripe.StripeError, network errors: a message, never a stack trace
        log.exception("Stripe Checkout for a top-up failed")
        messages.error(request, "Stripe could not start the checkout right now; try again.")
        return redirect("agent-console")
    return redirect(url)
