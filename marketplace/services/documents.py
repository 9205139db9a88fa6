"""Writes for documents: create, edit, unlist, queue and record precompute."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Case, F, When
from django.utils import timezone

from ledger import services as ledger_services
from marketplace.models import (
    Document,
    DocumentStatus,
    LicenseStatus,
    PrecomputeStep,
    Role,
    User,
)

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
    elif problem := _model_unavailable(model_slug):
        errors["model"] = problem
    if price_per_load_nano is not None and price_per_load_nano < 0:
        errors["price_per_load_nano"] = "The price cannot be negative."
    if errors:
        raise ValidationError(errors)


def _model_unavailable(model_slug: str) -> str | None:
    """Why the registry's model cannot be loaded on this server (e.g. a Hugging Face id that is
    not downloaded, a GGUF package not installed), or None. Checks files only: no loading."""
    from inference.errors import ModelNotFound
    from inference.models import locate_model

    try:
        locate_model(settings.KVMARKET_MODELS[model_slug].get("ref", ""))
    except ModelNotFound as exc:
        return f"Model {model_slug!r} is not available on this server: {exc.message}"
    return None


def _check_context(*, text: str, model_slug: str) -> int | None:
    """The document's token count as the cached prefix; ValidationError when it leaves the
    model no room to answer. None when this process cannot load the model's tokenizer (the
    worker still refuses a document that is too long, with document_too_long)."""
    from marketplace import engine

    counter = engine.token_counter(model_slug)
    if counter is None:
        return None
    try:
        n_tokens = counter.document_tokens(text)
    except (ValueError, UnicodeError) as exc:
        raise ValidationError({"text": f"The tokenizer cannot take this text: {exc}"}) from exc
    if n_tokens >= counter.max_context:
        raise ValidationError(
            {
                "text": (
                    f"The document is {n_tokens} tokens; the model {model_slug} has a "
                    f"{counter.max_context}-token context, so it must be under "
                    f"{counter.max_context} tokens."
                )
            }
        )
    return n_tokens


DESCRIPTION_MAX = 2000


def _clean_description(description: str) -> str:
    description = (description or "").strip()
    if len(description) > DESCRIPTION_MAX:
        raise ValidationError({"description": f"At most {DESCRIPTION_MAX} characters."})
    return description


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
    description: str = "",
    example_questions: list[str] | None = None,
) -> Document:
    """Create a document; with ``submit`` it is queued for precompute once the commit lands."""
    _require_publisher(publisher)
    _validate(
        title=title, text=text, model_slug=model_slug, price_per_load_nano=price_per_load_nano
    )
    _check_context(text=text, model_slug=model_slug)
    document = Document.objects.create(
        publisher=publisher,
        title=title.strip(),
        text=text,
        model_slug=model_slug,
        price_per_load_nano=price_per_load_nano,
        description=_clean_description(description),
        example_questions=_clean_questions(example_questions),
    )
    ledger_services.ensure_tariff(model_slug=model_slug)  # stored, so staff can edit it
    if submit:
        queue_precompute(document=document)
    return document


def _clean_questions(questions: list[str] | None) -> list[str]:
    return [q.strip() for q in questions or [] if q.strip()]


@transaction.atomic
def set_example_questions(*, document: Document, questions: list[str]) -> Document:
    """Replace the document's example questions (shown with it; they do not change the KV)."""
    document = Document.objects.select_for_update().get(pk=document.pk)
    document.example_questions = _clean_questions(questions)
    document.save(update_fields=["example_questions", "updated_at"])
    return document


@transaction.atomic
def update_document(
    *,
    document: Document,
    publisher: User,
    title: str | None = None,
    description: str | None = None,
    price_per_load_nano: int | None = None,
    clear_price: bool = False,
) -> Document:
    """Edit title, description and price. The text and model are fixed once listed (they
    define the KV). A new price applies to licenses bought from now on (a license keeps the
    price it was bought at)."""
    document = _own_locked(document=document, publisher=publisher)
    if title is not None:
        _validate(
            title=title, text=document.text, model_slug=document.model_slug,
            price_per_load_nano=price_per_load_nano,
        )
        document.title = title.strip()
    if description is not None:
        document.description = _clean_description(description)
    if price_per_load_nano is not None:
        if price_per_load_nano < 0:
            raise ValidationError({"price_per_load_nano": "The price cannot be negative."})
        document.price_per_load_nano = price_per_load_nano
    elif clear_price:
        document.price_per_load_nano = None
    document.save(update_fields=["title", "description", "price_per_load_nano", "updated_at"])
    return document


