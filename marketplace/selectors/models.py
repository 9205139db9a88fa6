"""The registry's models and whether each is ready to serve (for the dashboards)."""

from __future__ import annotations

from typing import Any

from django.conf import settings


def model_status() -> list[dict[str, Any]]:
    """Per registry model, in registry order: slug, label, device, and ``ready`` with the
    names of the live workers serving it. A worker announces itself only after it has loaded
    its models (marketplace.workers.prepare_models), so a listed worker means the model is
    loaded; none means no worker is up yet, or it is still loading (a GGUF model's first start
    converts it)."""
    from marketplace import registry

    serving: dict[str, list[str]] = {}
    for worker in registry.live_workers():
        for slug in worker.model_slugs:
            serving.setdefault(slug, []).append(worker.name)
    return [
        {
            "slug": slug,
            "label": cfg.get("label", slug),
            "device": cfg.get("device", "cpu"),
            "ready": bool(serving.get(slug)),
            "workers": sorted(serving.get(slug, [])),
        }
        for slug, cfg in settings.KVMARKET_MODELS.items()
    ]
