"""The only module that talks to Stripe (official SDK, `stripe.StripeClient`): Stripe I/O only,
no bookkeeping (ledger.services records what these calls return).

The client uses `stripe.RequestsClient` explicitly (the SDK's default sync client when
`requests` is installed), so tests can stub Stripe's HTTP with the `responses` library while
our code and the SDK's request/response handling run for real. STRIPE_API_BASE points the SDK
at stripe-mock or a test server when set.
"""

from __future__ import annotations

import logging
from typing import Any

import stripe
from django.conf import settings

from ledger.errors import StripeNotConfigured

log = logging.getLogger(__name__)


SANDBOX_ACCOUNT_PREFIX = "acct_sandbox_"


def sandbox() -> bool:
    """Sandbox mode with no Stripe keys: payout accounts and transfers are simulated."""
    return bool(settings.SANDBOX_MODE) and not settings.STRIPE_SECRET_KEY


def client() -> stripe.StripeClient:
    if not settings.STRIPE_SECRET_KEY:
        # The setting's name is for the operator's log; the error's message may reach users.
        log.warning("Stripe is not configured: STRIPE_SECRET_KEY is empty.")
        raise StripeNotConfigured("Payments are not available on this instance.")
    base = settings.STRIPE_API_BASE
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        http_client=stripe.RequestsClient(),
        base_addresses={"api": base, "connect": base, "files": base} if base else None,
        max_network_retries=getattr(settings, "STRIPE_MAX_NETWORK_RETRIES", 2),
    )


def create_checkout_session(
    *, agent_id: int, agent_email: str, amount_cents: int, success_url: str, cancel_url: str
) -> tuple[str, str]:
    """Create a Checkout Session for a wallet top-up; returns (session id, its URL)."""
    session = client().v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": amount_cents,
                        "product_data": {"name": "kvmarket wallet top-up"},
                    },
                }
            ],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "client_reference_id": str(agent_id),
            "customer_email": agent_email,
            "metadata": {"agent_id": str(agent_id), "purpose": "wallet_topup"},
        }
    )
    return session.id, session.url


def create_connect_account(*, publisher_id: int, email: str) -> str:
    """Create a publisher's Connect Express account (at most once: Stripe idempotency key per
    publisher); returns its id."""
    account = client().v1.accounts.create(
        params={
            "type": "express",
            "email": email,
            "capabilities": {"transfers": {"requested": True}},
            "metadata": {"publisher_id": str(publisher_id)},
        },
        options={"idempotency_key": f"connect-account-{publisher_id}"},
    )
    return account.id


def create_onboarding_link(*, account_id: str, return_url: str, refresh_url: str) -> str:
    """An onboarding link for a Connect account."""
    link = client().v1.account_links.create(
        params={
            "account": account_id,
            "return_url": return_url,
            "refresh_url": refresh_url,
            "type": "account_onboarding",
        }
    )
    return link.url


def create_transfer(
    *, amount_cents: int, destination: str, idempotency_key: str, payout_id: int
) -> stripe.Transfer:
    if sandbox() and destination.startswith(SANDBOX_ACCOUNT_PREFIX):
        # No money moves: the sandbox's simulated account gets a simulated transfer.
        return stripe.Transfer.construct_from(
            {"id": f"tr_sandbox_{payout_id}", "amount": amount_cents,
             "destination": destination}, None,
        )
    return client().v1.transfers.create(
        params={
            "amount": amount_cents,
            "currency": "usd",
            "destination": destination,
            "metadata": {"payout_id": str(payout_id)},
        },
        options={"idempotency_key": idempotency_key},
    )


def list_transfers() -> list[dict[str, Any]]:
    """Every transfer on the platform account (auto-paginated)."""
    page = client().v1.transfers.list(params={"limit": 100})
    out = []
    for obj in page.auto_paging_iter():
        t = obj.to_dict()  # StripeObject (SDK >= 13) is not a mapping
        out.append(
            {
                "id": t["id"],
                "amount": t["amount"],
                "reversed": bool(t.get("reversed")),
                "metadata": t.get("metadata") or {},
            }
        )
    return out


def list_paid_checkout_sessions() -> list[dict[str, Any]]:
    """Completed, paid Checkout Sessions created for wallet top-ups (auto-paginated)."""
    page = client().v1.checkout.sessions.list(params={"limit": 100, "status": "complete"})
    out = []
    for obj in page.auto_paging_iter():
        s = obj.to_dict()
        if s.get("payment_status") != "paid":
            continue
        if (s.get("metadata") or {}).get("purpose") != "wallet_topup":
            continue
        out.append({"id": s["id"], "amount_total": s["amount_total"]})
    return out


def construct_event(payload: bytes, sig_header: str | None) -> stripe.Event:
    """Verify the Stripe-Signature header (raises stripe.SignatureVerificationError)."""
    return stripe.Webhook.construct_event(payload, sig_header, settings.STRIPE_WEBHOOK_SECRET)
