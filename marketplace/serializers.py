"""DRF serializers for the v1 API (documents, licenses, OpenAI-compatible completions)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.validators import MinLengthValidator
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.models import Document, License, Load
from marketplace.selectors.documents import price_per_load_nano

NANO_PER_USD = 10**9
MAX_TOKENS_LIMIT = 4096
PREVIEW_CHARS = 280
MAX_NANO = 2**63 - 1  # amounts are PostgreSQL bigints


def usd(nano: int | None) -> str | None:
    if nano is None:
        return None
    return f"{nano / NANO_PER_USD:.9f}"


# Schemas for fields whose rules the default mapping does not say (the API's schema is exact:
# what it documents as valid is accepted, and the rest is refused with 422).


@extend_schema_field({"type": "string", "minLength": 1, "pattern": r"\S"})
class NonBlankCharField(serializers.CharField):
    """A string that is not empty once trimmed."""


def model_slugs() -> list[str]:
    """The registered models' slugs (the schema's ModelSlugEnum)."""
    return list(settings.KVMARKET_MODELS)


def model_names() -> list[str]:
    """What the completion APIs take as ``model``: a registered slug or its reference (the
    schema's ModelNameEnum)."""
    names = set(settings.KVMARKET_MODELS)
    names.update(cfg["ref"] for cfg in settings.KVMARKET_MODELS.values() if cfg.get("ref"))
    return sorted(names)


class ModelNameField(serializers.CharField):
    """A registered model's slug or reference; it must also be the document's model (with
    several models, another registered name is 422 model_mismatch: a rule across the
    request and the document, which a schema cannot state)."""


class ModelNameFieldSchema(OpenApiSerializerFieldExtension):
    """The enum is read from the registry when the schema is generated, not at import."""

    target_class = ModelNameField

    def map_serializer_field(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        return {"type": "string", "enum": model_names()}


@extend_schema_field({
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"type": "string", "enum": ["text"]},
                           "text": {"type": "string"}},
        }},
    ],
    "nullable": True,
})
class MessageContentField(serializers.JSONField):
    """A message's content: a string, or a list of {type: text, text} parts."""


@extend_schema_field({
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
    ],
    "nullable": True,
})
class StopField(serializers.JSONField):
    """Stop sequences: a non-empty string or up to 4 of them."""


@extend_schema_field({"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1})
class TopPField(serializers.FloatField):
    """Nucleus sampling mass, in (0, 1]."""


class ContentPartSerializer(serializers.Serializer):
    type = serializers.CharField()
    text = serializers.CharField(required=False, allow_blank=True)


# --- documents -------------------------------------------------------------------------------


class ProgressSerializer(serializers.Serializer):
    tokens_done = serializers.IntegerField()
    tokens_total = serializers.IntegerField()
    percent = serializers.IntegerField()


class VerificationSummarySerializer(serializers.Serializer):
    passed = serializers.BooleanField(allow_null=True)
    bitwise_equal = serializers.BooleanField(allow_null=True)
    greedy_matched = serializers.IntegerField(allow_null=True)
    greedy_total = serializers.IntegerField(allow_null=True)
    match_rate = serializers.FloatField(allow_null=True)
    max_logit_diff = serializers.FloatField(allow_null=True)
    dtype = serializers.CharField(allow_null=True)


class OwnerDetailsSerializer(serializers.Serializer):
    text = serializers.CharField()
    error = serializers.CharField()
    error_code = serializers.CharField()
    precompute_seconds = serializers.FloatField(allow_null=True)
    precompute_flops = serializers.FloatField(allow_null=True)
    precompute_attempts = serializers.IntegerField()
    unlisted_at = serializers.DateTimeField(allow_null=True)
    ready_at = serializers.DateTimeField(allow_null=True)


class DocumentSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model_slug")
    price_per_load_nano = serializers.SerializerMethodField()
    price_per_load_usd = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()
    verification = serializers.SerializerMethodField()
    preview = serializers.SerializerMethodField()
    publisher = serializers.SerializerMethodField()
    owner_details = serializers.SerializerMethodField()
    example_questions = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = Document
        fields = [
            "id", "title", "description", "model", "publisher", "n_tokens", "price_per_load_nano",
            "price_per_load_usd", "status", "listed", "progress", "verification",
            "artifact_bytes", "preview", "example_questions", "created_at", "updated_at",
            "owner_details",
        ]
        read_only_fields = fields

    @extend_schema_field({"type": "integer", "format": "int64", "nullable": True})
    def get_price_per_load_nano(self, obj: Document) -> int | None:
        return price_per_load_nano(obj)

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_price_per_load_usd(self, obj: Document) -> str | None:
        return usd(price_per_load_nano(obj))

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, obj: Document) -> dict[str, int]:
        return {
            "tokens_done": obj.tokens_done,
            "tokens_total": obj.tokens_total,
            "percent": obj.progress_percent,
        }

    @extend_schema_field(VerificationSummarySerializer(allow_null=True))
    def get_verification(self, obj: Document) -> dict[str, Any] | None:
        report = obj.verification
        if not report:
            return None
        keys = ("passed", "bitwise_equal", "greedy_matched", "greedy_total", "match_rate",
                "max_logit_diff", "dtype")
        return {k: report.get(k) for k in keys}

    @extend_schema_field(serializers.CharField())
    def get_preview(self, obj: Document) -> str:
        text = obj.text.strip()
        return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS].rstrip() + "…"

    @extend_schema_field(serializers.CharField())
    def get_publisher(self, obj: Document) -> str:
        return obj.publisher.display_name or f"publisher {obj.publisher_id}"

    @extend_schema_field(OwnerDetailsSerializer(allow_null=True))
    def get_owner_details(self, obj: Document) -> dict[str, Any] | None:
        """The publisher's own view (text, error, figures); null for anyone else."""
        viewer = self.context.get("viewer")
        if viewer is None or viewer.pk != obj.publisher_id:
            return None
        return OwnerDetailsSerializer(obj).data


