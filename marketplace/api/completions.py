"""OpenAI-compatible completions from a hosted KV cache: POST chat/completions, POST completions.

The body names the document and the license (with the openai SDK: ``extra_body={"document":
..., "license": ...}``). Metering is described in marketplace.services.completions: the load is
charged in this process after the worker's result came back, exactly once per Idempotency-Key.

Streaming (``stream: true``): the generation runs to the end on the worker, then this view
relays it as server-sent events, one chunk per text delta the engine produced, in OpenAI's
chunk format, ending with ``data: [DONE]``. Generating first means a stream is only ever
opened for a load that succeeded and was charged, and a failure is still a plain JSON error
with its HTTP status; the cost is that the first chunk arrives when the generation is done
(the worker's own time to first token is reported in ``kvmarket.ttft_seconds``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from kvmarket.api_errors import ApiError
from marketplace.api.common import (
    COMMON_ERRORS,
    IDEMPOTENCY_PARAMETER,
    MarketplaceView,
    error_response,
    idempotency_key,
)
from marketplace.models import Document, Load, LoadKind
from marketplace.serializers import (
    ChatCompletionRequestSerializer,
    ChatCompletionSerializer,
    CompletionRequestSerializer,
    CompletionSerializer,
)
from marketplace.services import completions as completion_services
from marketplace.services.licenses import require_agent

COMPLETION_ERRORS = {
    402: error_response("The wallet cannot pay the output tokens."),
    409: error_response(
        "License exhausted, expired, revoked or for another document; key in use or reused."
    ),
    502: error_response("The worker failed; not charged."),
    504: error_response("The completion timed out; not charged."),
    **COMMON_ERRORS,
}


def _finish_reason(value: str | None) -> str:
    return value if value in ("stop", "length") else "stop"


def _usage(result: dict[str, Any]) -> dict[str, Any]:
    u = result.get("usage") or {}
    cached = int(u.get("cached_tokens", 0))
    prompt = cached + int(u.get("suffix_tokens", 0))
    output = int(u.get("output_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _kvmarket(load: Load, replayed: bool) -> dict[str, Any]:
    result = load.response or {}
    return {
        "load": load.pk,
        "license": load.license_id,
        "document": load.license.document_id,
        "loads_left": result.get("loads_left"),
        "charged_nano": load.amount_nano,
        "compute_nano": load.compute_nano,
        "ttft_seconds": load.ttft_seconds,
        "replayed": replayed,
    }


def _deltas(result: dict[str, Any]) -> list[str]:
    deltas = [d for d in result.get("deltas") or [] if d]
    text = result.get("text") or ""
    if "".join(deltas) != text:  # e.g. a stop string trimmed the end: relay the final text
        deltas = [text] if text else []
    return deltas


def _sse(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _event_stream(chunks: Iterator[dict[str, Any]], load: Load, replayed: bool):  # noqa: ANN202
    response = StreamingHttpResponse(_sse(chunks), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    _headers(response, load, replayed)
    return response


def _headers(response: Any, load: Load, replayed: bool) -> None:
    response["X-Kvmarket-Load"] = str(load.pk)
    if replayed:
        response["Idempotent-Replayed"] = "true"


class _CompletionView(MarketplaceView):
    kind: LoadKind
    request_serializer: type
    id_prefix: str
    object_name: str  # the body's "object"
    chunk_object_name: str  # each streamed chunk's "object"

    def post(self, request: Request) -> Response | StreamingHttpResponse:
        require_agent(request.user)
        ser = self.request_serializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        document = Document.objects.filter(pk=data["document"]).first()
        if document is None:
            raise ApiError(status_code=404, code="not_found", message="No such document.")
        model = data.get("model")
        ref = settings.KVMARKET_MODELS.get(document.model_slug, {}).get("ref")
        if model and model not in (document.model_slug, ref):
            raise ApiError(
                status_code=422, code="model_mismatch",
                message=f"This document's KV is for model {document.model_slug!r}, not {model!r}.",
                fields={"model": [f"Use {document.model_slug!r}."]},
            )
        load, replayed = completion_services.run_generation(
            agent=request.user,
            kind=self.kind,
            license_id=data["license"],
            document_id=document.pk,
            idempotency_key=idempotency_key(request),
            params=ser.generation_params(),
            timeout=getattr(settings, "COMPLETION_TIMEOUT_SECONDS", None),
        )
        load = Load.objects.select_related("license").get(pk=load.pk)
        base = {
            "id": f"{self.id_prefix}-kvm{load.pk}",
            "created": int(load.created_at.timestamp()),
            "model": document.model_slug,
        }
        if data.get("stream"):
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            return _event_stream(self.chunks(base, load, include_usage), load, replayed)
        body = self.body(base, load, replayed)
        response = Response(body)
        _headers(response, load, replayed)
        return response

    def choice_content(self, text: str) -> dict[str, Any]:
        """The body's choice content: {"message": ...} or {"text": ...}."""
        raise NotImplementedError

    def chunk_choices(self, result: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str | None]]:
        """(choice content, finish_reason) of each streamed chunk, in order."""
        raise NotImplementedError

    def body(self, base: dict[str, Any], load: Load, replayed: bool) -> dict[str, Any]:
        result = load.response or {}
        return {
            **base,
            "object": self.object_name,
            "system_fingerprint": None,
            "choices": [{
                "index": 0,
                **self.choice_content(result.get("text", "")),
                "logprobs": None,
                "finish_reason": _finish_reason(result.get("finish_reason")),
            }],
            "usage": _usage(result),
            "kvmarket": _kvmarket(load, replayed),
        }

    def chunks(self, base: dict[str, Any], load: Load, include_usage: bool) -> Iterator[dict]:
        result = load.response or {}
        head = {**base, "object": self.chunk_object_name, "system_fingerprint": None}
        extra = {"usage": None} if include_usage else {}
        for content, finish in self.chunk_choices(result):
            choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish}
            yield {**head, "choices": [choice], **extra}
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(result)}


