"""Writes for documents: create, edit, unlist, queue and record precompute."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from ledger import services as ledger_services
from marketplace.models import Document, DocumentStatus, LicenseStatus, Role, User

log = logging.getLogger(__name__)

UPLOAD_EXTENSIONS = (".txt", ".md", ".markdown")
TITLE_MAX = 200


def model_choices() -> list[tuple[str, str]]:
    return [(slug, cfg.get("label", slug)) for slug, cfg in settings.KVMARKET_MODELS.items()]


def decode_upload(*, data: bytes, filename: str) -> str:
    """Text of an uploaded .txt/.md file; ValidationError on size, type or encoding problems."""
    if not filename.lower().endswith(UPLOAD_EXTENSIONS):
        raise ValidationError("Upload a .txt or .md file.", code="file_type")
    if len(data) > settings.DOCUMENT_MAX_UPLOAD_BYTES:
        raise ValidationError(
            f"The file is larger than {settings.DOCUMENT_MAX_UPLOAD_BYTES} bytes.", code="too_big"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"The file is not valid UTF-8 (byte {exc.start}): save it as UTF-8 and retry.",
            code="encoding",
        ) from exc
    return text


def _validate(*, title: str, text: str, model_slug: str, price_per_load_nano: int | None) -> None:
    errors: dict[str, str] = {}
    if not title.strip():
        errors["title"] = "A title is required."
    elif len(title) > TITLE_MAX:
        errors["title"] = f"At most {TITLE_MAX} characters."
    if not text.strip():
        errors["text"] = "The document is empty."
    elif len(text.encode()) > settings.DOCUMENT_MAX_UPLOAD_BYTES:
        errors["text"] = f"At most {settings.DOCUMENT_MAX_UPLOAD_BYTES} bytes."
    elif "\x00" in text:
        errors["text"] = "The text contains NUL characters."
    if model_slug not in settings.KVMARKET_MODELS:
        errors["model"] = f"Unknown model {model_slug!r}."
    if price_per_load_nano is not None and price_per_load_nano < 0:
        errors["price_per_load_nano"] = "The price cannot be negative."
    if errors:
        raise ValidationError(errors)


def _require_publisher(user: User) -> None:
    if user.role != Role.PUBLISHER:
        raise PermissionDenied("Only publishers can list documents.")


@transaction.atomic
def create_document(
    *,
    publisher: User,
    title: str,
    text: str,
    model_slug: str,
    price_per_load_nano: int | None = None,
    submit: bool = True,
) -> Document:
    """Create a document; with ``submit`` it is queued for precompute once the commit lands."""
    _require_publisher(publisher)
    _validate(
        title=title, text=text, model_slug=model_slug, price_per_load_nano=price_per_load_nano
    )
    document = Document.objects.create(
        publisher=publisher,
        title=title.strip(),
        text=text,
        model_slug=model_slug,
        price_per_load_nano=price_per_load_nano,
    )
    ledger_services.ensure_tariff(model_slug=model_slug)  # stored, so staff can edit it
    if submit:
        queue_precompute(document=document)
    return document


@transaction.atomic
def update_document(
    *,
    document: Document,
    publisher: User,
    title: str | None = None,
    price_per_load_nano: int | None = None,
    clear_price: bool = False,
) -> Document:
    """Edit title and price. The text and model are fixed once listed (they define the KV)."""
    document = _own_locked(document=document, publisher=publisher)
    if title is not None:
        _validate(
            title=title, text=document.text, model_slug=document.model_slug,
            price_per_load_nano=price_per_load_nano,
        )
        document.title = title.strip()
    if price_per_load_nano is not None:
        if price_per_load_nano < 0:
            raise ValidationError({"price_per_load_nano": "The price cannot be negative."})
        document.price_per_load_nano = price_per_load_nano
    elif clear_price:
        document.price_per_load_nano = None
    document.save(update_fields=["title", "price_per_load_nano", "updated_at"])
    return document


def _own_locked(*, document: Document, publisher: User) -> Document:
    locked = Document.objects.select_for_update().get(pk=document.pk)
    if locked.publisher_id != publisher.pk:
        raise Document.DoesNotExist("No such document.")
    return locked


@transaction.atomic
def queue_precompute(*, document: Document) -> Document:
    """Queue (or re-queue after a failure) the precompute on the model's GPU queue.

    A ready document is left alone; a document already queued or precomputing is not queued
    twice. The task is sent after the transaction commits so the worker sees the row.
    """
    document = Document.objects.select_for_update().get(pk=document.pk)
    busy = (DocumentStatus.READY, DocumentStatus.QUEUED, DocumentStatus.PRECOMPUTING)
    if document.status in busy:
        return document
    document.status = DocumentStatus.QUEUED
    document.error = ""
    document.error_code = ""
    document.tokens_done = 0
    document.save(update_fields=["status", "error", "error_code", "tokens_done", "updated_at"])

    def send() -> None:
        from marketplace.tasks import enqueue_precompute

        task_id = enqueue_precompute(document_id=document.pk, model_slug=document.model_slug)
        Document.objects.filter(pk=document.pk).update(celery_task_id=task_id)

    transaction.on_commit(send)
    return document


@transaction.atomic
def retry_precompute(*, document: Document, publisher: User) -> Document:
    document = _own_locked(document=document, publisher=publisher)
    if document.status != DocumentStatus.FAILED:
        raise ValidationError("Only a failed precompute can be retried.", code="not_failed")
    return queue_precompute(document=document)


@transaction.atomic
def unlist_document(*, document: Document, publisher: User) -> Document:
    """No new licenses; live licenses keep working until they expire (artifact is kept)."""
    document = _own_locked(document=document, publisher=publisher)
    if document.listed:
        document.listed = False
        document.unlisted_at = timezone.now()
        document.save(update_fields=["listed", "unlisted_at", "updated_at"])
    return document


@transaction.atomic
def relist_document(*, document: Document, publisher: User) -> Document:
    document = _own_locked(document=document, publisher=publisher)
    if not document.listed:
        document.listed = True
        document.unlisted_at = None
        document.save(update_fields=["listed", "unlisted_at", "updated_at"])
    if document.status in (DocumentStatus.DRAFT, DocumentStatus.FAILED):
        document = queue_precompute(document=document)
    return document


# --- Called by the precompute task (worker side) ---------------------------------------------


@transaction.atomic
def start_precompute(*, document_id: int, task_id: str) -> Document | None:
    """Mark the document precomputing. None when there is nothing to do (gone or ready)."""
    document = Document.objects.select_for_update().filter(pk=document_id).first()
    if document is None:
        return None
    if document.status == DocumentStatus.READY and document.artifact_key:
        return None
    document.status = DocumentStatus.PRECOMPUTING
    document.celery_task_id = task_id or document.celery_task_id
    document.precompute_attempts += 1
    document.error = ""
    document.error_code = ""
    document.save(
        update_fields=[
            "status", "celery_task_id", "precompute_attempts", "error", "error_code", "updated_at"
        ]
    )
    return document


def record_progress(*, document_id: int, tokens_done: int, tokens_total: int) -> None:
    """A single UPDATE (no lock): progress is advisory and written throttled by the task."""
    tokens_done = min(tokens_done, tokens_total)
    Document.objects.filter(pk=document_id, status=DocumentStatus.PRECOMPUTING).update(
        tokens_done=tokens_done, tokens_total=tokens_total, updated_at=timezone.now()
    )


@transaction.atomic
def record_precompute_success(*, document_id: int, result: dict[str, Any]) -> Document | None:
    document = Document.objects.select_for_update().filter(pk=document_id).first()
    if document is None:
        return None
    n_tokens = int(result["n_tokens"])
    document.status = DocumentStatus.READY
    document.artifact_key = result["key"]
    document.artifact_bytes = int(result["bytes"])
    document.n_tokens = n_tokens
    document.tokens_total = n_tokens
    document.tokens_done = n_tokens
    if not result.get("reused"):
        document.precompute_seconds = float(result["seconds"])
    document.precompute_flops = float(result.get("flops") or 0.0)
    document.verification = result.get("verification")
    document.error = ""
    document.error_code = ""
    document.ready_at = document.ready_at or timezone.now()
    document.save()
    return document


@transaction.atomic
def record_precompute_failure(*, document_id: int, code: str, message: str) -> Document | None:
    document = Document.objects.select_for_update().filter(pk=document_id).first()
    if document is None or document.status == DocumentStatus.READY:
        return document
    document.status = DocumentStatus.FAILED
    document.error_code = code[:64]
    document.error = message
    document.tokens_done = 0
    document.save(update_fields=["status", "error_code", "error", "tokens_done", "updated_at"])
    return document


def precompute_cancelled(*, document_id: int) -> bool:
    """The task stops when its document was deleted or is no longer being precomputed."""
    status = Document.objects.filter(pk=document_id).values_list("status", flat=True).first()
    return status != DocumentStatus.PRECOMPUTING


@transaction.atomic
def delete_document(*, document: Document, publisher: User) -> None:
    """Delete a document that never sold a license (otherwise unlist it)."""
    document = _own_locked(document=document, publisher=publisher)
    if document.licenses.exists():
        raise ValidationError(
            "This document has licenses; unlist it instead.", code="has_licenses"
        )
    key = document.artifact_key
    document.delete()
    if key and not Document.objects.filter(artifact_key=key).exists():
        transaction.on_commit(lambda: _delete_artifact_quietly(key))


def _delete_artifact_quietly(key: str) -> None:
    from marketplace import engine

    try:
        engine.delete_artifact(key)
    except Exception:  # noqa: BLE001 - a stale file is collected by collect_artifacts later
        log.warning("Could not delete artifact %s", key, exc_info=True)


def collect_artifacts() -> list[str]:
    """Delete artifacts of unlisted documents that no live license needs any more.

    An artifact shared by several documents (same text, same model) is kept while any of them
    is listed or has an active license.
    """
    from marketplace import engine

    now = timezone.now()
    needed = set(
        Document.objects.filter(listed=True).exclude(artifact_key="")
        .values_list("artifact_key", flat=True)
    ) | set(
        Document.objects.filter(
            licenses__status=LicenseStatus.ACTIVE, licenses__expires_at__gt=now
        ).exclude(artifact_key="").values_list("artifact_key", flat=True)
    )
    candidates = set(
        Document.objects.filter(listed=False).exclude(artifact_key="")
        .values_list("artifact_key", flat=True)
    )
    deleted = []
    for key in sorted(candidates - needed):
        try:
            engine.delete_artifact(key)
            deleted.append(key)
            # Relisting such a document precomputes it again (same content, same key).
            Document.objects.filter(artifact_key=key, listed=False).update(
                status=DocumentStatus.DRAFT, artifact_key="", artifact_bytes=None,
                tokens_done=0, updated_at=now,
            )
        except Exception:  # noqa: BLE001
            log.warning("Could not delete artifact %s", key, exc_info=True)
    return deleted
