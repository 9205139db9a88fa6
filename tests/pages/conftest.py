"""Page-test helpers: logged-in Django test clients per role, the precompute task boundary,
ready documents and settled loads made through the real marketplace and ledger services."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.test import Client

from marketplace.models import Document, Role
from tests.support.accounts import make_user
from tests.support.money import NANO, fund  # noqa: F401 (re-exported for the tests)

_seq = itertools.count(1)


def login_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def publisher_client(publisher_user) -> Client:
    return login_client(publisher_user)


@pytest.fixture
def other_publisher(db):
    return make_user(role=Role.PUBLISHER, display_name="Other Publisher")


@pytest.fixture
def other_publisher_client(other_publisher) -> Client:
    return login_client(other_publisher)


@pytest.fixture
def agent_client(agent_user) -> Client:
    return login_client(agent_user)


@dataclass
class SentTasks:
    """Precompute tasks handed to Celery (recorded at the broker boundary, never run)."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, args=None, kwargs=None, **options):
        self.calls.append({"args": list(args or []), "kwargs": kwargs or {}, **options})
        return _Sent(f"task-{next(_seq)}")


@dataclass
class _Sent:
    id: str


@pytest.fixture
def sent_tasks(monkeypatch) -> SentTasks:
    """Replace only the broker send of marketplace.tasks.precompute_document."""
    from marketplace import tasks

    sent = SentTasks()
    monkeypatch.setattr(tasks.precompute_document, "apply_async", sent)
    return sent


@pytest.fixture
def stripe_on(settings):
    settings.STRIPE_SECRET_KEY = "sk_test_kvmarket_pages"
    settings.STRIPE_API_BASE = ""
    settings.STRIPE_MAX_NETWORK_RETRIES = 0


@pytest.fixture
def stripe_off(settings):
    settings.STRIPE_SECRET_KEY = ""


VERIFICATION = {
    "passed": True, "bitwise_equal": True, "kv_equal": True, "greedy_matched": 24,
    "greedy_total": 24, "match_rate": 1.0, "max_logit_diff": 0.0, "dtype": "float32",
    "device": "cpu",
}


def make_document(publisher, *, status: str = "ready", n_tokens: int = 1000,
                  price: int | None = None, title: str | None = None, **fields) -> Document:
    text = fields.pop("text", f"Document text {next(_seq)}.")
    ready = status == "ready"
    return Document.objects.create(
        publisher=publisher,
        title=title or f"Doc {next(_seq)}",
        text=text,
        model_slug="tiny-qwen3",
        price_per_load_nano=price,
        status=status,
        n_tokens=n_tokens if ready else None,
        tokens_done=fields.pop("tokens_done", n_tokens if ready else 0),
        tokens_total=fields.pop("tokens_total", n_tokens if ready else 0),
        artifact_key=f"{next(_seq):064x}" if ready else "",
        artifact_bytes=150_000 * n_tokens if ready else None,
        precompute_flops=2.5e9 * n_tokens if ready else None,
        precompute_seconds=0.42 if ready else None,
        verification=fields.pop("verification", dict(VERIFICATION) if ready else None),
        **fields,
    )


WORKER_RESULT = {
    "ok": True, "worker": "gpu@test", "text": "Hello.", "deltas": ["Hello", "."],
    "finish_reason": "stop",
    "usage": {"cached_tokens": 1000, "suffix_tokens": 12, "output_tokens": 3},
    "timings": {"load_s": 0.01, "ttft_s": 0.02, "total_s": 0.05, "tier": "host"},
}


def settled_load(agent, document: Document, *, loads: int = 2):
    """Buy a license and settle one load through the real services, as the API does after a
    worker's result came back (reserve_load -> charge_load)."""
    from marketplace.models import LoadKind
    from marketplace.services.completions import charge_load, reserve_load
    from marketplace.services.licenses import purchase_license

    license, _ = purchase_license(agent=agent, document_id=document.pk, loads=loads)
    reservation = reserve_load(
        agent=agent, license_id=license.pk, document_id=document.pk, kind=LoadKind.CHAT,
        idempotency_key=f"load-{next(_seq)}", payload={"messages": []},
    )
    load = charge_load(load=reservation.load, result=dict(WORKER_RESULT))
    return license, load


@pytest.fixture
def kv_dir(tmp_path, settings):
    """The worker's KV store; this process (and its live server thread) reads the same one."""
    from marketplace import engine, registry

    settings.KV_STORE_DIR = tmp_path / "kv"
    engine.reset_store()
    registry.forget()
    yield settings.KV_STORE_DIR
    engine.reset_store()
