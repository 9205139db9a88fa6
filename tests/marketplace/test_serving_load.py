"""The serving path under concurrency and faults: REAL GPU worker processes, PostgreSQL, Redis.

Two Celery GPU workers (separate processes, the built-in model on CPU, one KV directory) serve
loads over their HTTP endpoints; agents call a live server over HTTP, many at once:

* 16 agents on one document at once, streamed and not: all served, each charged once, no 5xx
  (the charge path locks only the Load and License rows, so concurrent charges on one
  document cannot deadlock on the Document or a User row);
* 40 requests racing for a 10-load license, retrying on 429 as told by Retry-After: exactly
  10 are served and charged;
* the worker holding the document is killed mid-request: the request fails cleanly uncharged
  or succeeds on the other worker, never both (this one runs last: it kills a worker).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from marketplace import registry
from marketplace.models import Document, DocumentStatus, License, Load, Role
from tests.marketplace.conftest import NANO, fund
from tests.marketplace.integration import (
    DOCUMENT_TEXT,
    GPU_QUEUES,
    skip_module_unless_worker_can_run,
    wait_for_live_worker,
)
from tests.support.accounts import make_api_key, make_user
from tests.support.celery_worker import start_celery_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

skip_module_unless_worker_can_run()

SLUG = "tiny-qwen3"
QUESTION = [{"role": "user", "content": "What did the keeper write every evening?"}]


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def artifact(kv_dir) -> dict:
    """Precomputed once in this process into the workers' KV directory."""
    from django.conf import settings

    from marketplace import engine

    before = settings.KV_STORE_DIR
    settings.KV_STORE_DIR = kv_dir
    engine.reset_store()
    try:
        return engine.precompute(slug=SLUG, text=DOCUMENT_TEXT)
    finally:
        settings.KV_STORE_DIR = before
        engine.reset_store()


@pytest.fixture(scope="module")
def gpu_workers(django_db_setup, django_db_blocker, kv_dir, artifact):
    env = {"KV_STORE_DIR": str(kv_dir), "GPU_WORKER_HEARTBEAT_SECONDS": "0.5"}
    with django_db_blocker.unblock(), \
            start_celery_worker(GPU_QUEUES, extra_env=env, ready_timeout=180) as first, \
            start_celery_worker(GPU_QUEUES, extra_env=env, ready_timeout=180) as second:
        yield [first, second]


@pytest.fixture
def document(gpu_workers, transactional_db, publisher_user, artifact) -> Document:
    for worker in gpu_workers:
        wait_for_live_worker(worker.hostname)
    return Document.objects.create(
        publisher=publisher_user, title="Skerry Point", text=DOCUMENT_TEXT, model_slug=SLUG,
        status=DocumentStatus.READY, n_tokens=artifact["n_tokens"],
        tokens_done=artifact["n_tokens"], tokens_total=artifact["n_tokens"],
        artifact_key=artifact["key"], artifact_bytes=artifact["bytes"],
    )


def _agent(document: Document, loads: int) -> tuple[str, int]:
    """A funded agent with a license for the document: (API key, license id)."""
    from marketplace.services.licenses import purchase_license

    agent = make_user(role=Role.AGENT)
    fund(agent, amount_nano=5 * NANO)
    lic, _ = purchase_license(agent=agent, document_id=document.pk, loads=loads)
    return make_api_key(agent), lic.pk


def _post(base: str, key: str, body: dict, *, stream: bool,
          idempotency: str | None = None) -> tuple[int, dict | str, dict]:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency:
        headers["Idempotency-Key"] = idempotency
    with httpx.Client(timeout=120) as client:
        if not stream:
            r = client.post(f"{base}/api/v1/chat/completions", json=body, headers=headers)
            return r.status_code, r.json(), dict(r.headers)
        with client.stream("POST", f"{base}/api/v1/chat/completions",
                           json={**body, "stream": True}, headers=headers) as r:
            text = r.read().decode()
            return r.status_code, text, dict(r.headers)


def _settlements() -> int:
    from ledger.models import Transaction

    return Transaction.objects.filter(kind="load_settlement").count()


