"""Tariffs: store a model's tariff so staff can edit it in the admin."""

from __future__ import annotations

from django.db import IntegrityError, transaction

from ledger import selectors
from ledger.models import Tariff


def ensure_tariff(*, model_slug: str) -> Tariff:
    """The model's stored tariff, created from the registry defaults (selectors.tariff_for)
    when there is none. Raises KeyError for a model that is neither stored nor registered."""
    tariff = selectors.tariff_for(model_slug)
    if tariff.pk is not None:
        return tariff
    try:
        with transaction.atomic():
            tariff.save(force_insert=True)
    except IntegrityError:  # stored meanwhile by a concurrent call
        tariff = Tariff.objects.get(model_slug=model_slug)
    return tariff