def _own_locked(*, document: Document, publisher: User) -> Document:
    locked = Document.objects.select_for_update().get(pk=document.pk)
    if locked.publisher_id != publisher.pk:
        raise Document.DoesNotExist("No such document.")
    return locked


def _stale_before() -> datetime:
    return timezone.now() - timedelta(seconds=settings.PRECOMPUTE_STALE_SECONDS)


def precompute_stalled(document: Document) -> bool:
    """A precompute whose worker stopped beating: its worker died (or hangs).

    A running precompute touches the document's ``updated_at`` every
    PRECOMPUTE_HEARTBEAT_SECONDS (marketplace.tasks), so one untouched for
    PRECOMPUTE_STALE_SECONDS has lost its worker.
    """
    return document.status == DocumentStatus.PRECOMPUTING and document.updated_at < _stale_before()


@transaction.atomic
def queue_precompute(*, document: Document) -> Document:
    """Queue (or re-queue after a failure or a lost worker) the precompute on the model's GPU
    queue.

    A ready document is left alone; a document already queued or precomputing (with a live
    worker) is not queued twice. The task is sent after the transaction commits so the worker
    sees the row. A broker that is down at that moment fails nothing: the document stays
    queued without a task id, and recover_stalled_precomputes sends it once the broker is back.
    """
    document = Document.objects.select_for_update().get(pk=document.pk)
    if document.status in (DocumentStatus.READY, DocumentStatus.QUEUED) or (
        document.status == DocumentStatus.PRECOMPUTING and not precompute_stalled(document)
    ):
        return document
    document.status = DocumentStatus.QUEUED
    document.error = ""
    document.error_code = ""
    document.tokens_done = 0
    document.celery_task_id = ""
    document.save(
        update_fields=[
            "status", "error", "error_code", "tokens_done", "celery_task_id", "updated_at"
        ]
    )
    transaction.on_commit(lambda: _send_precompute(document_id=document.pk,
                                                   model_slug=document.model_slug))
    return document


def _send_precompute(*, document_id: int, model_slug: str) -> None:
    from marketplace.tasks import enqueue_precompute

    try:
        task_id = enqueue_precompute(document_id=document_id, model_slug=model_slug)
    except Exception as exc:  # noqa: BLE001 - the broker's connection errors, whatever transport
        log.warning("Precompute of document %s not sent (%s: %s); it is sent again when "
                    "the broker answers", document_id, type(exc).__name__, exc)
        return
    Document.objects.filter(pk=document_id, status=DocumentStatus.QUEUED).update(
        celery_task_id=task_id
    )


def recover_stalled_precomputes() -> dict[str, list[int]]:
    """Find precomputes that lost their worker and queue them again (or fail them).

    Run every PRECOMPUTE_SWEEP_SECONDS by beat. A precompute stalled (no heartbeat for
    PRECOMPUTE_STALE_SECONDS) is queued again while it has had fewer than
    PRECOMPUTE_MAX_ATTEMPTS attempts, else marked failed (``worker_lost``; the retry button and
    API queue it again). The next attempt adopts an artifact the dead worker had already
    written, once its hash checks out. A queued document whose task was never sent (the broker
    was down) is sent now.
    """
    stale_before = _stale_before()
    requeued: list[int] = []
    failed: list[int] = []
    stalled = list(
        Document.objects.filter(status=DocumentStatus.PRECOMPUTING, updated_at__lt=stale_before)
        .values_list("pk", flat=True)
    )
    for document_id in stalled:
        with transaction.atomic():
            document = (
                Document.objects.select_for_update(skip_locked=True)
                .filter(pk=document_id).first()
            )
            if document is None or not precompute_stalled(document):
                continue  # taken by someone else, or it beat again meanwhile
            if document.precompute_attempts >= settings.PRECOMPUTE_MAX_ATTEMPTS:
                record_precompute_failure(
                    document_id=document_id, code="worker_lost",
                    message=(
                        f"The worker stopped responding during {document.precompute_attempts} "
                        "attempts; retry the precompute."
                    ),
                )
                failed.append(document_id)
            else:
                log.warning("Precompute of document %s lost its worker (attempt %s); queued "
                            "again", document_id, document.precompute_attempts)
                queue_precompute(document=document)
                requeued.append(document_id)
    unsent = Document.objects.filter(
        status=DocumentStatus.QUEUED, celery_task_id="", updated_at__lt=stale_before
    ).values_list("pk", "model_slug")
    for document_id, model_slug in unsent:
        _send_precompute(document_id=document_id, model_slug=model_slug)
        requeued.append(document_id)
    return {"requeued": requeued, "failed": failed}


