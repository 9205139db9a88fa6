"""manage.py reconcile: check the books; exit 1 on any discrepancy.

1. Trial balance: all postings sum to zero (per currency).
2. Every transaction's postings sum to zero.
3. Every stored balance (wallet, escrow) equals the sum of its postings, and no bounded
   balance is negative (a payable's is the sum of its postings).
4. Stripe (unless --skip-stripe or Stripe is not configured): every Stripe transfer matches a
   paid payout (same id and amount) and every paid payout has its transfer; every paid wallet
   top-up Checkout Session was credited once with its amount, and every top-up credit has its
   session.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.db.models import Count, Sum

from ledger import stripe_gateway
from ledger.models import (
    NANO_PER_CENT,
    Account,
    AccountKind,
    Payout,
    PayoutStatus,
    Posting,
    Transaction,
)


class Command(BaseCommand):
    help = "Reconcile the ledger with itself and with Stripe; exit 1 on any discrepancy."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--skip-stripe", action="store_true", help="only the ledger checks")

    def handle(self, *args, **options) -> None:
        problems: list[str] = []
        problems += self._ledger_checks()
        if options["skip_stripe"]:
            self.stdout.write("Stripe: skipped (--skip-stripe)")
        elif not settings.STRIPE_SECRET_KEY:
            self.stdout.write("Stripe: skipped (STRIPE_SECRET_KEY is not set)")
        else:
            problems += self._stripe_checks()
        if problems:
            for line in problems:
                self.stderr.write(f"DISCREPANCY: {line}")
            raise CommandError(f"{len(problems)} discrepancy(ies) found.", returncode=1)
        self.stdout.write(self.style.SUCCESS("Ledger reconciled: no discrepancy."))

    def _ledger_checks(self) -> list[str]:
        problems = []
        trial = (
            Posting.objects.values("account__currency")
            .annotate(total=Sum("amount"))
            .exclude(total=0)
        )
        for row in trial:
            problems.append(
                f"trial balance in {row['account__currency']} is {row['total']}, not 0"
            )
        unbalanced = (
            Posting.objects.values("transaction_id").annotate(total=Sum("amount")).exclude(total=0)
        )
        for row in unbalanced[:100]:
            problems.append(f"transaction {row['transaction_id']} sums to {row['total']}")
        with connection.cursor() as cur:
            cur.execute(
                "SELECT a.key, a.balance, COALESCE(SUM(p.amount), 0) FROM ledger_account a"
                " LEFT JOIN ledger_posting p ON p.account_id = a.id"
                " WHERE a.balance IS NOT NULL GROUP BY a.id, a.key, a.balance"
                " HAVING a.balance <> COALESCE(SUM(p.amount), 0)"
            )
            for key, balance, total in cur.fetchall():
                problems.append(f"account {key}: balance {balance} != sum of postings {total}")
        for account in Account.objects.filter(balance__lt=0):
            problems.append(f"account {account.key} is negative: {account.balance}")
        negative_payables = (
            Account.objects.filter(kind=AccountKind.PUBLISHER_PAYABLE)
            .annotate(total=Sum("postings__amount"))
            .filter(total__lt=0)
        )
        for account in negative_payables:
            problems.append(f"account {account.key} is negative: {account.total}")
        n_tx = Transaction.objects.count()
        n_postings = Posting.objects.count()
        self.stdout.write(f"Ledger: {n_tx} transactions, {n_postings} postings checked")
        return problems

    def _stripe_checks(self) -> list[str]:
        problems = []
        transfers = {t["id"]: t for t in stripe_gateway.list_transfers()}
        paid = {
            p.stripe_transfer_id: p
            for p in Payout.objects.filter(status=PayoutStatus.PAID).exclude(stripe_transfer_id="")
        }
        failed = set(
            Payout.objects.filter(status=PayoutStatus.FAILED).values_list(
                "stripe_transfer_id", flat=True
            )
        )
        for payout in Payout.objects.filter(status=PayoutStatus.PAID, stripe_transfer_id=""):
            problems.append(f"payout {payout.pk} is paid but has no transfer id")
        for tid, transfer in transfers.items():
            payout = paid.get(tid)
            if payout is None:
                if transfer.get("reversed") and tid in failed:
                    continue  # reversed at Stripe, reversed in the ledger
                problems.append(
                    f"Stripe transfer {tid} ({transfer['amount']} cents) has no paid payout"
                )
            elif payout.amount_cents != transfer["amount"]:
                problems.append(
                    f"transfer {tid}: Stripe {transfer['amount']} cents, payout "
                    f"{payout.pk} {payout.amount_cents} cents"
                )
        for tid, payout in paid.items():
            if tid not in transfers:
                problems.append(f"payout {payout.pk}: transfer {tid} not found at Stripe")

        sessions = {s["id"]: s for s in stripe_gateway.list_paid_checkout_sessions()}
        credits = {
            row["external_ref"]: row
            for row in Transaction.objects.filter(kind="topup")
            .values("external_ref")
            .annotate(n=Count("id"))
        }
        topup_amounts = {
            row["transaction__external_ref"]: row["amount"]
            for row in Posting.objects.filter(
                transaction__kind="topup", account__kind="agent_wallet"
            )
            .values("transaction__external_ref")
            .annotate(amount=Sum("amount"))
        }
        for sid, session in sessions.items():
            if sid not in credits:
                problems.append(f"paid checkout session {sid} was never credited")
                continue
            if credits[sid]["n"] != 1:
                problems.append(f"checkout session {sid} credited {credits[sid]['n']} times")
            expected = session["amount_total"] * NANO_PER_CENT
            if topup_amounts.get(sid) != expected:
                problems.append(
                    f"checkout session {sid}: Stripe {session['amount_total']} cents, credited "
                    f"{topup_amounts.get(sid)} nano-USD"
                )
        for ref in credits:
            if ref not in sessions:
                problems.append(f"top-up credit {ref!r} has no paid Stripe checkout session")
        self.stdout.write(
            f"Stripe: {len(transfers)} transfers, {len(sessions)} paid top-up sessions checked"
        )
        return problems
