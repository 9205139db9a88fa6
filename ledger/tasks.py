"""Celery tasks (thin: they call ledger services)."""

from celery import shared_task

from ledger import services
from ledger.errors import PaymentProviderError
from ledger.models import Payout, PayoutStatus


@shared_task(name="ledger.tasks.settle_payouts")
def settle_payouts() -> dict:
    """Beat task (every SETTLEMENT_INTERVAL_SECONDS): create payouts pending review for
    publishers above PAYOUT_THRESHOLD_NANO_USD, and retry transfers of approved payouts."""
    created = services.create_due_payouts()
    retried = []
    for payout_id in Payout.objects.filter(status=PayoutStatus.APPROVED).values_list(
        "id", flat=True
    ):
        send_payout_transfer.delay(payout_id)
        retried.append(payout_id)
    return {"created": [p.pk for p in created], "retried": retried}


@shared_task(
    name="ledger.tasks.send_payout_transfer",
    autoretry_for=(PaymentProviderError,),
    retry_backoff=30,
    retry_backoff_max=3600,
    max_retries=10,
)
def send_payout_transfer(payout_id: int) -> str:
    return services.send_payout_transfer(payout_id=payout_id).status
