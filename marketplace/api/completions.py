"""OpenAI-compatible completions from a hosted KV cache: POST chat/completions, POST completions.

The body names the document and the license (with the openai SDK: ``extra_body={"document":
..., "license": ...}``). The request path, the charge rule and exactly-once metering are
described in marketplace.services.completions.

Streaming (``stream: true``): server-sent events in OpenAI's chunk format, one chunk per text
delta as the engine's decode loop makes it (relayed from the GPU worker's stream), ending with
``data: [DONE]``; with ``stream_options.include_usage`` a last chunk carries ``usage`` (and the
load's ``kvmarket`` details). Everything that can fail before the first token (reservation, no
worker, every worker busy, the engine refusing the request) is still a plain JSON error with
its HTTP status, and uncharged. Once the first token was sent the load is served and charged;
a client that disconnects stops the generation and is charged for the tokens produced until
then; a worker lost mid-stream ends the stream with an ``error`` event (no ``[DONE]``).

Each response tells where its time went: the ``Server-Timing`` header (auth, reserve, route
and, when not streamed, queue, engine_ttft, decode, charge) and ``kvmarket.timings`` (seconds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.api.common import (
    COMMON_ERRORS,
    IDEMPOTENCY_PARAMETER,
    MarketplaceView,
    error_response,
    idempotency_key,
)
from marketplace.api_errors import ApiError
from marketplace.models import Load, LoadKind
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
    503: error_response("No GPU worker of this model is available; not charged (Retry-After)."),
    504: error_response("The completion timed out; not charged."),
    **COMMON_ERRORS,
    422: error_response(
        "The request is invalid (invalid_request, with the fields), or its text cannot fit the "
        "context the document leaves (context_length_exceeded); not charged."
    ),
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


def _kvmarket(load: Load, replayed: bool, phases: completion_services.Phases) -> dict[str, Any]:
    result = load.response or {}
    return {
        "load": load.pk,
        "license": load.license_id,
        "document": load.license.document_id,
        "loads_left": result.get("loads_left"),
        "charged_nano": load.amount_nano,
        "compute_nano": load.compute_nano,
        "charge_pending": load.status != "succeeded",
        "ttft_seconds": load.ttft_seconds,
        "worker": load.worker or None,
        "timings": dict(phases.seconds),
        "replayed": replayed,
    }


def _sse(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    done = True
    try:
        for chunk in chunks:
            if "error" in chunk:  # the worker was lost mid-stream: no [DONE]
                done = False
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        if done:
            yield b"data: [DONE]\n\n"
    finally:
        chunks.close()  # a client gone mid-stream: stops the generation, charges what was made


def _headers(response: Any, load: Load, replayed: bool,
             phases: completion_services.Phases) -> None:
    response["X-Kvmarket-Load"] = str(load.pk)
    if phases.seconds:
        response["Server-Timing"] = phases.header()
    if replayed:
        response["Idempotent-Replayed"] = "true"


class _CompletionView(MarketplaceView):
    kind: LoadKind
    request_serializer: type
    id_prefix: str
    object_name: str  # the body's "object"
    chunk_object_name: str  # each streamed chunk's "object"

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """Authentication, permissions and throttles: the load's "auth" phase."""
        t0 = time.perf_counter()
        super().initial(request, *args, **kwargs)
        self.phases = completion_services.Phases()
        self.phases.add("auth", time.perf_counter() - t0)

    def post(self, request: Request) -> Response | StreamingHttpResponse:
        require_agent(request.user)
        ser = self.request_serializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        key = idempotency_key(request)
        document = completion_services.completion_document(
            agent=request.user, document_id=data["document"], idempotency_key=key,
        )
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
        params = ser.generation_params()
        completion_services.check_prompt_fits(document=document, params=params)
        stream = bool(data.get("stream"))
        run = completion_services.start_generation(
            agent=request.user,
            kind=self.kind,
            license_id=data["license"],
            document_id=document.pk,
            idempotency_key=key,
            params=params,
            until_final=not stream,
            timeout=getattr(settings, "COMPLETION_TIMEOUT_SECONDS", None),
            phases=self.phases,
            document=document,
        )
        base = {
            "id": f"{self.id_prefix}-kvm{run.load.pk}",
            "created": int(run.load.created_at.timestamp()),
            "model": document.model_slug,
        }
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        if stream:
            if run.replayed:
                events = _replay_events(run.load.response or {})
            else:
                events = completion_services.stream_events(run)
            response = StreamingHttpResponse(
                _sse(self.chunks(base, run, events, include_usage)),
                content_type="text/event-stream",
            )
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            _headers(response, run.load, run.replayed, self.phases)
            return response
        # The charged load in hand (its license read with it), not read again.
        load = run.load if run.replayed else completion_services.complete(run)
        response = Response(self.body(base, load, run.replayed))
        _headers(response, load, run.replayed, self.phases)
        return response

    def choice_content(self, text: str) -> dict[str, Any]:
        """The body's choice content: {"message": ...} or {"text": ...}."""
        raise NotImplementedError

    def first_chunk(self) -> dict[str, Any] | None:
        """Content of a chunk sent before the first delta (the chat role), or None."""
        return None

    def delta_content(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def last_content(self) -> dict[str, Any]:
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
            "kvmarket": _kvmarket(load, replayed, self.phases),
        }

    def chunks(self, base: dict[str, Any], run: completion_services.LoadRun,
               events: Iterator[dict[str, Any]], include_usage: bool) -> Iterator[dict]:
        head = {**base, "object": self.chunk_object_name, "system_fingerprint": None}
        extra = {"usage": None} if include_usage else {}

        def chunk(content: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **extra}

        try:
            yield from self._chunks(chunk, head, run, events, include_usage)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _chunks(self, chunk: Any, head: dict[str, Any], run: completion_services.LoadRun,
                events: Iterator[dict[str, Any]], include_usage: bool) -> Iterator[dict]:
        first = self.first_chunk()
        if first is not None:
            yield chunk(first, None)
        for event in events:
            kind = event.get("type")
            if kind == "delta":
                yield chunk(self.delta_content(event.get("text", "")), None)
            elif kind == "final":
                yield chunk(self.last_content(), _finish_reason(event.get("finish_reason")))
                if include_usage:
                    load = run.load  # recorded and charged (or left served) as the event came
                    yield {**head, "choices": [], "usage": _usage(load.response or event),
                           "kvmarket": _kvmarket(load, run.replayed, self.phases)}
            elif kind == "error":
                yield {"error": {"code": event.get("code", "generation_failed"),
                                 "message": event.get("message", "")}}


def _replay_events(result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A replayed load's stored result as the events of a stream (its text in one delta)."""
    if result.get("text"):
        yield {"type": "delta", "text": result["text"]}
    yield {"type": "final", **result}


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

    def first_chunk(self) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}}

    def delta_content(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}}

    def last_content(self) -> dict[str, Any]:
        return {"delta": {}}


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

    def delta_content(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def last_content(self) -> dict[str, Any]:
        return {"text": ""}
