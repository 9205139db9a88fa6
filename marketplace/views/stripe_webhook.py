"""The Stripe webhook endpoint, mounted at /stripe/webhook (CSRF-exempt; authenticity comes from
the signature). The ledger applies each verified event once."""

import json
import logging

import stripe
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from kvmarket.api_errors import error_body
from ledger import services as ledger_services
from ledger import stripe_gateway

log = logging.getLogger(__name__)


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    if not settings.STRIPE_WEBHOOK_SECRET:
        return JsonResponse(
            error_body("stripe_unavailable", "Webhook secret not configured."), status=503
        )
    payload = request.body
    try:
        event = stripe_gateway.construct_event(payload, request.headers.get("Stripe-Signature"))
    except stripe.SignatureVerificationError:
        return JsonResponse(error_body("bad_signature", "Invalid Stripe signature."), status=400)
    except ValueError:
        return JsonResponse(error_body("bad_payload", "Invalid JSON payload."), status=400)
    data_object = json.loads(payload)["data"]["object"]
    result = ledger_services.handle_stripe_event(
        event_id=event.id, event_type=event.type, data_object=data_object
    )
    log.info("stripe event %s (%s): %s", event.id, event.type, result)
    return JsonResponse({"received": True, "result": result})
