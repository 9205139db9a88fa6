"""Money helpers for tests: wallet credits through the real ledger service, in nano-USD."""

from __future__ import annotations

import uuid

NANO = 10**9  # nano-USD per USD


def fund(agent, *, amount_nano: int = 10 * NANO) -> None:
    """Credit the agent's wallet with amount_nano (a top-up with a fresh idempotency key).
    Keyword-only, so that no call passes dollars where nano-USD are meant."""
    from ledger.services import credit_topup

    if not isinstance(amount_nano, int) or isinstance(amount_nano, bool):
        raise TypeError(f"fund() takes an integer amount of nano-USD, not {amount_nano!r}")
    credit_topup(
        agent=agent, amount_nano=amount_nano, idempotency_key=f"test-topup-{uuid.uuid4()}"
    )
