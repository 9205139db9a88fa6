"""Admin for documents, licenses and loads (accounts are registered in kvmarket/admin.py)."""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from marketplace.models import Document, DocumentStatus, License, LicenseStatus, Load
from marketplace.services import documents as document_services
from marketplace.services import licenses as license_services
from marketplace.services.errors import MarketplaceError


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "publisher", "model_slug", "status", "listed", "n_tokens",
                    "price_per_load_nano", "created_at")
    list_filter = ("status", "listed", "model_slug")
    search_fields = ("title", "publisher__email", "artifact_key")
    raw_id_fields = ("publisher",)
    readonly_fields = ("artifact_key", "artifact_bytes", "n_tokens", "tokens_done", "tokens_total",
                       "verification", "precompute_seconds", "precompute_flops", "celery_task_id",
                       "precompute_attempts", "error", "error_code", "created_at", "updated_at",
                       "ready_at")
    actions = ["requeue_precompute"]

    @admin.action(description="Queue the precompute again (failed or stuck documents)")
    def requeue_precompute(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        count = 0
        for document in queryset.exclude(status=DocumentStatus.READY):
            Document.objects.filter(pk=document.pk).update(status=DocumentStatus.FAILED)
            document_services.queue_precompute(document=document)
            count += 1
        self.message_user(request, f"Queued {count} document(s).")


class LoadInline(admin.TabularInline):
    model = Load
    extra = 0
    can_delete = False
    fields = ("id", "kind", "status", "cached_tokens", "output_tokens", "amount_nano",
              "compute_nano", "egress_bytes", "created_at")
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(License)
class LicenseAdmin(admin.ModelAdmin):
    list_display = ("id", "agent", "document", "loads_used", "loads_total", "price_per_load_nano",
                    "status", "expires_at")
    list_filter = ("status",)
    search_fields = ("agent__email", "document__title")
    raw_id_fields = ("agent", "document")
    readonly_fields = ("loads_used", "price_per_load_nano", "idempotency_key", "created_at",
                       "updated_at", "closed_at")
    inlines = [LoadInline]
    actions = ["revoke"]

    @admin.action(description="Revoke and refund unused loads")
    def revoke(self, request: HttpRequest, queryset: QuerySet[License]) -> None:
        for license in queryset.filter(status=LicenseStatus.ACTIVE):
            try:
                license_services.revoke_license(license=license)
            except MarketplaceError as exc:
                self.message_user(request, f"License {license.pk}: {exc.message}", messages.ERROR)


@admin.register(Load)
class LoadAdmin(admin.ModelAdmin):
    list_display = ("id", "agent", "license", "kind", "status", "cached_tokens", "output_tokens",
                    "amount_nano", "compute_nano", "egress_bytes", "worker", "created_at")
    list_filter = ("status", "kind")
    search_fields = ("agent__email", "idempotency_key", "worker")
    raw_id_fields = ("agent", "license")

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return [f.name for f in Load._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
