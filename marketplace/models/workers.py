"""The registry of GPU workers that serve loads over their internal HTTP endpoint."""

from django.db import models


class GpuWorker(models.Model):
    """A live GPU worker process: where to reach it, what it serves, its last heartbeat.

    Each worker writes its own row every few seconds (marketplace.registry) and deletes it on a
    clean shutdown; a row whose heartbeat is older than GPU_WORKER_STALE_SECONDS is not routed
    to (the worker died without saying so).
    """

    name = models.CharField(max_length=255, unique=True)
    url = models.CharField(max_length=255)
    model_slugs = models.JSONField(default=list)  # model slugs served
    hot_keys = models.JSONField(default=list)  # artifact keys in GPU / pinned host memory
    in_flight = models.PositiveIntegerField(default=0)  # loads queued or running
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.url})"
