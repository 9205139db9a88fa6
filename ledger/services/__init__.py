"""Ledger writes, by use case, around one posting core (journal.py).

Every money-moving call is ONE database transaction with a unique idempotency key; a retry
with the same key (and the same request) returns the first Transaction without posting again,
a retry with the same key and a different request raises IdempotencyConflict. All amounts are
int nano-USD (1 USD = 10**9); all functions are keyword-only.

- journal.py: the posting core (idempotency, balanced write, a locked read only where the
  legs depend on a balance); every rule once.
- metering.py: license purchases, load settlements (the compute cap), egress, refunds.
- topups.py: wallet credits: Stripe Checkout top-ups, sandbox test credits.
- payouts.py: settlement runs, approval, transfers, reversals, Connect onboarding.
- stripe_events.py: the webhook's events, each applied once.
- tariffs.py: storing a model's tariff.
"""

from ledger.services.metering import (
    purchase_license,
    record_egress,
    refund_escrow,
    settle_load,
    split_amount,
)
from ledger.services.payouts import (
    approve_payout,
    connect_onboarding_link,
    connect_sandbox_account,
    create_due_payouts,
    create_payout,
    mark_payout_failed,
    reject_payout,
    save_connect_account,
    send_payout_transfer,
    update_connect_account,
)
from ledger.services.stripe_events import handle_stripe_event
from ledger.services.tariffs import ensure_tariff
from ledger.services.topups import (
    SANDBOX_CREDIT_MAX_NANO,
    create_topup_checkout,
    credit_checkout_session,
    credit_sandbox,
    credit_topup,
    record_checkout_session,
)

__all__ = [
    "SANDBOX_CREDIT_MAX_NANO",
    "approve_payout",
    "connect_onboarding_link",
    "create_due_payouts",
    "create_payout",
    "create_topup_checkout",
    "credit_checkout_session",
    "credit_sandbox",
    "credit_topup",
    "ensure_tariff",
    "handle_stripe_event",
    "mark_payout_failed",
    "purchase_license",
    "record_checkout_session",
    "record_egress",
    "refund_escrow",
    "reject_payout",
    "connect_sandbox_account",
    "save_connect_account",
    "send_payout_transfer",
    "settle_load",
    "split_amount",
    "update_connect_account",
]
