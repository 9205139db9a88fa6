"""The one Celery app. Queues: "default" plus one GPU queue per registered model."""

import os

from celery import Celery
from kombu import Queue

from marketplace.queues import gpu_queue_name

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmarket.settings")

app = Celery("kvmarket")
app.config_from_object("django.conf:settings", namespace="CELERY")


def _configure_queues() -> None:
    from django.conf import settings

    queues = [Queue("default")] + [Queue(gpu_queue_name(slug)) for slug in settings.KVMARKET_MODELS]
    app.conf.task_queues = queues


app.on_after_configure.connect(lambda sender, **_: _configure_queues(), weak=False)
app.autodiscover_tasks()


@app.task(name="kvmarket.ping")
def ping(value: str = "pong") -> str:
    """Round-trip check used by health checks and the worker integration test."""
    return value
