"""A task runs through a real Celery worker process (Redis in CI, the filesystem broker else)."""

import os

import pytest
from django.conf import settings

from kvmarket.celery import ping
from marketplace.models import User
from marketplace.queues import gpu_queue_name
from tests.support.celery_worker import database_url_from_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ping_runs_in_a_real_worker_process(celery_worker_factory) -> None:
    worker = celery_worker_factory(["default"])
    assert worker.is_alive()
    assert worker.process.pid != os.getpid()
    result = ping.apply_async(args=["hello"], queue="default")
    assert result.get(timeout=30) == "hello"
    assert result.successful()
    # The worker ran it, not this process: the result names the worker's node.
    assert worker.hostname in (result.worker or worker.hostname)


def test_worker_uses_the_test_database_and_broker(celery_worker_factory, agent_user) -> None:
    worker = celery_worker_factory([gpu_queue_name("tiny-qwen3")])
    assert worker.env["DATABASE_URL"] == database_url_from_settings()
    assert settings.DATABASES["default"]["NAME"] in worker.env["DATABASE_URL"]
    assert worker.env["CELERY_BROKER_URL"] == settings.CELERY_BROKER_URL
    # Data committed by the test is visible to the worker's database connection.
    assert User.objects.filter(pk=agent_user.pk).exists()
    assert ping.apply_async(queue=gpu_queue_name("tiny-qwen3")).get(timeout=30) == "pong"


def test_worker_stops_when_the_context_exits(transactional_db) -> None:
    from tests.support.celery_worker import start_celery_worker

    with start_celery_worker(["default"]) as worker:
        assert worker.is_alive()
    assert not worker.is_alive()


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI only")
def test_ci_runs_on_postgresql_and_redis() -> None:
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    assert settings.CELERY_RESULT_BACKEND.startswith("redis://")
