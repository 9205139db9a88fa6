"""Ledger data: accounts, transactions, postings (double entry, integer nano-USD), tariffs,
payouts and the Stripe bookkeeping tables.

Units: every amount is an integer number of nano-USD (1 USD = 10**9 nano-USD), stored as
BIGINT. Sign convention: a posting's amount is the change of its account's balance; the
postings of one transaction sum to zero (enforced by a deferred PostgreSQL constraint trigger,
see migration 0002), and postings are never updated or deleted (a trigger rejects it).

Balances: the agent wallet and the license escrow keep a materialised `balance` column,
guarded by CHECK >= 0 and changed by an UPDATE in the same database transaction as their
postings. A publisher payable and the system accounts (platform revenue, compute revenue,
Stripe clearing, sandbox funding) have no balance column (NULL): their balance is the sum of
their postings, so concurrent settlements append postings without queueing on one hot row.
A payable never goes below zero all the same: only payouts debit it, and they lock its row and
check the sum first (ledger/services/journal.py).
"""

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Mod
from django.db.models.lookups import Exact
from django.utils import timezone

NANO_PER_USD = 10**9
NANO_PER_CENT = 10**7


class AccountKind(models.TextChoices):
    AGENT_WALLET = "agent_wallet", "Agent wallet"
    LICENSE_ESCROW = "license_escrow", "License escrow"
    PUBLISHER_PAYABLE = "publisher_payable", "Publisher payable"
    PLATFORM_REVENUE = "platform_revenue", "Platform revenue"
    PLATFORM_COMPUTE_REVENUE = "platform_compute_revenue", "Platform compute revenue"
    STRIPE_CLEARING = "stripe_clearing", "Stripe clearing"
    # Where test credits come from in sandbox mode (settings.SANDBOX_MODE): no real money.
    SANDBOX_FUNDING = "sandbox_funding", "Sandbox funding"


# Never below zero.
BOUNDED_KINDS = (
    AccountKind.AGENT_WALLET,
    AccountKind.LICENSE_ESCROW,
    AccountKind.PUBLISHER_PAYABLE,
)
# Bounded accounts whose balance is stored (the rest: the sum of their postings).
STORED_BALANCE_KINDS = (AccountKind.AGENT_WALLET, AccountKind.LICENSE_ESCROW)
SYSTEM_KINDS = (
    AccountKind.PLATFORM_REVENUE,
    AccountKind.PLATFORM_COMPUTE_REVENUE,
    AccountKind.STRIPE_CLEARING,
    AccountKind.SANDBOX_FUNDING,
)


class Account(models.Model):
    """One ledger account. `key` is its stable natural key, e.g. "wallet:17", "escrow:lic-9"."""

    key = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=32, choices=AccountKind.choices)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="ledger_accounts",
    )
    license_ref = models.CharField(max_length=160, blank=True, default="")
    currency = models.CharField(max_length=3, default="usd")
    # Stored for STORED_BALANCE_KINDS (never negative); NULL for the others (sum of postings).
    balance = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=[k.value for k in AccountKind]), name="ledger_account_kind"
            ),
            models.CheckConstraint(
                condition=(
                    Q(kind__in=[k.value for k in STORED_BALANCE_KINDS], balance__gte=0)
                    | (
                        ~Q(kind__in=[k.value for k in STORED_BALANCE_KINDS])
                        & Q(balance__isnull=True)
                    )
                ),
                name="ledger_account_balance_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(kind__in=[k.value for k in SYSTEM_KINDS]) | Q(owner__isnull=False),
                name="ledger_account_owner_required",
            ),
            models.CheckConstraint(
                condition=Q(kind=AccountKind.LICENSE_ESCROW.value, license_ref__gt="")
                | (~Q(kind=AccountKind.LICENSE_ESCROW.value) & Q(license_ref="")),
                name="ledger_account_license_ref_iff_escrow",
            ),
        ]

    def __str__(self) -> str:
        return self.key

    @property
    def is_bounded(self) -> bool:
        return self.kind in BOUNDED_KINDS


