"""Stripe-shaped JSON for `responses` stubs, and signed webhook deliveries."""

import json
import time

import stripe

API = "https://api.stripe.com"


def checkout_session(session_id: str, *, amount_cents: int, agent_id: int, paid: bool) -> dict:
    return {
        "id": session_id,
        "object": "checkout.session",
        "amount_total": amount_cents,
        "currency": "usd",
        "client_reference_id": str(agent_id),
        "metadata": {"agent_id": str(agent_id), "purpose": "wallet_topup"},
        "mode": "payment",
        "payment_status": "paid" if paid else "unpaid",
        "status": "complete",
        "url": f"https://checkout.stripe.com/c/pay/{session_id}",
    }


def transfer(transfer_id: str, *, amount_cents: int, destination: str, payout_id: int) -> dict:
    return {
        "id": transfer_id,
        "object": "transfer",
        "amount": amount_cents,
        "currency": "usd",
        "destination": destination,
        "metadata": {"payout_id": str(payout_id)},
        "reversed": False,
        "created": int(time.time()),
    }


def stripe_list(url: str, data: list) -> dict:
    return {"object": "list", "url": url, "has_more": False, "data": data}


def event(event_id: str, event_type: str, obj: dict) -> dict:
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {"object": obj},
    }


def deliver(client, evt: dict, secret: str = "whsec_test_kvmarket", *, sign: bool = True):
    """POST an event to /stripe/webhook signed with the SDK's own signature helper."""
    payload = json.dumps(evt)
    header = stripe.WebhookSignature.generate_signature_header(payload, secret)
    if not sign:
        header = header[:-4] + "0000"
    return client.post(
        "/stripe/webhook",
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=header,
    )