class ChatCompletionsView(_CompletionView):
    kind = LoadKind.CHAT
    request_serializer = ChatCompletionRequestSerializer
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    @extend_schema(
        operation_id="chat_completions_create",
        summary="OpenAI-compatible chat completion continuing from a document's hosted KV.",
        request=ChatCompletionRequestSerializer,
        parameters=[IDEMPOTENCY_PARAMETER],
        responses={
            200: OpenApiResponse(
                ChatCompletionSerializer,
                description="application/json, or text/event-stream of chat.completion.chunk "
                "objects when stream is true.",
            ),
            **COMPLETION_ERRORS,
        },
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        return super().post(request)

    def choice_content(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def chunk_choices(self, result: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str | None]]:
        yield {"delta": {"role": "assistant", "content": ""}}, None
        for delta in _deltas(result):
            yield {"delta": {"content": delta}}, None
        yield {"delta": {}}, _finish_reason(result.get("finish_reason"))


class CompletionsView(_CompletionView):
    kind = LoadKind.COMPLETION
    request_serializer = CompletionRequestSerializer
    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    @extend_schema(
        operation_id="completions_create",
        summary="OpenAI-compatible raw text continuation after a document's hosted KV.",
        request=CompletionRequestSerializer,
        parameters=[IDEMPOTENCY_PARAMETER],
        responses={
            200: OpenApiResponse(
                CompletionSerializer,
                description="application/json, or text/event-stream of text_completion chunks "
                "when stream is true.",
            ),
            **COMPLETION_ERRORS,
        },
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        return super().post(request)

    def choice_content(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def chunk_choices(self, result: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str | None]]:
        for delta in _deltas(result):
            yield {"text": delta}, None
        yield {"text": ""}, _finish_reason(result.get("finish_reason"))
