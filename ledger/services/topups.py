"""Wallet top-ups: Stripe Checkout sessions, credited only from Stripe's signed webhook."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from ledger import stripe_gateway
from ledger.models import (
    NANO_PER_CENT,
    AccountKind,
    TopUp,
    TopUpStatus,
    Transaction,
    TransactionKind,
)
from ledger.services import journal


def credit_topup(
    *, agent, amount_nano: int, idempotency_key: str, external_ref: str = ""
) -> Transaction:
    """Stripe clearing -> agent wallet (called from the signed Stripe webhook)."""
    journal.check_amount(amount_nano)
    return journal.transfer(
        source=journal.system(AccountKind.STRIPE_CLEARING),
        dest=journal.wallet(agent.pk),
        amount_nano=amount_nano,
        kind=TransactionKind.TOPUP,
        idempotency_key=idempotency_key,
        fingerprint=journal.fingerprint(
            "topup", agent=agent.pk, amount=amount_nano, ref=external_ref
        ),
        memo="Wallet top-up",
        external_ref=external_ref,
    )


def create_topup_checkout(*, agent, amount_cents: int, success_url: str, cancel_url: str) -> str:
    """Create a Stripe Checkout Session for a wallet top-up, record it, and return its URL. The
    wallet is credited only when Stripe's signed webhook says the session is paid."""
    if amount_cents <= 0:
        raise ValueError("amount_cents must be positive")
    session_id, url = stripe_gateway.create_checkout_session(
        agent_id=agent.pk,
        agent_email=agent.email,
        amount_cents=amount_cents,
        success_url=success_url,
        cancel_url=cancel_url,
    )
    record_checkout_session(agent=agent, session_id=session_id, amount_cents=amount_cents)
    return url


@transaction.atomic
def record_checkout_session(*, agent, session_id: str, amount_cents: int) -> TopUp:
    return TopUp.objects.create(agent=agent, session_id=session_id, amount_cents=amount_cents)


def credit_checkout_session(session: dict[str, Any]) -> str:
    """Credit a paid Checkout Session once (ledger key "stripe-checkout:<session id>"); called
    inside the webhook's transaction. Returns what was done, for the event's record."""
    session_id = session["id"]
    if session.get("payment_status") != "paid":
        return "not paid yet"
    amount_cents = int(session.get("amount_total") or 0)
    topup = TopUp.objects.select_for_update().filter(session_id=session_id).first()
    if topup is not None:
        agent = topup.agent
    else:
        agent_id = session.get("client_reference_id") or (session.get("metadata") or {}).get(
            "agent_id"
        )
        if not agent_id:
            return "no agent on session"
        agent = get_user_model().objects.get(pk=int(agent_id))
    tx = credit_topup(
        agent=agent,
        amount_nano=amount_cents * NANO_PER_CENT,
        idempotency_key=f"stripe-checkout:{session_id}",
        external_ref=session_id,
    )
    if topup is not None and topup.status != TopUpStatus.PAID:
        topup.status, topup.transaction, topup.paid_at = TopUpStatus.PAID, tx, timezone.now()
        topup.save(update_fields=["status", "transaction", "paid_at"])
    return f"credited {amount_cents} cents as transaction {tx.pk}"
