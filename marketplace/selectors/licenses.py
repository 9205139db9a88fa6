"""Reads for licenses and loads."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import QuerySet
from django.utils import timezone

from marketplace.models import License, Load, LoadStatus, User


def licenses_of(agent: User) -> QuerySet[License]:
    return License.objects.filter(agent=agent).select_related("document").order_by("-created_at")


def license_of(*, agent: User, license_id: int) -> License | None:
    return licenses_of(agent).filter(pk=license_id).first()


def loads_of(agent: User) -> QuerySet[Load]:
    return (
        Load.objects.filter(agent=agent)
        .select_related("license", "license__document")
        .order_by("-created_at")
    )


def loads_of_document(document_id: int) -> QuerySet[Load]:
    return Load.objects.filter(license__document_id=document_id).order_by("-created_at")


def daily_loads(*, document_id: int, days: int = 30) -> list[dict]:
    """[{day, loads, billed_nano}] for the document page's chart (succeeded loads only)."""
    from django.db.models import Count, Sum
    from django.db.models.functions import TruncDate

    since = timezone.now() - timedelta(days=days)
    rows = (
        Load.objects.filter(
            license__document_id=document_id, status=LoadStatus.SUCCEEDED, created_at__gte=since
        )
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(loads=Count("id"), billed_nano=Sum("amount_nano"))
        .order_by("day")
    )
    return [
        {"day": r["day"], "loads": r["loads"], "billed_nano": int(r["billed_nano"] or 0)}
        for r in rows
    ]


def pending_loads_count(agent: User) -> int:
    return Load.objects.filter(agent=agent, status=LoadStatus.PENDING).count()