class DocumentCreateSerializer(serializers.Serializer):
    title = NonBlankCharField(max_length=200)
    text = NonBlankCharField(trim_whitespace=False)
    model = serializers.ChoiceField(choices=[])
    price_per_load_nano = serializers.IntegerField(
        min_value=0, max_value=MAX_NANO, required=False, allow_null=True
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = list(settings.KVMARKET_MODELS)

    def validate_text(self, value: str) -> str:
        if len(value.encode()) > settings.DOCUMENT_MAX_UPLOAD_BYTES:
            raise serializers.ValidationError(
                f"At most {settings.DOCUMENT_MAX_UPLOAD_BYTES} bytes."
            )
        return value


class DocumentUpdateSerializer(serializers.Serializer):
    title = NonBlankCharField(max_length=200, required=False)
    price_per_load_nano = serializers.IntegerField(
        min_value=0, max_value=MAX_NANO, required=False, allow_null=True
    )


# --- licenses --------------------------------------------------------------------------------


class LicenseCreateSerializer(serializers.Serializer):
    document = serializers.IntegerField(min_value=1)
    loads = serializers.IntegerField(min_value=1, max_value=1_000_000)


class LicenseSerializer(serializers.ModelSerializer):
    document = serializers.IntegerField(source="document_id")
    document_title = serializers.CharField(source="document.title")
    model = serializers.CharField(source="document.model_slug")
    loads_left = serializers.IntegerField()
    price_per_load_usd = serializers.SerializerMethodField()

    class Meta:
        model = License
        fields = [
            "id", "document", "document_title", "model", "loads_total", "loads_used",
            "loads_left", "price_per_load_nano", "price_per_load_usd", "status", "expires_at",
            "created_at",
        ]
        read_only_fields = fields

    def get_price_per_load_usd(self, obj: License) -> str:
        return usd(obj.price_per_load_nano) or "0"


class LoadSerializer(serializers.ModelSerializer):
    license = serializers.IntegerField(source="license_id")
    document = serializers.IntegerField(source="license.document_id")

    class Meta:
        model = Load
        fields = [
            "id", "license", "document", "kind", "status", "cached_tokens", "suffix_tokens",
            "output_tokens", "amount_nano", "compute_nano", "egress_nano", "egress_bytes",
            "ttft_seconds", "total_seconds", "error_code", "created_at", "finished_at",
        ]
        read_only_fields = fields


# --- completions (OpenAI-compatible) ---------------------------------------------------------


class NonEmptyListSerializer(serializers.ListSerializer):
    """A list that must hold an item; the validator makes the schema say minItems: 1."""

    def get_validators(self) -> list:
        return [*super().get_validators(), MinLengthValidator(1)]


class ChatMessageSerializer(serializers.Serializer):
    class Meta:
        list_serializer_class = NonEmptyListSerializer

    role = serializers.ChoiceField(choices=["system", "developer", "user", "assistant", "tool"])
    content = MessageContentField(
        allow_null=True, help_text="A string, or a list of {type: text, text} parts."
    )
    name = NonBlankCharField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        content = attrs["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise serializers.ValidationError({"content": "Only text parts are supported."})
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise serializers.ValidationError({"content": "A string or a list of text parts."})
        role = "system" if attrs["role"] == "developer" else attrs["role"]
        return {"role": role, "content": content}


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(required=False, default=False)


class _SamplingSerializer(serializers.Serializer):
    model = ModelNameField(required=False, help_text="The document's model slug.")
    document = serializers.IntegerField(min_value=1, help_text="Document id (extra_body).")
    license = serializers.IntegerField(min_value=1, help_text="License id (extra_body).")
    max_tokens = serializers.IntegerField(min_value=1, max_value=MAX_TOKENS_LIMIT, required=False)
    temperature = serializers.FloatField(min_value=0.0, max_value=2.0, required=False, default=0.0)
    top_p = TopPField(max_value=1.0, required=False, default=1.0)
    seed = serializers.IntegerField(required=False, allow_null=True, default=None)
    stop = StopField(required=False, allow_null=True, default=None,
                     help_text="A string or up to 4 strings.")
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    n = serializers.IntegerField(required=False, min_value=1, max_value=1, default=1)

    default_max_tokens = 64

    def validate_top_p(self, value: float) -> float:
        if value <= 0:
            raise serializers.ValidationError("top_p must be greater than 0.")
        return value

    def validate_stop(self, value: Any) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if (not isinstance(value, list) or len(value) > 4
                or not all(isinstance(s, str) and s for s in value)):
            raise serializers.ValidationError("A non-empty string or up to 4 of them.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("max_tokens") is None:
            alias = attrs.pop("max_completion_tokens", None)
            attrs["max_tokens"] = alias or self.default_max_tokens
        return attrs

    def generation_params(self) -> dict[str, Any]:
        d = self.validated_data
        return {
            "max_tokens": d["max_tokens"],
            "temperature": d["temperature"],
            "top_p": d["top_p"],
            "seed": d.get("seed"),
            "stop": d.get("stop"),
        }


class ChatCompletionRequestSerializer(_SamplingSerializer):
    messages = ChatMessageSerializer(many=True, allow_empty=False)
    max_completion_tokens = serializers.IntegerField(
        min_value=1, max_value=MAX_TOKENS_LIMIT, required=False
    )

    def generation_params(self) -> dict[str, Any]:
        return {"messages": list(self.validated_data["messages"]), **super().generation_params()}


class CompletionRequestSerializer(_SamplingSerializer):
    prompt = serializers.CharField(allow_blank=True, trim_whitespace=False)

    default_max_tokens = 16

    def generation_params(self) -> dict[str, Any]:
        return {"prompt": self.validated_data["prompt"], **super().generation_params()}


# Response shapes, for the schema only (the views build plain dicts).


class PromptTokensDetailsSerializer(serializers.Serializer):
    cached_tokens = serializers.IntegerField()


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    prompt_tokens_details = PromptTokensDetailsSerializer()


class ChatMessageOutSerializer(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField()


class ChatChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    message = ChatMessageOutSerializer()
    finish_reason = serializers.CharField()
    logprobs = serializers.JSONField(allow_null=True)


class KvmarketInfoSerializer(serializers.Serializer):
    load = serializers.IntegerField()
    license = serializers.IntegerField()
    document = serializers.IntegerField()
    loads_left = serializers.IntegerField()
    charged_nano = serializers.IntegerField()
    compute_nano = serializers.IntegerField()
    ttft_seconds = serializers.FloatField(allow_null=True)
    replayed = serializers.BooleanField()


class ChatCompletionSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    model = serializers.CharField()
    choices = ChatChoiceSerializer(many=True)
    usage = UsageSerializer()
    system_fingerprint = serializers.CharField(allow_null=True)
    kvmarket = KvmarketInfoSerializer()


class CompletionChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    text = serializers.CharField()
    finish_reason = serializers.CharField()
    logprobs = serializers.JSONField(allow_null=True)


class CompletionSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    model = serializers.CharField()
    choices = CompletionChoiceSerializer(many=True)
    usage = UsageSerializer()
    kvmarket = KvmarketInfoSerializer()


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()