def test_16_agents_on_one_document_at_once_are_each_served_and_charged_once(
    live_server, document
):
    from tests.ledger.invariants import assert_ledger_invariants

    agents = [_agent(document, loads=2) for _ in range(16)]
    start = threading.Barrier(16)

    def agent_run(i: int) -> list[int]:
        key, lic = agents[i]
        body = {"model": SLUG, "document": document.pk, "license": lic, "max_tokens": 8,
                "messages": QUESTION}
        start.wait()
        statuses = []
        for stream in (False, True):
            status, data, _ = _post(live_server.url, key, body, stream=stream)
            assert status == 200, data
            if stream:
                assert data.rstrip().endswith("data: [DONE]"), data
            statuses.append(status)
        return statuses

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(agent_run, range(16)))
    assert all(s == [200, 200] for s in results)
    assert Load.objects.filter(status="succeeded").count() == 32
    assert _settlements() == 32
    assert all(lic.loads_used == 2 for lic in License.objects.filter(document=document))
    workers_used = set(Load.objects.values_list("worker", flat=True))
    assert workers_used <= {w.hostname for w in _workers(document)}
    assert_ledger_invariants()


def _workers(document: Document) -> list:
    registry.forget()
    return [type("W", (), {"hostname": w.name})
            for w in registry.workers_for(slug=SLUG, artifact_key=document.artifact_key)]


@pytest.mark.usefixtures("sql_path")
def test_40_requests_racing_for_a_10_load_license_end_with_exactly_10_charged(
    live_server, document, settings
):
    settings.MAX_IN_FLIGHT_LOADS_PER_AGENT = 4  # so the race meets the cap's 429s too
    key, lic = _agent(document, loads=10)
    body = {"model": SLUG, "document": document.pk, "license": lic, "max_tokens": 6,
            "messages": QUESTION}
    start = threading.Barrier(40)
    seen: list[int] = []

    def request(i: int) -> int:
        start.wait()
        deadline = time.monotonic() + 180
        while True:
            try:
                status, data, headers = _post(live_server.url, key, body, stream=i % 2 == 1,
                                              idempotency=f"race-{i}")
            except httpx.TransportError:
                # The test server's small listen backlog resets some of 40 simultaneous
                # connections; an agent retries with the same Idempotency-Key (charged once).
                status, headers = 0, {"retry-after": "0.2"}
            seen.append(status)
            if status not in (0, 429) or time.monotonic() > deadline:
                return status
            time.sleep(float(headers.get("retry-after", "1")) * (0.5 + (i % 5) / 10))

    with ThreadPoolExecutor(40) as pool:
        final = list(pool.map(request, range(40)))
    assert final.count(200) == 10, final
    assert set(final) <= {200, 409}, final  # the rest: license_exhausted
    assert all(s < 500 for s in seen), seen  # 0: a connection reset, retried
    assert 429 in seen  # the in-flight cap was met, and retried
    assert Load.objects.filter(status="succeeded").count() == 10 == _settlements()
    lic_row = License.objects.get(pk=lic)
    assert lic_row.loads_used == 10 and lic_row.status == "exhausted"


def test_killing_the_worker_that_holds_the_document_mid_request_never_both_fails_and_charges(
    live_server, document, gpu_workers
):
    registry.forget()
    ranked = registry.workers_for(slug=SLUG, artifact_key=document.artifact_key)
    holder = next(w for w in gpu_workers if w.hostname == ranked[0].name)
    other = next(w for w in gpu_workers if w is not holder)
    key, lic = _agent(document, loads=3)
    body = {"model": SLUG, "document": document.pk, "license": lic, "max_tokens": 8,
            "messages": QUESTION}

    # Freeze the holder, so the request is sent to it and waits; then kill it mid-request.
    os.killpg(holder.process.pid, signal.SIGSTOP)
    outcome: dict = {}

    def call() -> None:
        outcome["status"], outcome["data"], _ = _post(live_server.url, key, body, stream=False,
                                                      idempotency="failover")

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()  # waiting on the frozen worker
    os.killpg(holder.process.pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    load = Load.objects.get(idempotency_key="failover")
    if outcome["status"] == 200:  # served by the other worker, charged once
        assert load.status == "succeeded" and load.worker == other.hostname
        assert _settlements() == 1 and load.amount_nano > 0
    else:  # failed cleanly: JSON error, uncharged, reservation released
        assert outcome["status"] in (502, 503, 504), outcome
        assert load.status == "failed" and _settlements() == 0
        assert License.objects.get(pk=lic).loads_used == 0
    assert outcome["status"] == 200, outcome  # with a live second worker it is served

    # The dead worker's row goes stale; later loads go to the survivor without delay.
    status, data, _ = _post(live_server.url, key, body, stream=True)
    assert status == 200 and data.rstrip().endswith("data: [DONE]")
    assert Load.objects.filter(worker=other.hostname, status="succeeded").count() >= 1
