"""The operations console for staff: payouts awaiting review (approve, or reject with a
reason), transfers not sent (retry), failed payouts, "run settlement now", ledger health.

Thin: reads from marketplace.selectors.ops, writes through ledger.services (the same services
the admin and the beat tasks use). Each action answers with one message that says what
happened to the money.
"""

from __future__ import annotations

import logging
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from ledger import services as ledger_services
from ledger.errors import LedgerError
from ledger.models import ConnectAccount, Payout, PayoutStatus
from ledger.money import usd_amount
from marketplace.selectors import ops as ops_selectors

log = logging.getLogger(__name__)


def staff_required(view):
    """Logged-in staff only; others get a 403 page that says why."""

    @wraps(view)
    @login_required
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_staff:
            return render(request, "accounts/forbidden.html",
                          {"reason": "The operations console is for kvmarket staff."},
                          status=403)
        return view(request, *args, **kwargs)

    return wrapper


@staff_required
@require_GET
def console(request: HttpRequest) -> HttpResponse:
    return render(request, "ops/console.html", {
        "payouts": ops_selectors.ops_payouts(),
        "health": ops_selectors.ledger_health(),
    })


@staff_required
@require_POST
def settle_now(request: HttpRequest) -> HttpResponse:
    created = ledger_services.create_due_payouts()
    if created:
        messages.success(request, f"Settlement created {len(created)} payout(s) for review.")
    else:
        messages.info(request, "Settlement found no publisher due a payout (payable under the "
                               "threshold, or a payout already open).")
    return redirect("ops-console")


@staff_required
@require_POST
def approve(request: HttpRequest, payout_id: int) -> HttpResponse:
    payout = get_object_or_404(Payout.objects.select_related("publisher"), pk=payout_id)
    who, amount = payout.publisher.email, usd_amount(payout.amount_nano)
    if payout.status == PayoutStatus.PENDING_REVIEW and not ConnectAccount.objects.filter(
        publisher_id=payout.publisher_id
    ).exists():
        messages.error(request, f"Payout #{payout.pk} was not approved: {who} has no Stripe "
                                "account to send it to. Reject it with a reason, or wait until "
                                "they connect one.")
        return redirect("ops-console")
    try:
        ledger_services.approve_payout(payout=payout, actor=request.user, send_transfer=False)
    except LedgerError as exc:
        messages.error(request, f"Payout #{payout.pk} was not approved: {exc.message}")
        return redirect("ops-console")
    try:  # sent now, so the message below says what happened to the money
        payout = ledger_services.send_payout_transfer(payout_id=payout.pk)
    except LedgerError as exc:  # left approved: "Transfers not sent" offers a retry
        log.warning("Payout %s: transfer not sent: %s", payout.pk, exc.message)
        payout.refresh_from_db()
    if payout.status == PayoutStatus.PAID:
        messages.success(request, f"Payout #{payout.pk} approved: {amount} sent to {who} "
                                  f"(transfer {payout.stripe_transfer_id}).")
    elif payout.status == PayoutStatus.FAILED:
        messages.error(request, f"Payout #{payout.pk} could not be sent: "
                                f"{payout.failure_reason} The {amount} is back in {who}'s "
                                "payable balance.")
    else:
        messages.warning(request, f"Payout #{payout.pk} approved, but the transfer of {amount} "
                                  "is not sent yet: retry it under “Transfers not sent”.")
    return redirect("ops-console")


@staff_required
@require_POST
def reject(request: HttpRequest, payout_id: int) -> HttpResponse:
    payout = get_object_or_404(Payout, pk=payout_id)
    reason = request.POST.get("reason", "").strip()[:500]
    if not reason:
        messages.error(request, f"Payout #{payout.pk} was not rejected: give a reason (the "
                                "publisher sees it).")
        return redirect("ops-console")
    try:
        ledger_services.reject_payout(payout=payout, actor=request.user, note=reason)
    except LedgerError as exc:
        messages.error(request, f"Payout #{payout.pk} was not rejected: {exc.message}")
        return redirect("ops-console")
    messages.success(request, f"Payout #{payout.pk} rejected. The amount stays in the "
                              "publisher's payable balance.")
    return redirect("ops-console")


@staff_required
@require_POST
def retry(request: HttpRequest, payout_id: int) -> HttpResponse:
    payout = get_object_or_404(Payout, pk=payout_id)
    try:
        payout = ledger_services.send_payout_transfer(payout_id=payout.pk)
    except LedgerError as exc:
        log.warning("Payout %s: transfer retry failed: %s", payout.pk, exc.message)
        messages.error(request, f"Payout #{payout.pk}: the transfer failed again ({exc.message}).")
        return redirect("ops-console")
    if payout.status == PayoutStatus.PAID:
        messages.success(
            request, f"Payout #{payout.pk} sent (transfer {payout.stripe_transfer_id})."
        )
    elif payout.status == PayoutStatus.FAILED:
        messages.error(request, f"Payout #{payout.pk} failed: {payout.failure_reason}")
    else:
        messages.warning(request, f"Payout #{payout.pk} is {payout.get_status_display().lower()}.")
    return redirect("ops-console")


@staff_required
@require_POST
def repay(request: HttpRequest, payout_id: int) -> HttpResponse:
    """A failed (reversed) payout: put the publisher's payable up for review again now, as a
    new payout, instead of waiting for the next settlement."""
    payout = get_object_or_404(Payout.objects.select_related("publisher"), pk=payout_id)
    if payout.status != PayoutStatus.FAILED:
        messages.error(request, f"Payout #{payout.pk} has not failed.")
        return redirect("ops-console")
    try:
        new = ledger_services.create_payout(publisher=payout.publisher, actor=request.user,
                                            note=f"after failed payout #{payout.pk}")
    except LedgerError as exc:
        messages.error(request, f"No new payout for {payout.publisher.email}: {exc.message}")
        return redirect("ops-console")
    messages.success(request, f"Payout #{new.pk} of {usd_amount(new.amount_nano)} created for "
                              f"review (after failed payout #{payout.pk}).")
    return redirect("ops-console")
