"""Metering: license purchases into escrow, load settlements, KV egress, escrow refunds.

All amounts are int nano-USD; every call is one idempotent transaction (see journal.py).
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal

from ledger.accounts import escrow_key
from ledger.errors import LedgerError
from ledger.models import Account, AccountKind, Transaction, TransactionKind
from ledger.services import journal
from ledger.services.journal import Entry


def purchase_license(
    *, agent, license_ref: str, amount_nano: int, idempotency_key: str, document_ref: str = ""
) -> Transaction:
    """Agent wallet -> escrow(license_ref). Raises InsufficientFunds (API: 402).

    A zero price (a free license) records a transaction with no postings and opens the escrow.
    """
    journal.check_amount(amount_nano, allow_zero=True)
    if not license_ref:
        raise LedgerError("license_ref is required.")
    return journal.transfer(
        source=journal.wallet(agent.pk),
        dest=journal.escrow(license_ref, agent.pk),
        amount_nano=amount_nano,
        kind=TransactionKind.LICENSE_PURCHASE,
        idempotency_key=idempotency_key,
        fingerprint=journal.fingerprint(
            "purchase", agent=agent.pk, license=license_ref, amount=amount_nano
        ),
        memo=f"License {license_ref}",
        license_ref=license_ref,
        document_ref=document_ref,
    )


def split_amount(amount_nano: int, publisher_share: Decimal) -> tuple[int, int]:
    """(publisher, platform): publisher = floor(amount x share), platform = the remainder."""
    share = Decimal(str(publisher_share))
    if not Decimal(0) <= share <= Decimal(1):
        raise LedgerError("publisher_share must be between 0 and 1.")
    publisher = int((share * amount_nano).to_integral_value(rounding=ROUND_FLOOR))
    return publisher, amount_nano - publisher


def _license_buyer_id(license_ref: str) -> int | None:
    return (
        Account.objects.filter(key=escrow_key(license_ref))
        .values_list("owner_id", flat=True)
        .first()
    )


def settle_load(
    *,
    license_ref: str,
    publisher,
    amount_nano: int,
    publisher_share: Decimal,
    idempotency_key: str,
    agent=None,
    compute_nano: int = 0,
    memo: str = "",
    document_ref: str = "",
) -> Transaction:
    """Meter one served load, in ONE transaction:

    - escrow(license_ref) -> publisher payable (floor(amount x share)) + platform revenue (the
      remainder); raises InsufficientFunds when the escrow cannot pay `amount_nano`;
    - if compute_nano > 0: agent wallet -> platform compute revenue. The compute charge is
      CAPPED at the wallet balance, so a load that was served always settles; what could not be
      charged is recorded in `details["compute_uncharged_nano"]`. `agent` defaults to the
      license's owner (the agent who bought the escrow).
    """
    journal.check_amount(amount_nano, allow_zero=True)
    journal.check_amount(compute_nano, allow_zero=True)
    publisher_nano, platform_nano = split_amount(amount_nano, publisher_share)
    agent_id = getattr(agent, "pk", None)
    fingerprint = journal.fingerprint(
        "settle",
        license=license_ref,
        publisher=publisher.pk,
        amount=amount_nano,
        share=str(publisher_share),
        agent=agent_id,
        compute=compute_nano,
    )
    escrow = journal.escrow(license_ref, None, create=False)
    legs = [
        (escrow, -amount_nano),  # a missing or short escrow: InsufficientFunds
        (journal.payable(publisher.pk), publisher_nano),
        (journal.system(AccountKind.PLATFORM_REVENUE), platform_nano),
    ]

    def entry(charged: int) -> Entry:
        compute_legs = []
        if charged:
            compute_legs = [
                (journal.wallet(buyer_id), -charged),
                (journal.system(AccountKind.PLATFORM_COMPUTE_REVENUE), charged),
            ]
        return Entry(
            kind=TransactionKind.LOAD_SETTLEMENT,
            legs=legs + compute_legs,
            memo=memo or f"Load of {license_ref}",
            license_ref=license_ref,
            document_ref=document_ref,
            details={
                "publisher_id": publisher.pk,
                "publisher_nano": publisher_nano,
                "platform_nano": platform_nano,
                "publisher_share": str(publisher_share),
                "compute_requested_nano": compute_nano,
                "compute_charged_nano": charged,
                "compute_uncharged_nano": compute_nano - charged,
            },
        )

    buyer_id = agent_id
    if compute_nano > 0 and buyer_id is None:  # default: the agent who bought the license
        buyer_id = _license_buyer_id(license_ref)
    if compute_nano == 0 or buyer_id is None:
        # nothing depends on a balance: no read, one round trip
        return journal.post(
            idempotency_key=idempotency_key, fingerprint=fingerprint, entry=entry(0)
        )
    wallet = journal.wallet(buyer_id)

    def decide(balances: dict[str, int]) -> Entry:
        # the compute cap: charge at most what the wallet holds, so a served load settles
        return entry(min(compute_nano, balances.get(wallet.key, 0)))

    # the escrow is locked with the wallet: every path locks accounts in key order
    tx = journal.post_once(
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        accounts=[escrow, wallet],
        decide=decide,
    )
    assert tx is not None
    return tx


def record_egress(
    *,
    agent,
    amount_nano: int,
    idempotency_key: str,
    memo: str = "",
    license_ref: str = "",
    document_ref: str = "",
) -> Transaction:
    """Agent wallet -> platform revenue for KV shipping bytes. Raises InsufficientFunds."""
    journal.check_amount(amount_nano, allow_zero=True)
    return journal.transfer(
        source=journal.wallet(agent.pk),
        dest=journal.system(AccountKind.PLATFORM_REVENUE),
        amount_nano=amount_nano,
        kind=TransactionKind.EGRESS,
        idempotency_key=idempotency_key,
        fingerprint=journal.fingerprint(
            "egress", agent=agent.pk, amount=amount_nano, license=license_ref
        ),
        memo=memo or "KV egress",
        license_ref=license_ref,
        document_ref=document_ref,
    )


def refund_escrow(*, license_ref: str, agent, idempotency_key: str) -> Transaction | None:
    """All remaining escrow of the license -> the agent's wallet (license expired or revoked).

    Returns None (and posts nothing) when there is nothing to refund.
    """
    fingerprint = journal.fingerprint("refund", license=license_ref, agent=agent.pk)
    escrow = journal.escrow(license_ref, agent.pk, create=False)
    wallet = journal.wallet(agent.pk)

    def decide(balances: dict[str, int]) -> Entry | None:
        remaining = balances.get(escrow.key, 0)
        if remaining == 0:
            return None
        return Entry(
            kind=TransactionKind.ESCROW_REFUND,
            legs=[(escrow, -remaining), (wallet, remaining)],
            memo=f"Refund of license {license_ref}",
            license_ref=license_ref,
        )

    return journal.post_once(
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        accounts=[escrow, wallet],
        decide=decide,
    )
