"""Wallet credits: Stripe Checkout top-ups (credited only from Stripe's signed webhook) and
sandbox test credits."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from ledger import stripe_gateway
from ledger.errors import InvalidAmount, SandboxDisabled
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


# The most one sandbox credit may add, so a test wallet stays a test wallet.
SANDBOX_CREDIT_MAX_NANO = 1000 * 10**9


def credit_sandbox(*, agent, amount_nano: int, idempotency_key: str) -> Transaction:
    """Sandbox funding -> agent wallet: test credits, only while settings.SANDBOX_MODE is on
    (never in production settings). Double entry like a top-up; the same key credits once."""
    if not settings.SANDBOX_MODE:
        raise SandboxDisabled("Test credits are only available in sandbox mode.")
    journal.check_amount(amount_nano)
    if amount_nano > SANDBOX_CREDIT_MAX_NANO:
        raise InvalidAmount("A sandbox credit is at most $1,000.")
    return journal.transfer(
        source=journal.system(AccountKind.SANDBOX_FUNDING),
        dest=journal.wallet(agent.pk),
        amount_nano=amount_nano,
        kind=TransactionKind.SANDBOX_CREDIT,
        idempotency_key=idempotency_key,
        fingerprint=journal.fingerprint("sandbox_credit", agent=agent.pk, amount=amount_nano),
        memo="Sandbox test credit",
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
