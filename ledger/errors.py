"""Ledger errors. Each has a stable `code`; the API maps them to HTTP statuses."""


class LedgerError(Exception):
    code = "ledger_error"
    http_status = 400

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()


class InsufficientFunds(LedgerError):
    """The account cannot pay this amount."""

    code = "insufficient_funds"
    http_status = 402


class IdempotencyConflict(LedgerError):
    """This idempotency key was already used for a different request."""

    code = "idempotency_conflict"
    http_status = 409


class InvalidAmount(LedgerError):
    """Amounts are positive integers in nano-USD."""

    code = "invalid_amount"
    http_status = 422


class PayoutStateError(LedgerError):
    """The payout is not in a state that allows this change."""

    code = "payout_state"
    http_status = 409


class StripeNotConfigured(LedgerError):
    """Stripe is not configured (STRIPE_SECRET_KEY is empty)."""

    code = "stripe_unavailable"
    http_status = 503


class PaymentProviderError(LedgerError):
    """The payment provider refused or failed the request."""

    code = "payment_provider_error"
    http_status = 502


class SandboxDisabled(LedgerError):
    """Test credits exist only in sandbox mode (settings.SANDBOX_MODE)."""

    code = "sandbox_disabled"
    http_status = 403
