"""The agent console: API keys, wallet and top-up (or sandbox credits), licenses, usage.

Thin: reads from marketplace.selectors and ledger.selectors; the top-up goes through
ledger.services.create_topup_checkout (the wallet is credited only by Stripe's signed
webhook, never by this page); in sandbox mode (settings.SANDBOX_MODE) test credits go through
ledger.services.credit_sandbox, keyed by a token rendered into the form (a double click credits
once). Operator-facing reasons (Stripe not configured) are logged, never shown to agents.
"""

from __future__ import annotations

import logging
import uuid

from django.conf import settings
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
NANO_PER_USD = 10**9

SANDBOX_AMOUNTS_USD = (5, 20, 100)


def _console_context(request: HttpRequest, form: TopUpForm | None = None) -> dict:
    from ledger.selectors import wallet_balance, wallet_history

    keys = list(api_keys_of(request.user))
    return {
        "wallet_nano": wallet_balance(request.user),
        "wallet_history": wallet_history(request.user, limit=25),
        "form": form or TopUpForm(),
        "stripe_configured": bool(settings.STRIPE_SECRET_KEY),
        "sandbox": settings.SANDBOX_MODE,
        "sandbox_amounts": SANDBOX_AMOUNTS_USD,
        "credit_token": uuid.uuid4().hex,
        "active_keys": [k for k in keys if k.is_active],
        "licenses": page_selectors.agent_licenses(request.user),
        "loads": page_selectors.agent_recent_loads(request.user),
        "usage": page_selectors.agent_usage_totals(request.user),
        "catalogue": page_selectors.catalogue_preview(limit=5),
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
        # The reason is for the operator (logs); the agent learns only that it did not work.
        log.warning("Top-up checkout refused: %s (%s)", exc.message, exc.code)
        messages.error(request, "Top-ups are not available right now. Nothing was charged.")
        return redirect("agent-console")
    except Exception:  # stripe.StripeError, network errors: a message, never a stack trace
        log.exception("Stripe Checkout for a top-up failed")
        messages.error(request, "Stripe could not start the checkout right now; try again.")
        return redirect("agent-console")
    return redirect(url)


@agent_required
@require_POST
def sandbox_credit(request: HttpRequest) -> HttpResponse:
    """Sandbox mode only: add test credits (no money moves)."""
    from ledger.errors import LedgerError
    from ledger.services import credit_sandbox

    if not settings.SANDBOX_MODE:
        messages.error(request, "Test credits are not available on this instance.")
        return redirect("agent-console")
    try:
        dollars = int(request.POST.get("amount", ""))
    except ValueError:
        dollars = 0
    token = request.POST.get("token", "").strip()[:64]
    if dollars not in SANDBOX_AMOUNTS_USD or not token:
        messages.error(request, "Pick an amount of test credits.")
        return redirect("agent-console")
    try:
        credit_sandbox(agent=request.user, amount_nano=dollars * NANO_PER_USD,
                       idempotency_key=f"sandbox:{request.user.pk}:{token}")
    except LedgerError as exc:
        log.warning("Sandbox credit refused: %s", exc.message)
        messages.error(request, "The test credits could not be added.")
        return redirect("agent-console")
    messages.success(request, f"Added ${dollars} of test credits (sandbox: no money moved).")
    return redirect(f"{reverse('agent-console')}#wallet")


@agent_required
@require_GET
def licenses(request: HttpRequest) -> HttpResponse:
    """Every license with loads left, expiry and its quickstart snippet."""
    from marketplace.views.store import quickstart

    rows = []
    for lic in page_selectors.agent_licenses(request.user, limit=200):
        questions = [q for q in (lic.document.example_questions or []) if isinstance(q, str)]
        rows.append({
            "license": lic,
            "qs": quickstart(request, document=lic.document, license_id=lic.pk,
                             question=questions[0] if questions else
                             "What is this document about?"),
        })
    return render(request, "store/licenses.html", {"rows": rows})
