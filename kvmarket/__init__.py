"""kvmarket Django project: settings, URLs, the Celery app."""

from kvmarket.celery import app as celery_app

__all__ = ["celery_app"]
