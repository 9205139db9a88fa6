"""Shared fixtures: users of each role, an agent API key and client, and real Celery workers.

- agent_user / publisher_user / staff_user: users (password tests.support.accounts.TEST_PASSWORD)
- agent_key: a raw API key of agent_user; api_client: DRF APIClient sending "Bearer <agent_key>"
- browser_page: a playwright Page in Debian's chromium; artifacts_dir: test-artifacts/ for
  screenshots
- celery_worker_factory: start(queues, **kw) runs a real worker process (see
  tests.support.celery_worker.start_celery_worker); it needs committed data, so it pulls in
  `transactional_db`. Workers stop when the test ends.
"""

from __future__ import annotations

# Django-dependent helpers are imported inside the fixtures, so the inference tests also run
# with Django absent (`pytest tests/inference -p no:django`).
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.celery_worker import CeleryWorker, start_celery_worker

ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def password() -> str:
    from tests.support.accounts import TEST_PASSWORD

    return TEST_PASSWORD


@pytest.fixture
def agent_user(db):
    from marketplace.models import Role
    from tests.support.accounts import make_user

    return make_user(role=Role.AGENT, display_name="Test Agent")


@pytest.fixture
def publisher_user(db):
    from marketplace.models import Role
    from tests.support.accounts import make_user

    return make_user(role=Role.PUBLISHER, display_name="Test Publisher")


@pytest.fixture
def staff_user(db):
    from marketplace.models import Role
    from tests.support.accounts import make_user

    return make_user(role=Role.STAFF, display_name="Test Staff")


@pytest.fixture
def agent_key(agent_user) -> str:
    from tests.support.accounts import make_api_key

    return make_api_key(agent_user)


@pytest.fixture
def api_client(agent_key: str):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {agent_key}")
    return client


@pytest.fixture
def anon_api_client():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def celery_worker_factory(transactional_db) -> Iterator[Callable[..., CeleryWorker]]:
    with contextlib.ExitStack() as stack:

        def start(queues: list[str], **kwargs) -> CeleryWorker:
            return stack.enter_context(start_celery_worker(queues, **kwargs))

        yield start


@pytest.fixture(scope="session")
def live_server(django_db_setup, live_server):
    """pytest-django's live server, set up after (so torn down before) the test database:
    its thread's connection is closed before the test database is dropped."""
    return live_server


@pytest.fixture
def browser_page(artifacts_dir: Path):
    """A playwright Page in Debian's chromium (skips when /usr/bin/chromium is missing)."""
    from tests.support.browser import chromium_available, chromium_page

    if not chromium_available():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with chromium_page() as page:
        yield page


@pytest.fixture
def artifacts_dir() -> Path:
    """Where browser tests write screenshots (gitignored)."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR


def _django_configured() -> bool:
    """False when the tests run without Django (the inference library's own tests)."""
    try:
        from django.conf import settings
    except ImportError:
        return False
    return settings.configured


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing() -> Iterator[None]:
    """PBKDF2 costs ~0.5 s a user on a small machine: tests hash with MD5 instead."""
    if not _django_configured():
        yield
        return
    from django.test import override_settings

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


@pytest.fixture(autouse=True, scope="session")
def _broker_keys_per_xdist_worker() -> Iterator[None]:
    """Under pytest-xdist, each test process gets its own broker key prefix on the shared Redis
    database, so a Celery worker started by one process never takes another's tasks (or answers
    its broadcasts). Set before any task is sent; the worker subprocesses inherit it."""
    xdist_worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not xdist_worker or not _django_configured():
        yield
        return
    from django.conf import settings

    from kvmarket.celery import app

    if not settings.CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
        yield
        return
    prefix = f"{settings.BROKER_KEY_PREFIX}{xdist_worker}."
    os.environ["CELERY_BROKER_KEY_PREFIX"] = prefix
    options = {**app.conf.broker_transport_options, "global_keyprefix": prefix}
    # Celery reads the namespaced Django setting before its own key: set both.
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = options
    app.conf.broker_transport_options = options
    # Connections made before (a session fixture may have sent a task) keep the old options.
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    yield


@pytest.fixture(autouse=True)
def _clear_cache() -> Iterator[None]:
    """Throttle counters live in the cache; tariffs, documents and API keys in process caches:
    start every test with empty ones."""
    if not _django_configured():
        yield
        return
    from django.core.cache import cache

    from marketplace.selectors.accounts import forget_api_key
    from marketplace.services import completions

    cache.clear()
    completions.forget_tariffs()
    completions.forget_documents()
    forget_api_key()
    yield