class TransactionKind(models.TextChoices):
    TOPUP = "topup", "Wallet top-up"
    LICENSE_PURCHASE = "license_purchase", "License purchase"
    LOAD_SETTLEMENT = "load_settlement", "Load settlement"
    EGRESS = "egress", "KV egress"
    ESCROW_REFUND = "escrow_refund", "Escrow refund"
    PAYOUT = "payout", "Payout"
    PAYOUT_REVERSAL = "payout_reversal", "Payout reversal"
    SANDBOX_CREDIT = "sandbox_credit", "Sandbox test credit"


class Transaction(models.Model):
    """A balanced group of postings. Immutable (a trigger rejects UPDATE and DELETE)."""

    idempotency_key = models.CharField(max_length=200, unique=True)
    # sha256 of the request that created it: a retry with the same key and a different
    # request raises IdempotencyConflict instead of returning an unrelated result.
    fingerprint = models.CharField(max_length=64)
    kind = models.CharField(max_length=32, choices=TransactionKind.choices)
    memo = models.CharField(max_length=255, blank=True, default="")
    # Few indexes on purpose: every settlement inserts a row here (hot path). Reads go
    # through postings (indexed by account) or the unique idempotency key.
    license_ref = models.CharField(max_length=160, blank=True, default="")
    document_ref = models.CharField(max_length=160, blank=True, default="")
    external_ref = models.CharField(max_length=255, blank=True, default="")
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=[k.value for k in TransactionKind]),
                name="ledger_transaction_kind",
            ),
            models.CheckConstraint(
                condition=Q(idempotency_key__gt=""), name="ledger_transaction_key_not_empty"
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind} ({self.idempotency_key})"


class Posting(models.Model):
    """One leg of a transaction: `amount` (signed nano-USD) changes `account`'s balance."""

    transaction = models.ForeignKey(
        Transaction, on_delete=models.PROTECT, related_name="postings"
    )
    # Indexed by ledger_post_account_id_idx (account, -id) below; no second FK index.
    account = models.ForeignKey(
        Account, on_delete=models.PROTECT, related_name="postings", db_index=False
    )
    amount = models.BigIntegerField()
    # The account's balance right after this posting (bounded accounts only).
    balance_after = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(condition=~Q(amount=0), name="ledger_posting_amount_nonzero"),
        ]
        indexes = [models.Index(fields=["account", "-id"], name="ledger_post_account_id_idx")]

    def __str__(self) -> str:
        return f"{self.account_id}: {self.amount:+d}"


class Tariff(models.Model):
    """Prices per model. Editing a tariff prices future loads only: postings store amounts.

    Rounding rule (documented, tested): prices are exact decimals; a computed price is rounded
    DOWN once, to a whole nano-USD, at the end (never per token). A settlement splits an amount
    into publisher = floor(amount x share) and platform = amount - publisher, so the legs always
    add up to exactly the amount charged: no nano-USD is created or lost.
    """

    model_slug = models.SlugField(max_length=80, unique=True)
    input_price_usd_per_mtok = models.DecimalField(max_digits=14, decimal_places=6)
    output_price_usd_per_mtok = models.DecimalField(max_digits=14, decimal_places=6)
    cache_read_multiplier = models.DecimalField(
        max_digits=8, decimal_places=6, default=Decimal("0.1")
    )
    publisher_share = models.DecimalField(max_digits=7, decimal_places=6, default=Decimal("0.8"))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_slug"]
        constraints = [
            models.CheckConstraint(
                condition=Q(input_price_usd_per_mtok__gte=0, output_price_usd_per_mtok__gte=0),
                name="ledger_tariff_prices_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(cache_read_multiplier__gte=0), name="ledger_tariff_multiplier_gte_0"
            ),
            models.CheckConstraint(
                condition=Q(publisher_share__gte=0, publisher_share__lte=1),
                name="ledger_tariff_share_0_1",
            ),
        ]

    def __str__(self) -> str:
        return self.model_slug

    # 1 USD per million tokens = 10**9 nano-USD / 10**6 tokens = 1000 nano-USD per token.
    @property
    def input_nano_per_token(self) -> Decimal:
        return Decimal(self.input_price_usd_per_mtok) * 1000

    @property
    def output_nano_per_token(self) -> Decimal:
        return Decimal(self.output_price_usd_per_mtok) * 1000

    def load_price_nano(self, n_tokens: int) -> int:
        """cache_read_multiplier x input price per token x tokens, rounded down to 1 nano-USD."""
        if n_tokens < 0:
            raise ValueError("n_tokens must be >= 0")
        exact = Decimal(self.cache_read_multiplier) * self.input_nano_per_token * n_tokens
        return int(exact.to_integral_value(rounding="ROUND_FLOOR"))

    def compute_price_nano(self, suffix_tokens: int, output_tokens: int) -> int:
        """Suffix tokens at the input price plus output tokens at the output price, rounded
        down once to 1 nano-USD."""
        if suffix_tokens < 0 or output_tokens < 0:
            raise ValueError("token counts must be >= 0")
        exact = (
            self.input_nano_per_token * suffix_tokens
            + self.output_nano_per_token * output_tokens
        )
        return int(exact.to_integral_value(rounding="ROUND_FLOOR"))