def precompute_alive_elsewhere(*, document_id: int) -> bool:
    """Whether another worker is precomputing this document right now.

    Asked by a precompute task before it starts. A document precomputing with a fresh
    heartbeat is either run by a live worker (a duplicate delivery: the broker's visibility
    timeout ran out under a long task) or was run by a worker that just died (its task
    rejected and requeued at once). Only the heartbeat tells them apart: this waits until it
    advances (alive: True) or goes stale (dead: False), at most PRECOMPUTE_STALE_SECONDS.
    """
    first_seen = None
    while True:
        row = Document.objects.filter(pk=document_id).values("status", "updated_at").first()
        if row is None or row["status"] != DocumentStatus.PRECOMPUTING:
            return False
        if row["updated_at"] < _stale_before():
            return False
        if first_seen is None:
            first_seen = row["updated_at"]
        elif row["updated_at"] > first_seen:
            return True
        time.sleep(min(1.0, settings.PRECOMPUTE_HEARTBEAT_SECONDS / 2))


def touch_precompute(*, document_id: int) -> None:
    """The running precompute's heartbeat (a single UPDATE, no lock)."""
    Document.objects.filter(pk=document_id, status=DocumentStatus.PRECOMPUTING).update(
        updated_at=timezone.now()
    )


@transaction.atomic
def retry_precompute(*, document: Document, publisher: User) -> Document:
    document = _own_locked(document=document, publisher=publisher)
    # A stalled precompute (its worker died) counts as failed: it can be retried at once.
    if document.status != DocumentStatus.FAILED and not precompute_stalled(document):
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
    if document.status == DocumentStatus.PRECOMPUTING and not precompute_stalled(document):
        # A duplicate delivery (the broker redelivered, or a sweep re-sent) while a live
        # worker is on it: that worker finishes; this message is done.
        log.info("Precompute of document %s is running elsewhere; task %s skipped",
                 document_id, task_id)
        return None
    document.status = DocumentStatus.PRECOMPUTING
    document.celery_task_id = task_id or document.celery_task_id
    document.precompute_attempts += 1
    document.error = ""
    document.error_code = ""
    document.progress_step = PrecomputeStep.TOKENIZING
    document.precompute_started_at = document.step_started_at = timezone.now()
    document.save(
        update_fields=[
            "status", "celery_task_id", "precompute_attempts", "error", "error_code",
            "progress_step", "precompute_started_at", "step_started_at", "updated_at",
        ]
    )
    return document


def record_progress(*, document_id: int, tokens_done: int, tokens_total: int) -> None:
    """A single UPDATE (no lock): progress is advisory and written throttled by the task.

    The step follows the tokens: prefilling until every token is in, then writing and
    verifying the artifact; step_started_at changes with the step (the estimate uses it).
    """
    tokens_done = min(tokens_done, tokens_total)
    step = PrecomputeStep.VERIFYING if tokens_done >= tokens_total else PrecomputeStep.PREFILLING
    now = timezone.now()
    Document.objects.filter(pk=document_id, status=DocumentStatus.PRECOMPUTING).update(
        tokens_done=tokens_done, tokens_total=tokens_total, progress_step=step,
        step_started_at=Case(When(progress_step=step, then=F("step_started_at")), default=now),
        updated_at=now,
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
    document.progress_step = ""
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
    document.progress_step = ""
    document.save(update_fields=[
        "status", "error_code", "error", "tokens_done", "progress_step", "updated_at"
    ])
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
