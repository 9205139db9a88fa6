"""Reads for a document's economics: this deployment's measured timings and the operator's
prices (settings), handed to marketplace.economics for the arithmetic."""

from __future__ import annotations

import statistics

from django.conf import settings

from marketplace.economics import Economics, Timing, tier_timings
from marketplace.models import Document, Load, LoadStatus
from marketplace.selectors.documents import price_per_load_nano

# Loads whose timings are read (the latest ones) for the measured load time.
MEASURED_LOADS = 200


def gpu_usd_per_hour(model_slug: str) -> float:
    """The operator's cost of compute for a model: its KVMARKET_MODELS entry's
    ``gpu_usd_per_hour``, else settings.GPU_USD_PER_HOUR."""
    cfg = settings.KVMARKET_MODELS.get(model_slug, {})
    return float(cfg.get("gpu_usd_per_hour", settings.GPU_USD_PER_HOUR))


def _measured_loads(document: Document) -> list[tuple[float, str]]:
    """(time to first token, store tier) of the document's latest succeeded loads."""
    return list(
        Load.objects.filter(
            license__document=document, status=LoadStatus.SUCCEEDED, ttft_seconds__gt=0
        )
        .order_by("-created_at")
        .values_list("ttft_seconds", "cache_tier")[:MEASURED_LOADS]
    )


def _median_by_tier(loads: list[tuple[float, str]]) -> dict[str, float]:
    by_tier: dict[str, list[float]] = {}
    for seconds, tier in loads:
        if tier:
            by_tier.setdefault(tier, []).append(seconds)
    return {tier: statistics.median(values) for tier, values in by_tier.items()}


def document_economics(document: Document) -> Economics | None:
    """None until the document's token count is known (it is prefilled)."""
    if not document.n_tokens:
        return None
    if document.precompute_seconds:
        prefill = Timing(document.precompute_seconds, "measured", "this deployment's precompute")
    else:
        seconds = document.n_tokens / settings.ESTIMATED_PREFILL_TOKENS_PER_SECOND
        prefill = Timing(
            seconds, "estimate",
            f"{settings.ESTIMATED_PREFILL_TOKENS_PER_SECOND:g} tokens/s (no measured prefill)",
        )
    loads = _measured_loads(document)
    tiers = tier_timings(prefill.seconds, _median_by_tier(loads))
    if loads:
        load = Timing(statistics.median(seconds for seconds, _ in loads), "measured",
                      f"median time to first token of {len(loads)} loads")
    else:
        hot = tiers[0]
        load = Timing(hot["seconds"], "estimate", f"{hot['label']}, {hot['saving']:.3g}x")
    price = price_per_load_nano(document)
    return Economics(
        n_tokens=document.n_tokens,
        gpu_usd_per_hour=gpu_usd_per_hour(document.model_slug),
        prefill=prefill,
        load=load,
        tiers=tiers,
        kv_bytes=document.artifact_bytes,
        egress_usd_per_gb=settings.EGRESS_USD_PER_GB,
        price_per_load_usd=price / 1e9 if price is not None else None,
    )


def headline() -> dict | None:
    """The home page's live figures: the catalogue's best measured saving and its range."""
    from marketplace.selectors.documents import catalogue

    savings = []
    for doc in catalogue().exclude(precompute_seconds__isnull=True)[:50]:
        econ = document_economics(doc)
        if econ is not None and econ.saving and econ.load.source == "measured":
            savings.append((econ.saving, doc))
    if not savings:
        return None
    savings.sort(key=lambda pair: pair[0])
    return {"min": savings[0][0], "max": savings[-1][0], "best": savings[-1][1],
            "documents": len(savings)}
