"""Documents API: the agents' catalogue; publishers manage their own documents."""

from __future__ import annotations

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.api.common import (
    COMMON_ERRORS,
    IDEMPOTENCY_PARAMETER,
    PAGINATION_ERRORS,
    MarketplaceView,
    StrictLimitOffsetPagination,
    error_response,
    idempotency_key,
)
from marketplace.api_errors import ApiError
from marketplace.models import Document, Role
from marketplace.selectors.documents import documents_visible_to
from marketplace.serializers import (
    DocumentCreateSerializer,
    DocumentSerializer,
    DocumentUpdateSerializer,
)
from marketplace.services import completions as completion_services
from marketplace.services import documents as document_services


def _data(request: Request, document: Document) -> dict:
    return DocumentSerializer(document, context={"viewer": request.user}).data


def _visible(request: Request, document_id: int) -> Document:
    document = documents_visible_to(request.user).filter(pk=document_id).first()
    if document is None:
        raise ApiError(status_code=404, code="not_found", message="No such document.")
    return document


def _own(request: Request, document_id: int) -> Document:
    if request.user.role != Role.PUBLISHER:
        raise ApiError(
            status_code=403, code="publisher_only", message="Only publishers manage documents."
        )
    document = Document.objects.filter(pk=document_id, publisher=request.user).first()
    if document is None:  # another publisher's document is indistinguishable from none
        raise ApiError(status_code=404, code="not_found", message="No such document.")
    return document


class DocumentListView(MarketplaceView):
    pagination_class = StrictLimitOffsetPagination

    @extend_schema(
        operation_id="documents_list",
        summary="The catalogue (agents: ready, listed documents; publishers: their own).",
        parameters=[
            OpenApiParameter("model", str, description="Only documents for this model."),
            OpenApiParameter("q", str, description="Title contains."),
        ],
        responses={200: DocumentSerializer(many=True), **PAGINATION_ERRORS, **COMMON_ERRORS},
    )
    def get(self, request: Request) -> Response:
        qs = documents_visible_to(request.user).order_by("-created_at")
        if model := request.query_params.get("model"):
            qs = qs.filter(model_slug=model)
        if q := request.query_params.get("q"):
            qs = qs.filter(title__icontains=q)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(qs, request, view=self)
        data = DocumentSerializer(page, many=True, context={"viewer": request.user}).data
        return paginator.get_paginated_response(data)

    @extend_schema(
        operation_id="documents_create",
        summary="Publishers: list a new document; its KV is precomputed on a GPU worker.",
        request=DocumentCreateSerializer,
        responses={201: DocumentSerializer, **COMMON_ERRORS},
    )
    def post(self, request: Request) -> Response:
        if request.user.role != Role.PUBLISHER:
            raise ApiError(
                status_code=403, code="publisher_only", message="Only publishers list documents."
            )
        ser = DocumentCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        document = document_services.create_document(
            publisher=request.user, title=d["title"], text=d["text"], model_slug=d["model"],
            price_per_load_nano=d.get("price_per_load_nano"),
        )
        document.refresh_from_db()
        return Response(_data(request, document), status=status.HTTP_201_CREATED)


class DocumentDetailView(MarketplaceView):
    @extend_schema(
        operation_id="documents_retrieve",
        responses={200: DocumentSerializer, **COMMON_ERRORS},
    )
    def get(self, request: Request, pk: int) -> Response:
        document = _visible(request, pk)
        return Response(_data(request, document))

    @extend_schema(
        operation_id="documents_update",
        summary="Publishers: change the title or the price per load (null: the tariff's).",
        request=DocumentUpdateSerializer,
        responses={200: DocumentSerializer, **COMMON_ERRORS},
    )
    def patch(self, request: Request, pk: int) -> Response:
        document = _own(request, pk)
        ser = DocumentUpdateSerializer(data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        document = document_services.update_document(
            document=document, publisher=request.user, title=d.get("title"),
            price_per_load_nano=d.get("price_per_load_nano"),
            clear_price="price_per_load_nano" in d and d["price_per_load_nano"] is None,
        )
        return Response(_data(request, document))

    @extend_schema(
        operation_id="documents_destroy",
        summary="Publishers: delete a document that never sold a license.",
        responses={204: None, 409: error_response("It has licenses."), **COMMON_ERRORS},
    )
    def delete(self, request: Request, pk: int) -> Response:
        document = _own(request, pk)
        from django.core.exceptions import ValidationError

        try:
            document_services.delete_document(document=document, publisher=request.user)
        except ValidationError as exc:
            raise ApiError(
                status_code=409, code="document_has_licenses", message=exc.messages[0]
            ) from exc
        return Response(status=status.HTTP_204_NO_CONTENT)


class _DocumentAction(MarketplaceView):
    action = ""

    @extend_schema(request=None, responses={200: DocumentSerializer, **COMMON_ERRORS})
    def post(self, request: Request, pk: int) -> Response:
        document = _own(request, pk)
        fn = getattr(document_services, self.action)
        document = fn(document=document, publisher=request.user)
        document.refresh_from_db()
        return Response(_data(request, document))


class DocumentUnlistView(_DocumentAction):
    """Stop new licenses; live licenses keep working until they expire."""

    action = "unlist_document"


class DocumentRelistView(_DocumentAction):
    action = "relist_document"


class DocumentRetryView(_DocumentAction):
    """Queue a failed precompute again."""

    action = "retry_precompute"

    @extend_schema(
        request=None,
        responses={200: DocumentSerializer, 409: error_response("Not failed."), **COMMON_ERRORS},
    )
    def post(self, request: Request, pk: int) -> Response:
        from django.core.exceptions import ValidationError

        try:
            return super().post(request, pk)
        except ValidationError as exc:
            raise ApiError(status_code=409, code="not_failed", message=exc.messages[0]) from exc


class DocumentKVView(MarketplaceView):
    @extend_schema(
        operation_id="documents_kv",
        summary="Shipping mode: download the KV artifact (consumes a load, meters egress).",
        parameters=[
            OpenApiParameter("license", {"type": "integer", "minimum": 1}, required=True,
                             description="Your license id."),
            IDEMPOTENCY_PARAMETER,
        ],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The safetensors artifact."
            ),
            402: error_response("The wallet cannot pay the egress."),
            409: error_response("The license is exhausted, expired or for another document."),
            503: error_response("The artifact is not on this host."),
            **COMMON_ERRORS,
        },
    )
    def get(self, request: Request, pk: int) -> FileResponse:
        raw = request.query_params.get("license", "")
        if not raw.isdigit():
            raise ApiError(
                status_code=422, code="invalid_request",
                message="Pass ?license=<your license id>.", fields={"license": ["Required."]},
            )
        if not Document.objects.filter(pk=pk).exists():
            raise ApiError(status_code=404, code="not_found", message="No such document.")
        load, path, replayed = completion_services.start_kv_download(
            agent=request.user, license_id=int(raw), document_id=pk,
            idempotency_key=idempotency_key(request),
        )
        response = FileResponse(
            open(path, "rb"),  # noqa: SIM115 - FileResponse closes it
            content_type="application/octet-stream",
            as_attachment=True,
            filename=path.name,
        )
        response["X-Kvmarket-Load"] = str(load.pk)
        response["X-Kvmarket-Egress-Bytes"] = str(load.egress_bytes)
        if replayed:
            response["Idempotent-Replayed"] = "true"
        return response
