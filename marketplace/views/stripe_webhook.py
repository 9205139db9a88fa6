"""The Stripe webhook endpoint, mounted at /stripe/webhook (CSRF-exempt; authenticity comes from
the signature). The ledger applies each verified event once."""

import json
import logging

import stripe
from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from ledger import services as ledger_services
from ledger import stripe_gateway
from marketplace.api_errors import error_body

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
        stripe_gateway.construct_event(payload, request.headers.get("Stripe-Signature"))
    except stripe.SignatureVerificationError:
        return JsonResponse(error_body("bad_signature", "Invalid Stripe signature."), status=400)
    except ValueError:
        return JsonResponse(error_body("bad_payload", "Invalid JSON payload."), status=400)
    body = json.loads(payload)
    data = body.get("data") if isinstance(body, dict) else None
    data_object = data.get("object") if isinstance(data, dict) else None
    event_id, event_type = body.get("id"), body.get("type")
    if not (isinstance(data_object, dict) and isinstance(event_id, str) and event_id
            and isinstance(event_type, str)):
        return JsonResponse(
            error_body("bad_payload", "The event needs a string id and type and data.object."),
            status=400,
        )
    try:
        result = ledger_services.handle_stripe_event(
            event_id=event_id, event_type=event_type, data_object=data_object
        )
    except (KeyError, TypeError, ValueError, ObjectDoesNotExist) as exc:
        # The event was signed by Stripe but its object lacks what its type needs; the
        # transaction rolled back, so nothing was recorded or credited.
        log.warning("stripe event %s (%s) has an unexpected shape: %r", event_id, event_type, exc)
        return JsonResponse(
            error_body("bad_payload", f"The {event_type} event's object is not as expected."),
            status=400,
        )
    log.info("stripe event %s (%s): %s", event_id, event_type, result)
    return JsonResponse({"received": True, "result": result})