class ConnectAccount(models.Model):
    """A publisher's Stripe Connect Express account."""

    publisher = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="stripe_connect"
    )
    stripe_account_id = models.CharField(max_length=64, unique=True)
    payouts_enabled = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.stripe_account_id


class TopUpStatus(models.TextChoices):
    OPEN = "open", "Open"
    PAID = "paid", "Paid"


class TopUp(models.Model):
    """A Stripe Checkout Session created for a wallet top-up; credited only by the webhook."""

    agent = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="topups"
    )
    session_id = models.CharField(max_length=255, unique=True)
    amount_cents = models.PositiveIntegerField()
    status = models.CharField(max_length=8, choices=TopUpStatus.choices, default=TopUpStatus.OPEN)
    transaction = models.ForeignKey(
        Transaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.session_id


class PayoutStatus(models.TextChoices):
    PENDING_REVIEW = "pending_review", "Pending review"
    APPROVED = "approved", "Approved (transfer pending)"
    PAID = "paid", "Paid (transfer sent)"
    REJECTED = "rejected", "Rejected"
    FAILED = "failed", "Failed (reversed)"


OPEN_PAYOUT_STATUSES = (PayoutStatus.PENDING_REVIEW, PayoutStatus.APPROVED)


class Payout(models.Model):
    """A payout of whole cents of a publisher's payable to their Connect account.

    pending_review -> approved (payable -> stripe clearing posted, transfer queued)
      -> paid (Stripe transfer created, idempotency key "payout-<id>")
      -> failed (transfer failed or reversed: clearing -> payable reversal posted)
    pending_review -> rejected (nothing was posted).
    """

    publisher = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="payouts"
    )
    amount_nano = models.BigIntegerField()
    status = models.CharField(
        max_length=16, choices=PayoutStatus.choices, default=PayoutStatus.PENDING_REVIEW
    )
    transaction = models.ForeignKey(
        Transaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    reversal_transaction = models.ForeignKey(
        Transaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    stripe_transfer_id = models.CharField(max_length=64, blank=True, default="")
    failure_reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount_nano__gt=0), name="ledger_payout_amount_positive"
            ),
            models.CheckConstraint(
                condition=Exact(Mod(F("amount_nano"), NANO_PER_CENT), 0),
                name="ledger_payout_whole_cents",
            ),
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in PayoutStatus]),
                name="ledger_payout_status",
            ),
            models.UniqueConstraint(
                fields=["publisher"],
                condition=Q(status__in=[s.value for s in OPEN_PAYOUT_STATUSES]),
                name="ledger_payout_one_open_per_publisher",
            ),
        ]

    def __str__(self) -> str:
        return f"Payout #{self.pk} {self.amount_cents / 100:.2f} USD ({self.status})"

    @property
    def amount_cents(self) -> int:
        return self.amount_nano // NANO_PER_CENT

    @property
    def stripe_idempotency_key(self) -> str:
        return f"payout-{self.pk}"


class PayoutEvent(models.Model):
    """Audit trail: every payout status change, who made it (NULL = the system) and when."""

    payout = models.ForeignKey(Payout, on_delete=models.PROTECT, related_name="events")
    from_status = models.CharField(max_length=16, blank=True, default="")
    to_status = models.CharField(max_length=16)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    note = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.from_status or '-'} -> {self.to_status}"


class StripeEvent(models.Model):
    """Each Stripe webhook event id is handled once (unique event_id)."""

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=120)
    received_at = models.DateTimeField(default=timezone.now)
    result = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.event_id} ({self.type})"
