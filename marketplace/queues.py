"""Celery queue names (plain functions: kvmarket.celery imports this before Django is set up)."""


def gpu_queue_name(model_slug: str) -> str:
    """The queue that the GPU workers serving one model consume."""
    return f"gpu.{model_slug}"
