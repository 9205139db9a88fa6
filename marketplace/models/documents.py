"""Documents: a publisher's text, listed for one model, prefilled once into a hosted KV artifact."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class DocumentStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    QUEUED = "queued", "Queued"
    PRECOMPUTING = "precomputing", "Precomputing"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class PrecomputeStep(models.TextChoices):
    TOKENIZING = "tokenizing", "Tokenizing"
    PREFILLING = "prefilling", "Prefilling"
    VERIFYING = "verifying", "Writing and verifying"


class Document(models.Model):
    """A listed text. ``model_slug`` is a key of settings.KVMARKET_MODELS.

    ``price_per_load_nano`` is the publisher's override; when null the price is the tariff's
    cache-read price for ``n_tokens`` (see selectors.documents.price_per_load_nano).
    The KV artifact is content-addressed (``artifact_key``): the same text on the same model
    always yields the same key, so re-running the precompute never duplicates work or files.
    """

    publisher = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="documents"
    )
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    # Questions an agent could ask about the text (shown on the storefront), a list of strings.
    example_questions = models.JSONField(default=list, blank=True)
    text = models.TextField()
    model_slug = models.CharField(max_length=64)
    price_per_load_nano = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=DocumentStatus.choices, default=DocumentStatus.DRAFT
    )
    # The precompute's current step (PrecomputeStep) and when it started, for the estimate.
    progress_step = models.CharField(max_length=16, blank=True, default="")
    precompute_started_at = models.DateTimeField(null=True, blank=True)
    step_started_at = models.DateTimeField(null=True, blank=True)
    tokens_done = models.PositiveIntegerField(default=0)
    tokens_total = models.PositiveIntegerField(default=0)
    n_tokens = models.PositiveIntegerField(null=True, blank=True)
    artifact_key = models.CharField(max_length=64, blank=True, db_index=True)
    artifact_bytes = models.BigIntegerField(null=True, blank=True)
    precompute_seconds = models.FloatField(null=True, blank=True)
    precompute_flops = models.FloatField(null=True, blank=True)
    verification = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    listed = models.BooleanField(default=True)
    unlisted_at = models.DateTimeField(null=True, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    precompute_attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    ready_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "listed"], name="document_catalogue_idx")]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in DocumentStatus]),
                name="document_status_valid",
            ),
            models.CheckConstraint(
                condition=Q(price_per_load_nano__isnull=True) | Q(price_per_load_nano__gte=0),
                name="document_price_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(tokens_done__lte=F("tokens_total")),
                name="document_progress_within_total",
            ),
            models.CheckConstraint(
                condition=~Q(status=DocumentStatus.READY)
                | (Q(n_tokens__isnull=False) & ~Q(artifact_key="")),
                name="document_ready_has_artifact",
            ),
        ]

    def __str__(self) -> str:
        return self.title

    @property
    def is_available(self) -> bool:
        """Can agents buy new licenses for it?"""
        return self.listed and self.status == DocumentStatus.READY

    @property
    def progress_step_label(self) -> str:
        if self.progress_step in PrecomputeStep.values:
            return PrecomputeStep(self.progress_step).label
        return ""

    @property
    def progress_percent(self) -> int:
        if self.status == DocumentStatus.READY:
            return 100
        if not self.tokens_total:
            return 0
        return int(100 * self.tokens_done / self.tokens_total)
