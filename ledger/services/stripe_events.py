"""Stripe webhook events, applied once each (the caller has verified the signature)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from ledger.models import Payout, PayoutStatus, StripeEvent
from ledger.services import payouts, topups


@transaction.atomic
def handle_stripe_event(*, event_id: str, event_type: str, data_object: dict[str, Any]) -> str:
    """Apply one verified Stripe event, once: the event id is recorded in the same transaction
    (unique), so redeliveries are no-ops. Top-ups are credited from checkout.session.completed
    with payment_status "paid" and from checkout.session.async_payment_succeeded, keyed by the
    session id, so a session is credited once whichever events arrive."""
    _, created = StripeEvent.objects.get_or_create(event_id=event_id, defaults={"type": event_type})
    if not created:
        return "duplicate"
    if event_type in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        result = topups.credit_checkout_session(data_object)
    elif event_type == "account.updated":
        n = payouts.update_connect_account(
            stripe_account_id=data_object.get("id"),
            payouts_enabled=bool(data_object.get("payouts_enabled")),
        )
        result = f"updated {n} connect account(s)"
    elif event_type == "transfer.reversed":
        payout = Payout.objects.filter(stripe_transfer_id=data_object.get("id")).first()
        if payout is not None and payout.status == PayoutStatus.PAID:
            payouts.mark_payout_failed(payout=payout, reason="Stripe transfer reversed")
            result = f"payout {payout.pk} reversed"
        else:
            result = "no matching paid payout"
    else:
        result = "ignored"
    StripeEvent.objects.filter(event_id=event_id).update(result=result[:255])
    return result
