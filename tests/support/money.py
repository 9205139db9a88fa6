"""Money helpers for tests: wallet credits through the real ledger service."""

from __future__ import annotations

import uuid

NANO = 10**9  # nano-USD per USD


def fund(agent, usd: float = 10.0) -> None:  # noqa: ANN001
    """Credit the agent's wallet (a top-up with a fresh idempotency key)."""
    from ledger.services import credit_topup

    credit_topup(
        agent=agent, amount_nano=int(usd * NANO), idempotency_key=f"test-topup-{uuid.uuid4()}"
    )
