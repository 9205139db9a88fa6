"""Wallet and earnings API (thin views over ledger selectors/services), mounted at /api/v1/.

Units: amounts are integers in nano-USD ("*_nano" fields; 1 USD = 1,000,000,000 nano-USD),
with an exact decimal USD string beside them ("*_usd"). Agents authenticate with their API key
(Bearer); publishers use their browser session (they have no API keys).
"""

from __future__ import annotations

import stripe
from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ledger import selectors
from ledger import services as ledger_services
from ledger.errors import LedgerError
from ledger.models import NANO_PER_USD
from marketplace.api.common import AUTH_ERRORS, error_response, to_api_error
from marketplace.api_errors import ApiError
from marketplace.authentication import ApiKeyAuthentication
from marketplace.models import Role

MIN_TOPUP_CENTS = 100  # 1 USD (Stripe's minimum charge is 0.50 USD)
MAX_TOPUP_CENTS = 1_000_000  # 10,000 USD

ROLE_ERRORS = {**AUTH_ERRORS, 403: error_response("Another role's endpoint (permission_denied).")}
QUERY_ERRORS = {**ROLE_ERRORS, 422: error_response("A query parameter is out of range.")}


class _LedgerView(APIView):
    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]
    required_role: Role | None = None

    def initial(self, request: Request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)
        if self.required_role is not None and request.user.role != self.required_role:
            raise ApiError(
                status_code=status.HTTP_403_FORBIDDEN,
                code="permission_denied",
                message=f"Only {self.required_role.label.lower()}s can use this endpoint.",
            )


class WalletView(_LedgerView):
    required_role = Role.AGENT

    @extend_schema(
        summary="Wallet balance",
        responses={200: inline_serializer(
            "Wallet",
            {
                "balance_nano": serializers.IntegerField(help_text="nano-USD (1e-9 USD)"),
                "balance_usd": serializers.CharField(help_text="exact decimal USD"),
                "currency": serializers.CharField(),
                "unit": serializers.CharField(),
                "nano_per_usd": serializers.IntegerField(),
            },
        ), **ROLE_ERRORS},
    )
    def get(self, request: Request) -> Response:
        balance = selectors.wallet_balance(request.user)
        return Response(
            {
                "balance_nano": balance,
                "balance_usd": selectors.format_usd(balance),
                "currency": "usd",
                "unit": "nano_usd",
                "nano_per_usd": NANO_PER_USD,
            }
        )


class TopUpSerializer(serializers.Serializer):
    amount_cents = serializers.IntegerField(min_value=MIN_TOPUP_CENTS, max_value=MAX_TOPUP_CENTS)


class TopUpView(_LedgerView):
    required_role = Role.AGENT

    @extend_schema(
        summary="Start a wallet top-up (Stripe Checkout)",
        request=TopUpSerializer,
        responses={
            201: inline_serializer("TopUpCheckout", {"checkout_url": serializers.URLField()}),
            422: error_response("amount_cents is missing or out of range."),
            502: error_response("Stripe refused the checkout session."),
            503: error_response("Payments are not configured here (stripe_unavailable)."),
            **ROLE_ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        body = TopUpSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        base = settings.PUBLIC_BASE_URL.rstrip("/")
        try:
            url = ledger_services.create_topup_checkout(
                agent=request.user,
                amount_cents=body.validated_data["amount_cents"],
                success_url=f"{base}/?topup=success",
                cancel_url=f"{base}/?topup=cancelled",
            )
        except LedgerError as exc:
            raise to_api_error(exc) from exc
        except stripe.StripeError as exc:
            raise ApiError(
                status_code=status.HTTP_502_BAD_GATEWAY,
                code="payment_provider_error",
                message=f"Stripe refused the checkout session: {exc.user_message or exc}",
            ) from exc
        return Response({"checkout_url": url}, status=status.HTTP_201_CREATED)


class WalletHistoryView(_LedgerView):
    required_role = Role.AGENT

    @extend_schema(
        summary="Wallet history (newest first)",
        parameters=[OpenApiParameter(
            "limit", {"type": "integer", "minimum": 1, "maximum": 1000},
            description="1..1000, default 100",
        )],
        responses={200: inline_serializer(
            "WalletHistory",
            {
                "results": inline_serializer(
                    "WalletPosting",
                    {
                        "id": serializers.IntegerField(),
                        "transaction_id": serializers.IntegerField(),
                        "kind": serializers.CharField(),
                        "amount_nano": serializers.IntegerField(),
                        "balance_after_nano": serializers.IntegerField(),
                        "memo": serializers.CharField(),
                        "license_ref": serializers.CharField(),
                        "created_at": serializers.DateTimeField(),
                    },
                    many=True,
                ),
                "unit": serializers.CharField(),
            },
        ), **QUERY_ERRORS},
    )
    def get(self, request: Request) -> Response:
        limit = _int_param(request, "limit", 100, 1, 1000)
        rows = selectors.wallet_history(request.user, limit=limit)
        return Response({"results": rows, "unit": "nano_usd"})


class EarningsView(_LedgerView):
    required_role = Role.PUBLISHER

    @extend_schema(
        summary="Publisher earnings per day",
        parameters=[OpenApiParameter(
            "days", {"type": "integer", "minimum": 1, "maximum": 366},
            description="1..366, default 30",
        )],
        responses={200: inline_serializer(
            "Earnings",
            {
                "days": inline_serializer(
                    "EarningsDay",
                    {
                        "date": serializers.DateField(),
                        "loads": serializers.IntegerField(),
                        "earned_nano": serializers.IntegerField(),
                    },
                    many=True,
                ),
                "totals": inline_serializer(
                    "EarningsTotals",
                    {
                        "loads": serializers.IntegerField(),
                        "earned_nano": serializers.IntegerField(),
                    },
                ),
                "payable_nano": serializers.IntegerField(),
                "unit": serializers.CharField(),
            },
        ), **QUERY_ERRORS},
    )
    def get(self, request: Request) -> Response:
        days = _int_param(request, "days", 30, 1, 366)
        data = selectors.publisher_earnings(request.user, days=days)
        return Response({**data, "unit": "nano_usd"})


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ApiError(
            status_code=422, code="invalid_request", message=f"{name} must be {lo}..{hi}."
        )
    return value
