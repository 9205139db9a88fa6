"""API views for the calling agent's own account."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.common import AUTH_ERRORS


class MeView(APIView):
    @extend_schema(
        responses={
            200: inline_serializer(
                "Me", {"email": serializers.EmailField(), "role": serializers.CharField()}
            ),
            **AUTH_ERRORS,
        }
    )
    def get(self, request: Request) -> Response:
        return Response({"email": request.user.email, "role": request.user.role})
