"""GET /api/v1/documents/{id}/economics: a document's cost of re-prefilling against reuse."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.api.common import COMMON_ERRORS, MarketplaceView, error_response
from marketplace.api_errors import ApiError
from marketplace.selectors.documents import documents_visible_to
from marketplace.selectors.economics import document_economics

MAX_AGENTS = 10**12


class TimingSerializer(serializers.Serializer):
    seconds = serializers.FloatField()
    source = serializers.CharField(help_text='"measured" (this deployment) or "estimate".')
    note = serializers.CharField()


class EconomicsSerializer(serializers.Serializer):
    """Dollar amounts are floats in USD (estimates, not money moved)."""

    document = serializers.IntegerField()
    n_tokens = serializers.IntegerField()
    gpu_usd_per_hour = serializers.FloatField()
    prefill = TimingSerializer()
    load = TimingSerializer()
    tiers = serializers.ListField(child=serializers.DictField())
    prefill_usd = serializers.FloatField()
    load_usd = serializers.FloatField()
    saving = serializers.FloatField(allow_null=True)
    break_even_loads = serializers.IntegerField(allow_null=True)
    kv_bytes = serializers.IntegerField(allow_null=True)
    kv_bytes_per_token = serializers.FloatField(allow_null=True)
    egress_usd_per_gb = serializers.FloatField()
    egress_usd_per_load = serializers.FloatField(allow_null=True)
    egress_vs_prefill = serializers.FloatField(allow_null=True)
    price_per_load_usd = serializers.FloatField(allow_null=True)
    agents = serializers.IntegerField()
    prefill_total_usd = serializers.FloatField()
    reuse_total_usd = serializers.FloatField()
    egress_total_usd = serializers.FloatField(allow_null=True)
    agents_pay_usd = serializers.FloatField(required=False)


class DocumentEconomicsView(MarketplaceView):
    @extend_schema(
        operation_id="documents_economics",
        summary="Cost of one cold prefill vs one load, saving, break-even, egress; totals for "
                "N agents.",
        parameters=[OpenApiParameter(
            "agents", {"type": "integer", "minimum": 1, "maximum": MAX_AGENTS},
            description="agents reading the document (default 1000)",
        )],
        responses={
            200: EconomicsSerializer,
            409: error_response("The document is not ready (document_not_ready)."),
            **COMMON_ERRORS,
        },
    )
    def get(self, request: Request, pk: int) -> Response:
        document = documents_visible_to(request.user).filter(pk=pk).first()
        if document is None:
            raise ApiError(status_code=404, code="not_found", message="No such document.")
        try:
            agents = int(request.query_params.get("agents", "1000"))
        except ValueError:
            agents = -1
        if not 1 <= agents <= MAX_AGENTS:
            raise ApiError(status_code=400, code="invalid_request",
                           message=f"agents must be an integer between 1 and {MAX_AGENTS}.")
        econ = document_economics(document)
        if econ is None:
            raise ApiError(status_code=409, code="document_not_ready",
                           message="The economics need the document's token count: it is not "
                                   "prefilled yet.")
        return Response({"document": document.pk, **econ.as_dict(agents=agents)})
