"""Natural keys of ledger accounts (one place, shared by services and selectors)."""

from ledger.models import AccountKind

SYSTEM_KEYS = {
    AccountKind.PLATFORM_REVENUE: "platform:revenue",
    AccountKind.PLATFORM_COMPUTE_REVENUE: "platform:compute_revenue",
    AccountKind.STRIPE_CLEARING: "stripe:clearing",
    AccountKind.SANDBOX_FUNDING: "sandbox:funding",
}


def wallet_key(user_id: int) -> str:
    return f"wallet:{user_id}"


def payable_key(user_id: int) -> str:
    return f"payable:{user_id}"


def escrow_key(license_ref: str) -> str:
    return f"escrow:{license_ref}"
