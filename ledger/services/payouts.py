"""Publisher payouts: settlement runs, staff approval or rejection, Stripe Connect transfers,
reversals, and the publishers' Connect onboarding.

pending_review -> approved (payable -> Stripe clearing posted; transfer sent after commit)
  -> paid (transfer created, Stripe idempotency key "payout-<id>")
  -> failed (refused or reversed: clearing -> payable reversal posted)
pending_review -> rejected (nothing was posted).
"""

from __future__ import annotations

import logging

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Sum

from ledger import stripe_gateway
from ledger.accounts import payable_key
from ledger.errors import (
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    PaymentProviderError,
    PayoutStateError,
    SandboxDisabled,
)
from ledger.models import (
    NANO_PER_CENT,
    OPEN_PAYOUT_STATUSES,
    Account,
    AccountKind,
    ConnectAccount,
    Payout,
    PayoutEvent,
    PayoutStatus,
    Transaction,
    TransactionKind,
)
from ledger.services import journal

log = logging.getLogger(__name__)


def _payout_event(payout: Payout, from_status: str, actor, note: str = "") -> None:
    PayoutEvent.objects.create(
        payout=payout,
        from_status=from_status,
        to_status=payout.status,
        actor=actor if getattr(actor, "pk", None) else None,
        note=note,
    )


def _set_status(payout: Payout, status: PayoutStatus, actor, note: str = "", **fields) -> None:
    previous = payout.status
    payout.status = status
    for name, value in fields.items():
        setattr(payout, name, value)
    payout.save(update_fields=["status", "updated_at", *fields])
    _payout_event(payout, previous, actor, note)


def _locked_payout(payout: Payout | int) -> Payout:
    pk = payout.pk if isinstance(payout, Payout) else payout
    return Payout.objects.select_for_update(of=("self",)).select_related("publisher").get(pk=pk)


@transaction.atomic
def create_payout(
    *, publisher, amount_nano: int | None = None, actor=None, note: str = ""
) -> Payout:
    """A payout pending review, for whole cents of the publisher's payable (default: all of it,
    rounded down to a cent; the sub-cent remainder stays payable). Nothing is posted until
    approval; at most one open payout per publisher (a partial unique index)."""
    balance = journal.lock_balances([journal.payable(publisher.pk)]).get(
        payable_key(publisher.pk), 0
    )
    if amount_nano is None:
        amount_nano = balance - balance % NANO_PER_CENT
    journal.check_amount(amount_nano)
    if amount_nano % NANO_PER_CENT:
        raise InvalidAmount("Payouts are whole cents (multiples of 10,000,000 nano-USD).")
    if amount_nano > balance:
        raise InsufficientFunds(f"Payable is {balance} nano-USD; {amount_nano} requested.")
    if Payout.objects.filter(publisher=publisher, status__in=OPEN_PAYOUT_STATUSES).exists():
        raise PayoutStateError("This publisher already has an open payout.")
    payout = Payout.objects.create(publisher=publisher, amount_nano=amount_nano)
    _payout_event(payout, "", actor, note or "created")
    return payout


def create_due_payouts(*, threshold_nano: int | None = None) -> list[Payout]:
    """Settlement run: a payout (pending review) for every publisher whose payable is at least
    the threshold and who has no open payout. Each payout is its own transaction."""
    threshold = settings.PAYOUT_THRESHOLD_NANO_USD if threshold_nano is None else threshold_nano
    threshold = max(threshold, NANO_PER_CENT)
    due = (
        Account.objects.filter(kind=AccountKind.PUBLISHER_PAYABLE)
        .exclude(owner__payouts__status__in=OPEN_PAYOUT_STATUSES)
        .annotate(total=Sum("postings__amount"))  # a payable's balance: its postings' sum
        .filter(total__gte=threshold)
        .select_related("owner")
        .order_by("id")
    )
    created = []
    for account in due:
        try:
            created.append(create_payout(publisher=account.owner, note="settlement run"))
        except (PayoutStateError, IntegrityError):
            continue  # a concurrent run created it
    return created


def _move_payout(
    payout: Payout, *, kind: TransactionKind, to_clearing: bool, key: str, memo: str,
    details: dict | None = None,
) -> Transaction:
    """Post the payout's amount from the publisher's payable to Stripe clearing (a payout), or
    back (its reversal), once per payout under the key ``<key>:<payout id>``."""
    payable = journal.payable(payout.publisher_id)
    clearing = journal.system(AccountKind.STRIPE_CLEARING)
    amount = payout.amount_nano if to_clearing else -payout.amount_nano

    def decide(balances: dict[str, int]) -> journal.Entry:
        # the payable's floor is checked by the journal on the locked balance
        return journal.Entry(
            kind=kind, legs=[(payable, -amount), (clearing, amount)], memo=memo,
            details=details or {},
        )  # fmt: skip

    tx = journal.post_once(
        idempotency_key=f"{key}:{payout.pk}",
        fingerprint=journal.fingerprint(key.replace("-", "_"), payout=payout.pk,
                                        amount=payout.amount_nano),
        accounts=[payable],
        decide=decide,
    )  # fmt: skip
    assert tx is not None
    return tx


def approve_payout(*, payout: Payout | int, actor, send_transfer: bool = True) -> Payout:
    """pending_review -> approved: posts payable -> Stripe clearing, then sends the Stripe
    transfer (outside the database transaction). Called inside an outer transaction, the
    transfer is sent after that transaction commits."""
    with transaction.atomic():
        payout = _locked_payout(payout)
        if payout.status != PayoutStatus.PENDING_REVIEW:
            raise PayoutStateError(f"Payout #{payout.pk} is {payout.status}, not pending review.")
        tx = _move_payout(payout, kind=TransactionKind.PAYOUT, to_clearing=True,
                          key="payout", memo=f"Payout #{payout.pk}")
        _set_status(payout, PayoutStatus.APPROVED, actor, "approved", transaction=tx)
    if send_transfer:
        payout_id = payout.pk
        transaction.on_commit(lambda: _send_quietly(payout_id))
    return payout


