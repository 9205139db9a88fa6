"""Django admin: tariffs are editable by staff; the journal is read-only; payouts are reviewed
(approve / reject, bulk) with every status change recorded in PayoutEvent (who, when)."""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from ledger import selectors, services
from ledger.errors import LedgerError
from ledger.models import (
    Account,
    ConnectAccount,
    Payout,
    PayoutEvent,
    PayoutStatus,
    Posting,
    StripeEvent,
    Tariff,
    TopUp,
    Transaction,
)
from ledger.money import usd_amount


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Tariff)
class TariffAdmin(admin.ModelAdmin):
    list_display = [
        "model_slug",
        "input_price_usd_per_mtok",
        "output_price_usd_per_mtok",
        "cache_read_multiplier",
        "publisher_share",
        "updated_at",
    ]
    search_fields = ["model_slug"]
    readonly_fields = ["updated_at"]

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ["key", "kind", "owner", "license_ref", "balance_display", "created_at"]
    list_filter = ["kind"]
    search_fields = ["key", "owner__email", "license_ref"]

    @admin.display(description="balance")
    def balance_display(self, obj: Account) -> str:
        return usd_amount(selectors.account_balance(obj))


@admin.display(description="amount")
def posting_amount(obj: Posting) -> str:
    return usd_amount(obj.amount)


@admin.display(description="balance after")
def posting_balance_after(obj: Posting) -> str:
    return usd_amount(obj.balance_after)


class PostingInline(ReadOnlyInline):
    model = Posting
    fields = ["account", posting_amount, posting_balance_after, "created_at"]
    readonly_fields = fields


@admin.register(Transaction)
class TransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "idempotency_key", "license_ref", "memo", "created_at"]
    list_filter = ["kind", "created_at"]
    search_fields = ["idempotency_key", "license_ref", "external_ref", "memo"]
    date_hierarchy = "created_at"
    inlines = [PostingInline]


@admin.register(Posting)
class PostingAdmin(ReadOnlyAdmin):
    list_display = [
        "id", "transaction", "account", posting_amount, posting_balance_after, "created_at"
    ]
    list_filter = ["account__kind"]
    search_fields = ["account__key", "transaction__idempotency_key"]
    list_select_related = ["transaction", "account"]


class PayoutEventInline(ReadOnlyInline):
    model = PayoutEvent
    fields = ["created_at", "from_status", "to_status", "actor", "note"]
    readonly_fields = fields


@admin.register(Payout)
class PayoutAdmin(admin.ModelAdmin):
    list_display = [
        "id", "publisher", "amount_usd", "status", "stripe_transfer_id", "created_at", "updated_at"
    ]
    list_filter = ["status", "created_at"]
    search_fields = ["publisher__email", "stripe_transfer_id"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "publisher", "amount_usd", "status", "transaction", "reversal_transaction",
        "stripe_transfer_id", "failure_reason", "created_at", "updated_at",
    ]
    inlines = [PayoutEventInline]
    actions = ["approve_selected", "reject_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    @admin.display(description="amount", ordering="amount_nano")
    def amount_usd(self, obj: Payout) -> str:
        return usd_amount(obj.amount_nano)

    def _apply(self, request: HttpRequest, queryset: QuerySet, verb: str, fn) -> list[int]:
        done, failed = [], []
        for payout in queryset.order_by("id"):
            try:
                fn(payout=payout, actor=request.user)
                done.append(payout.pk)
            except LedgerError as exc:
                failed.append(f"#{payout.pk}: {exc.message}")
        if done:
            self.message_user(request, f"{verb} {len(done)} payout(s).", messages.SUCCESS)
        for line in failed:
            self.message_user(request, line, messages.ERROR)
        return done

    @admin.action(description="Approve selected payouts (sends the Stripe transfer)")
    def approve_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        """One message per payout saying what happened to its money (the operations console
        /ops/ does the same one payout at a time)."""
        connected = set(ConnectAccount.objects.values_list("publisher_id", flat=True))
        for payout in queryset.order_by("id"):
            amount = usd_amount(payout.amount_nano)
            if payout.publisher_id not in connected:
                self.message_user(request, f"#{payout.pk} not approved: the publisher has no "
                                           "Stripe account to send it to.", messages.ERROR)
                continue
            try:
                services.approve_payout(payout=payout, actor=request.user,
                                        send_transfer=False)
                payout = services.send_payout_transfer(payout_id=payout.pk)
            except LedgerError as exc:
                payout.refresh_from_db()
                if payout.status != PayoutStatus.APPROVED:
                    self.message_user(request, f"#{payout.pk} not approved: {exc.message}",
                                      messages.ERROR)
                    continue
            if payout.status == PayoutStatus.PAID:
                self.message_user(request, f"#{payout.pk} approved: {amount} sent "
                                           f"({payout.stripe_transfer_id}).", messages.SUCCESS)
            elif payout.status == PayoutStatus.FAILED:
                self.message_user(request, f"#{payout.pk} could not be sent: "
                                           f"{payout.failure_reason} The amount is payable "
                                           "again.", messages.ERROR)
            else:
                self.message_user(request, f"#{payout.pk} approved; the transfer is not sent "
                                           "yet (retry it in /ops/).", messages.WARNING)

    @admin.action(description="Reject selected payouts")
    def reject_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._apply(request, queryset, "Rejected", services.reject_payout)


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "type", "received_at", "result"]
    list_filter = ["type"]
    search_fields = ["event_id"]


@admin.register(TopUp)
class TopUpAdmin(ReadOnlyAdmin):
    list_display = ["session_id", "agent", "amount_cents", "status", "created_at", "paid_at"]
    list_filter = ["status"]
    search_fields = ["session_id", "agent__email"]


@admin.register(ConnectAccount)
class ConnectAccountAdmin(ReadOnlyAdmin):
    list_display = ["publisher", "stripe_account_id", "payouts_enabled", "created_at"]
    search_fields = ["publisher__email", "stripe_account_id"]
