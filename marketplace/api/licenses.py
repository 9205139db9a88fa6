"""Licenses API: agents buy packs of loads and list their licenses and loads."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
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
from marketplace.selectors.licenses import license_of, licenses_of, loads_of
from marketplace.serializers import LicenseCreateSerializer, LicenseSerializer, LoadSerializer
from marketplace.services.licenses import purchase_license, require_agent


class LicenseListView(MarketplaceView):
    pagination_class = StrictLimitOffsetPagination

    @extend_schema(
        operation_id="licenses_list",
        responses={200: LicenseSerializer(many=True), **PAGINATION_ERRORS, **COMMON_ERRORS},
    )
    def get(self, request: Request) -> Response:
        require_agent(request.user)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(licenses_of(request.user), request, view=self)
        return paginator.get_paginated_response(LicenseSerializer(page, many=True).data)

    @extend_schema(
        operation_id="licenses_create",
        summary="Buy a pack of loads of a document, paid from the wallet into escrow.",
        request=LicenseCreateSerializer,
        parameters=[IDEMPOTENCY_PARAMETER],
        responses={
            201: LicenseSerializer,
            200: LicenseSerializer,
            402: error_response("The wallet cannot pay (insufficient_funds)."),
            409: error_response("The document is unlisted or not ready, or the key was reused."),
            **COMMON_ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        require_agent(request.user)
        ser = LicenseCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        license, created = purchase_license(
            agent=request.user,
            document_id=ser.validated_data["document"],
            loads=ser.validated_data["loads"],
            idempotency_key=idempotency_key(request),
        )
        license.refresh_from_db()
        return Response(
            LicenseSerializer(license).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
            headers={} if created else {"Idempotent-Replayed": "true"},
        )


class LicenseDetailView(MarketplaceView):
    @extend_schema(
        operation_id="licenses_retrieve",
        responses={200: LicenseSerializer, **COMMON_ERRORS},
    )
    def get(self, request: Request, pk: int) -> Response:
        require_agent(request.user)
        license = license_of(agent=request.user, license_id=pk)
        if license is None:
            raise ApiError(status_code=404, code="not_found", message="No such license.")
        return Response(LicenseSerializer(license).data)


class LoadListView(MarketplaceView):
    pagination_class = StrictLimitOffsetPagination

    @extend_schema(
        operation_id="loads_list",
        summary="The agent's usage history: every load, its tokens and charges.",
        responses={200: LoadSerializer(many=True), **PAGINATION_ERRORS, **COMMON_ERRORS},
    )
    def get(self, request: Request) -> Response:
        require_agent(request.user)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(loads_of(request.user), request, view=self)
        return paginator.get_paginated_response(LoadSerializer(page, many=True).data)
