"""Marketplace test helpers: funded agents, ready documents, a fake GPU worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from marketplace.models import Document, Role
from tests.support.accounts import make_api_key, make_user
from tests.support.factories import ReadyDocumentFactory
from tests.support.money import NANO, fund  # noqa: F401 (re-exported for the tests)


def wallet(agent) -> int:
    from ledger.selectors import wallet_balance

    return wallet_balance(agent)


def make_ready_document(publisher, *, n_tokens: int = 1000, price: int | None = None,
                        listed: bool = True, text: str | None = None) -> Document:
    fields = {"text": text} if text else {}
    return ReadyDocumentFactory(
        publisher=publisher, n_tokens=n_tokens, price_per_load_nano=price, listed=listed, **fields
    )


@pytest.fixture
def funded_agent(agent_user):
    fund(agent_user, amount_nano=10 * NANO)
    return agent_user


@pytest.fixture
def ready_document(publisher_user) -> Document:
    return make_ready_document(publisher_user)


@pytest.fixture
def other_agent_client(db):
    from rest_framework.test import APIClient

    agent = make_user(role=Role.AGENT)
    fund(agent, amount_nano=10 * NANO)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {make_api_key(agent)}")
    client.user = agent
    return client


@pytest.fixture
def publisher_client(publisher_user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(publisher_user)
    return client


FAKE_RESULT = {
    "ok": True,
    "worker": "fake@worker",
    "text": "Hello world.",
    "deltas": ["Hello", " world", "."],
    "finish_reason": "stop",
    "usage": {"cached_tokens": 1000, "suffix_tokens": 12, "output_tokens": 3},
    "timings": {"load_s": 0.01, "ttft_s": 0.02, "total_s": 0.05},
}


class FakeStream:
    """A worker's event stream built from a canned result: its deltas, then the final event."""

    def __init__(self, result: dict[str, Any], worker: str = "fake@worker") -> None:
        self.worker = result.get("worker", worker)
        self.connect_s = 0.0
        self.closed = False
        self.read = 0  # events taken: a stream closed with none read relayed nothing
        usage = result.get("usage") or {}
        events: list[dict[str, Any]] = []
        for n, text in enumerate(result.get("deltas") or [], start=1):
            event = {"type": "delta", "text": text, "n": n}
            if n == 1:
                event["usage"] = {"cached_tokens": usage.get("cached_tokens", 0),
                                  "suffix_tokens": usage.get("suffix_tokens", 0)}
            events.append(event)
        final = {k: v for k, v in result.items() if k not in ("deltas", "ok")}
        events.append({"type": "final", **final, "worker": self.worker})
        self.events = events

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.closed or not self.events:
            raise StopIteration
        self.read += 1
        return self.events.pop(0)

    def close(self) -> None:
        self.closed = True


class FakeWorker:
    """Replaces the dispatch to a GPU worker: streams a canned result or raises."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.streams: list[FakeStream] = []
        self.returned = 0  # calls that returned or raised
        self.behaviour: Callable[[dict[str, Any]], dict[str, Any]] = lambda call: dict(FAKE_RESULT)

    def __call__(self, *, load, document, params, timeout, exclude=frozenset(), eager=True):
        call = {"load": load, "document": document, "params": params, "timeout": timeout,
                "eager": eager}
        self.calls.append(call)
        try:
            stream = FakeStream(self.behaviour(call))
            self.streams.append(stream)
            return stream
        finally:
            self.returned += 1

    def relayed(self) -> int:
        """Generations whose events the web read (started early but cancelled ones are not)."""
        return sum(1 for stream in self.streams if stream.read)

    def all_cancelled(self, timeout: float = 5.0) -> bool:
        """Every generation started was closed unread (polled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.returned == len(self.calls) and all(
                stream.closed and not stream.read for stream in self.streams
            ):
                return True
            time.sleep(0.01)
        return False


@pytest.fixture(params=["one_query", "orm"])
def sql_path(request, monkeypatch) -> str:
    """Runs the test on each path of the reservation and the charge: the one-query paths
    (PostgreSQL: a new key's reservation, a served load's charge) and the ORM's (SQLite's, and
    the retries')."""
    from django.db import connection

    from marketplace.services import completions

    if request.param == "one_query" and connection.vendor != "postgresql":
        pytest.skip("the one-query paths run on PostgreSQL only")
    monkeypatch.setattr(completions, "ONE_QUERY_PATHS", request.param == "one_query")
    return request.param


@pytest.fixture
def fake_worker(monkeypatch) -> FakeWorker:
    from marketplace.services import completions

    worker = FakeWorker()
    monkeypatch.setattr(completions, "dispatch_generation", worker)
    return worker


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    """Users are made in almost every test; PBKDF2 would dominate the runtime."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
