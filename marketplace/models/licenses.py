"""Licenses (an agent's pack of N loads of one document) and Loads (one metered use)."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from marketplace.models.documents import Document


class LicenseStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    EXHAUSTED = "exhausted", "Exhausted"
    EXPIRED = "expired", "Expired"
    REVOKED = "revoked", "Revoked"


class License(models.Model):
    """A pack of loads, paid up front into escrow (ledger account ``license:<id>``).

    ``loads_used`` counts loads reserved or consumed: a load is reserved (loads_used + 1) before
    it is dispatched and released again if it fails or times out, so concurrent requests can
    never use more loads than were bought. The database enforces 0 <= loads_used <= loads_total.
    """

    agent = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="licenses"
    )
    document = models.ForeignKey(Document, on_delete=models.PROTECT, related_name="licenses")
    loads_total = models.PositiveIntegerField()
    loads_used = models.PositiveIntegerField(default=0)
    price_per_load_nano = models.BigIntegerField()
    status = models.CharField(
        max_length=16, choices=LicenseStatus.choices, default=LicenseStatus.ACTIVE
    )
    expires_at = models.DateTimeField()
    # NULL (not "") when absent, so the per-agent unique constraint ignores keyless purchases.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(loads_used__gte=0), name="license_used_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(loads_used__lte=F("loads_total")), name="license_used_within_total"
            ),
            models.CheckConstraint(condition=Q(loads_total__gt=0), name="license_total_positive"),
            models.CheckConstraint(
                condition=Q(price_per_load_nano__gte=0), name="license_price_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in LicenseStatus]),
                name="license_status_valid",
            ),
            models.UniqueConstraint(
                fields=["agent", "idempotency_key"], name="license_idempotency_key_unique_per_agent"
            ),
        ]

    def __str__(self) -> str:
        return f"License {self.pk} ({self.loads_used}/{self.loads_total} of {self.document_id})"

    @property
    def ledger_ref(self) -> str:
        return f"license:{self.pk}"

    @property
    def loads_left(self) -> int:
        return self.loads_total - self.loads_used

    @property
    def is_expired(self) -> bool:
        return self.expires_at <= timezone.now()

    @property
    def is_live(self) -> bool:
        """Still usable: active and not past its expiry (may be exhausted by reservations)."""
        return self.status == LicenseStatus.ACTIVE and not self.is_expired


class LoadStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    # Served (the worker produced tokens for the agent), its result recorded, not yet charged:
    # the outbox the charge is made from, by the request or else by the sweep.
    SERVED = "served", "Served, charge pending"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class LoadKind(models.TextChoices):
    CHAT = "chat", "Chat completion"
    COMPLETION = "completion", "Completion"
    KV_DOWNLOAD = "kv_download", "KV download"


class Load(models.Model):
    """One use of a license. Charged (ledger idempotency key ``load:<id>``) only on success.

    ``idempotency_key`` is the client's Idempotency-Key header (or a generated one), unique per
    agent; ``request_hash`` detects a reused key with a different request body. ``response``
    keeps the first successful response so a retry returns it verbatim without a new charge.
    """

    license = models.ForeignKey(License, on_delete=models.PROTECT, related_name="loads")
    agent = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="loads"
    )
    idempotency_key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64)
    kind = models.CharField(max_length=16, choices=LoadKind.choices)
    status = models.CharField(max_length=16, choices=LoadStatus.choices, default=LoadStatus.PENDING)
    attempts = models.PositiveIntegerField(default=1)
    cached_tokens = models.PositiveIntegerField(default=0)
    suffix_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    load_seconds = models.FloatField(null=True, blank=True)
    ttft_seconds = models.FloatField(null=True, blank=True)
    total_seconds = models.FloatField(null=True, blank=True)
    wall_seconds = models.FloatField(null=True, blank=True)
    # The KV store tier that served the load ("gpu", "host", "disk", "s3"), for the economics.
    cache_tier = models.CharField(max_length=8, blank=True, default="")
    amount_nano = models.BigIntegerField(default=0)
    compute_nano = models.BigIntegerField(default=0)
    egress_nano = models.BigIntegerField(default=0)
    egress_bytes = models.BigIntegerField(default=0)
    worker = models.CharField(max_length=255, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    response = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Touched while a web process works on the load; a stale one was abandoned (the sweep
    # releases a pending load's reservation and charges a served one).
    heartbeat_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["agent", "idempotency_key"], name="load_idempotency_key_unique_per_agent"
            ),
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in LoadStatus]), name="load_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(kind__in=[k.value for k in LoadKind]), name="load_kind_valid"
            ),
            models.CheckConstraint(
                condition=Q(amount_nano__gte=0) & Q(compute_nano__gte=0) & Q(egress_nano__gte=0),
                name="load_amounts_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(status=LoadStatus.SUCCEEDED)
                | (Q(amount_nano=0) & Q(compute_nano=0) & Q(egress_nano=0)),
                name="load_only_success_charged",
            ),
        ]
        indexes = [models.Index(fields=["license", "status"], name="load_license_status_idx")]

    def __str__(self) -> str:
        return f"Load {self.pk} ({self.kind}, {self.status})"

    @property
    def ledger_idempotency_key(self) -> str:
        return f"load:{self.pk}"