def _send_quietly(payout_id: int) -> None:
    try:
        send_payout_transfer(payout_id=payout_id)
    except LedgerError as exc:  # left approved; the retry task or an admin sends it again
        log.warning("payout %s: transfer not sent: %s", payout_id, exc)


def send_payout_transfer(*, payout_id: int) -> Payout:
    """Send the Stripe transfer of an approved payout, at most once.

    The Stripe idempotency key is "payout-<id>", so a retry after a timeout or a crash (ours or
    the network's) never creates a second transfer; a payout already paid is not sent again.
    Transient Stripe errors leave the payout approved and raise PaymentProviderError (retry);
    a refusal (invalid request, e.g. no such destination) fails the payout and reverses it.
    """
    payout = Payout.objects.select_related("publisher").get(pk=payout_id)
    if payout.status != PayoutStatus.APPROVED:
        return payout
    connect = ConnectAccount.objects.filter(publisher_id=payout.publisher_id).first()
    if connect is None:
        return mark_payout_failed(
            payout=payout, reason="The publisher has no Stripe Connect account.", actor=None
        )
    try:
        transfer = stripe_gateway.create_transfer(
            amount_cents=payout.amount_cents,
            destination=connect.stripe_account_id,
            idempotency_key=payout.stripe_idempotency_key,
            payout_id=payout.pk,
        )
    except stripe.InvalidRequestError as exc:
        return mark_payout_failed(payout=payout, reason=f"Stripe refused: {exc}", actor=None)
    except stripe.StripeError as exc:
        raise PaymentProviderError(
            f"Stripe transfer for payout #{payout.pk} failed: {exc}"
        ) from exc
    with transaction.atomic():
        payout = _locked_payout(payout)
        if payout.status == PayoutStatus.APPROVED:
            _set_status(
                payout,
                PayoutStatus.PAID,
                None,
                f"transfer {transfer.id}",
                stripe_transfer_id=transfer.id,
            )
    return payout


@transaction.atomic
def reject_payout(*, payout: Payout | int, actor, note: str = "") -> Payout:
    """pending_review -> rejected. Nothing had been posted; the payable stays."""
    payout = _locked_payout(payout)
    if payout.status != PayoutStatus.PENDING_REVIEW:
        raise PayoutStateError(f"Payout #{payout.pk} is {payout.status}, not pending review.")
    _set_status(payout, PayoutStatus.REJECTED, actor, note or "rejected")
    return payout


@transaction.atomic
def mark_payout_failed(*, payout: Payout | int, reason: str, actor=None) -> Payout:
    """approved|paid -> failed: the transfer failed or was reversed. Posts the reversal
    (Stripe clearing -> payable), so the publisher's payable is whole again."""
    payout = _locked_payout(payout)
    if payout.status not in (PayoutStatus.APPROVED, PayoutStatus.PAID):
        raise PayoutStateError(f"Payout #{payout.pk} is {payout.status}; nothing to reverse.")
    tx = _move_payout(payout, kind=TransactionKind.PAYOUT_REVERSAL, to_clearing=False,
                      key="payout-reversal", memo=f"Reversal of payout #{payout.pk}",
                      details={"reason": reason[:500]})
    _set_status(
        payout,
        PayoutStatus.FAILED,
        actor,
        reason,
        reversal_transaction=tx,
        failure_reason=reason,
    )
    return payout


# --- Stripe Connect accounts -----------------------------------------------------------------


@transaction.atomic
def save_connect_account(*, publisher, stripe_account_id: str) -> ConnectAccount:
    connect, _ = ConnectAccount.objects.get_or_create(
        publisher=publisher, defaults={"stripe_account_id": stripe_account_id}
    )
    return connect


@transaction.atomic
def connect_sandbox_account(*, publisher) -> ConnectAccount:
    """Sandbox mode without Stripe: a simulated payout account, so payouts can be approved
    end to end (their transfers are simulated too; no money moves)."""
    if not stripe_gateway.sandbox():
        raise SandboxDisabled("Simulated payout accounts exist only in sandbox mode.")
    connect, _ = ConnectAccount.objects.get_or_create(
        publisher=publisher,
        defaults={"stripe_account_id": f"{stripe_gateway.SANDBOX_ACCOUNT_PREFIX}{publisher.pk}",
                  "payouts_enabled": True},
    )
    return connect


def connect_onboarding_link(*, publisher, return_url: str, refresh_url: str) -> str:
    """Create (once) the publisher's Connect Express account and return an onboarding link."""
    connect = ConnectAccount.objects.filter(publisher=publisher).first()
    if connect is None:
        account_id = stripe_gateway.create_connect_account(
            publisher_id=publisher.pk, email=publisher.email
        )
        connect = save_connect_account(publisher=publisher, stripe_account_id=account_id)
    return stripe_gateway.create_onboarding_link(
        account_id=connect.stripe_account_id, return_url=return_url, refresh_url=refresh_url
    )


def update_connect_account(*, stripe_account_id: str, payouts_enabled: bool) -> int:
    """Record whether Stripe lets the Connect account receive payouts; returns rows changed."""
    return ConnectAccount.objects.filter(stripe_account_id=stripe_account_id).update(
        payouts_enabled=payouts_enabled
    )
