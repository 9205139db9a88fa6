"""Ledger reads. Amounts are int nano-USD (1 USD = 10**9 nano-USD)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from ledger.accounts import SYSTEM_KEYS, escrow_key, payable_key, wallet_key
from ledger.models import (
    NANO_PER_USD,
    Account,
    AccountKind,
    Payout,
    Posting,
    Tariff,
    TransactionKind,
)


def _stored_balance(key: str) -> int:
    balance = Account.objects.filter(key=key).values_list("balance", flat=True).first()
    return balance or 0


def wallet_balance(agent) -> int:
    return _stored_balance(wallet_key(agent.pk))


def escrow_balance(license_ref: str) -> int:
    return _stored_balance(escrow_key(license_ref))


def payable_balance(publisher) -> int:
    """The sum of the payable's postings (a payable has no stored balance, see models.py)."""
    total = Posting.objects.filter(account__key=payable_key(publisher.pk)).aggregate(
        s=Sum("amount")
    )["s"]
    return total or 0


def postings_sum(account: Account) -> int:
    return account.postings.aggregate(s=Sum("amount"))["s"] or 0


def account_balance(account: Account) -> int:
    """The stored balance (wallet, escrow), else the sum of the account's postings."""
    return account.balance if account.balance is not None else postings_sum(account)


def system_balance(kind: AccountKind) -> int:
    """Balance of a platform account (platform revenue, compute revenue, Stripe clearing)."""
    account = Account.objects.filter(key=SYSTEM_KEYS[kind]).first()
    return postings_sum(account) if account else 0


def format_usd(amount_nano: int) -> str:
    """Exact decimal USD string with 9 decimals, e.g. 37740 -> "0.000037740"."""
    return f"{Decimal(amount_nano) / NANO_PER_USD:.9f}"


def wallet_history(agent, *, limit: int = 100) -> list[dict[str, Any]]:
    """The agent's wallet postings, newest first: transaction kind, signed amount, balance
    after the posting, memo, license, timestamp."""
    rows = (
        Posting.objects.filter(account__key=wallet_key(agent.pk))
        .select_related("transaction")
        .order_by("-id")[: max(1, min(limit, 1000))]
    )
    return [
        {
            "id": p.pk,
            "transaction_id": p.transaction_id,
            "kind": p.transaction.kind,
            "amount_nano": p.amount,
            "balance_after_nano": p.balance_after,
            "memo": p.transaction.memo,
            "license_ref": p.transaction.license_ref,
            "created_at": p.created_at,
        }
        for p in rows
    ]


def publisher_earnings(
    publisher, *, days: int = 30, document_ref: str | None = None
) -> dict[str, Any]:
    """Loads settled and nano-USD earned per UTC day over the last `days` days (every day is
    present, zeros included, oldest first), plus totals for the period and the current payable.

    Returns {"days": [{"date", "loads", "earned_nano"}], "totals": {"loads", "earned_nano"},
    "payable_nano": int}. `document_ref` narrows to one document's loads.
    """
    days = max(1, min(int(days), 366))
    today = timezone.now().astimezone(dt.UTC).date()
    start = today - dt.timedelta(days=days - 1)
    qs = Posting.objects.filter(
        account__key=payable_key(publisher.pk),
        transaction__kind=TransactionKind.LOAD_SETTLEMENT,
        created_at__gte=dt.datetime.combine(start, dt.time.min, tzinfo=dt.UTC),
    )
    if document_ref is not None:
        qs = qs.filter(transaction__document_ref=document_ref)
    per_day = {
        row["day"]: row
        for row in qs.annotate(day=TruncDate("created_at", tzinfo=dt.UTC))
        .values("day")
        .annotate(loads=Count("id"), earned=Sum("amount"))
    }
    out = []
    for i in range(days):
        day = start + dt.timedelta(days=i)
        row = per_day.get(day)
        out.append(
            {
                "date": day,
                "loads": row["loads"] if row else 0,
                "earned_nano": row["earned"] if row else 0,
            }
        )
    return {
        "days": out,
        "totals": {
            "loads": sum(d["loads"] for d in out),
            "earned_nano": sum(d["earned_nano"] for d in out),
        },
        "payable_nano": payable_balance(publisher),
    }


def payouts_of(publisher):
    return Payout.objects.filter(publisher=publisher).order_by("-id")


def tariff_for(model_slug: str) -> Tariff:
    """The model's tariff: the stored one (staff edit it in the admin), else an unsaved one
    from settings.KVMARKET_MODELS prices and the default multiplier and share (stored by
    services.ensure_tariff). Raises KeyError for a model that is neither stored nor registered.
    """
    tariff = Tariff.objects.filter(model_slug=model_slug).first()
    if tariff is not None:
        return tariff
    return default_tariff(model_slug)


def default_tariff(model_slug: str) -> Tariff:
    """The unsaved tariff of a model that has no stored one (see tariff_for)."""
    spec = settings.KVMARKET_MODELS.get(model_slug)
    if spec is None:
        raise KeyError(f"Unknown model {model_slug!r}")
    input_price = spec["input_price_usd_per_mtok"]
    return Tariff(
        model_slug=model_slug,
        input_price_usd_per_mtok=Decimal(str(input_price)),
        output_price_usd_per_mtok=Decimal(str(spec.get("output_price_usd_per_mtok", input_price))),
        cache_read_multiplier=Decimal(str(settings.DEFAULT_CACHE_READ_MULTIPLIER)),
        publisher_share=Decimal(str(settings.DEFAULT_PUBLISHER_SHARE)),
    )
