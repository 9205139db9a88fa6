"""The request path through a real GPU worker endpoint (in this process, the built-in model).

The worker's HTTP server (marketplace.worker_server: uvicorn in a thread, the real scheduler
and engine) runs here and is announced in the registry; the API calls it over HTTP exactly as
in production. Covered: the endpoint's secret, streaming (first chunk before the generation
ends), a client disconnect (stops the generation, charged for what was made), failover, no
worker / busy answers, the charge outbox (a failing charge is charged later, once), the sweep.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from marketplace import engine, registry, worker_client, worker_server
from marketplace.models import Document, DocumentStatus, License, Load, LoadKind
from marketplace.services import completions as completion_services
from tests.marketplace.conftest import NANO, fund

pytestmark = pytest.mark.django_db

SLUG = "tiny-qwen3"
CHAT = "/api/v1/chat/completions"
TEXT = (
    "The lighthouse keeper of Skerry Point kept a logbook in green ink. Every evening at dusk "
    "he lit the lamp, wound the clockwork that turned the lens, and wrote the weather."
)
QUESTION = [{"role": "user", "content": "What did the keeper write every evening?"}]


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture
def artifact(settings, kv_dir) -> dict:
    settings.KV_STORE_DIR = kv_dir
    engine.reset_store()
    yield engine.precompute(slug=SLUG, text=TEXT)
    engine.reset_store()


@pytest.fixture
def worker(artifact):
    server = worker_server.WorkerServer(name="inproc@test", model_slugs=[SLUG],
                                        host="127.0.0.1", port=0)
    server.start(heartbeat=False)
    assert server.wait_started()
    server.announce()
    registry.forget()
    worker_client.reset_client()
    yield server
    server.stop()
    registry.forget()
    worker_client.reset_client()


@pytest.fixture
def document(publisher_user, artifact) -> Document:
    return Document.objects.create(
        publisher=publisher_user, title="Skerry Point", text=TEXT, model_slug=SLUG,
        status=DocumentStatus.READY, n_tokens=artifact["n_tokens"],
        tokens_done=artifact["n_tokens"], tokens_total=artifact["n_tokens"],
        artifact_key=artifact["key"], artifact_bytes=artifact["bytes"],
    )


@pytest.fixture
def license_id(api_client, agent_user, document) -> int:
    fund(agent_user, amount_nano=5 * NANO)
    r = api_client.post("/api/v1/licenses", {"document": document.pk, "loads": 5},
                        format="json")
    assert r.status_code == 201, r.content
    return r.json()["id"]


def _body(document: Document, license_id: int, **extra: object) -> dict:
    return {"model": SLUG, "document": document.pk, "license": license_id, "max_tokens": 12,
            "temperature": 0, "messages": QUESTION, **extra}


def _settlements() -> int:
    from ledger.models import Transaction

    return Transaction.objects.filter(kind="load_settlement").count()


@pytest.fixture
def slow_engine(monkeypatch):
    """Each engine item (delta or result) takes 0.15 s more; records how far it got."""
    import inference

    real = inference.generate_stream
    state = {"started": 0, "items": 0, "finished": False, "closed": threading.Event()}

    def slow(*args, **kwargs):
        state["started"] += 1
        inner = real(*args, **kwargs)

        def items():
            try:
                for item in inner:
                    time.sleep(0.15)
                    state["items"] += 1
                    yield item
                state["finished"] = True
            finally:
                inner.close()
                state["closed"].set()

        return items()

    monkeypatch.setattr(inference, "generate_stream", slow)
    return state


def _sse_events(chunks) -> list[dict]:
    out = []
    for raw in b"".join(chunks).decode().split("\n\n"):
        if raw.startswith("data: ") and raw != "data: [DONE]":
            out.append(json.loads(raw[6:]))
    return out


# --- the endpoint itself ---------------------------------------------------------------------


def test_the_worker_endpoint_refuses_requests_without_the_secret(worker, document):
    url = f"{worker.url}/v1/generate"
    body = {"model": SLUG, "artifact_key": document.artifact_key, "messages": QUESTION,
            "max_tokens": 4}
    assert httpx.post(url, json=body).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer not-the-secret"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    right = httpx.post(url, json=body,
                       headers={"Authorization": f"Bearer {registry.worker_secret()}"})
    assert right.status_code == 200
    events = [json.loads(line) for line in right.text.splitlines()]
    assert events[-1]["type"] == "final" and events[-1]["worker"] == "inproc@test"
    assert "".join(e["text"] for e in events if e["type"] == "delta") == events[-1]["text"]
    assert httpx.get(f"{worker.url}/healthz").json()["models"] == [SLUG]


# --- through the API -------------------------------------------------------------------------


def test_a_completion_runs_on_the_worker_with_per_phase_timings(
    worker, api_client, document, license_id, caplog
):
    caplog.set_level(logging.INFO)  # the root level of the settings
    r = api_client.post(CHAT, _body(document, license_id), format="json")
    assert r.status_code == 200, r.content
    data = r.json()
    assert data["choices"][0]["message"]["content"]
    timings = data["kvmarket"]["timings"]
    for phase in ("auth", "reserve", "route", "queue", "engine_ttft", "decode", "charge"):
        assert phase in timings and timings[phase] >= 0
    assert "engine_ttft;dur=" in r["Server-Timing"]
    load = Load.objects.get()
    assert load.status == "succeeded" and load.worker == "inproc@test"
    assert load.amount_nano > 0 and _settlements() == 1
    assert data["usage"]["completion_tokens"] == load.output_tokens > 0
    # One log line per load, with its phases.
    assert any(r.name == "marketplace.services.completions" and "engine_ttft=" in r.getMessage()
               for r in caplog.records)


def test_consecutive_loads_reuse_one_connection_to_the_worker(
    worker, api_client, document, license_id
):
    """A worker stream read to its end goes back to the web's pool; one closed at its last event
    (before the body's end) would cost every load a new connection to the worker."""
    seen = []
    for stream in (False, True, False):
        r = api_client.post(CHAT, {**_body(document, license_id), "stream": stream},
                            format="json")
        assert r.status_code == 200
        if stream:
            b"".join(r.streaming_content)
        seen.append([id(connection) for connection in worker_client.connections().idle()])
    assert len(seen[0]) == 1 and seen == [seen[0]] * 3


def test_a_request_on_an_idle_connection_the_worker_closed_is_sent_again(
    worker, api_client, document, license_id, monkeypatch
):
    """The worker may close an idle connection just as a load is written on it: the load is
    sent again on a new connection, not failed (nothing of it was read)."""
    assert api_client.post(CHAT, _body(document, license_id), format="json").status_code == 200
    (idle,) = worker_client.connections().idle()
    for transport in _transports(worker):
        transport.close()
    deadline = time.monotonic() + 5
    while worker_client._open_and_quiet(idle) and time.monotonic() < deadline:
        time.sleep(0.01)
    # As if the close came after the check: the request goes out on the closed connection.
    monkeypatch.setattr(worker_client, "_open_and_quiet", lambda conn: True)
    r = api_client.post(CHAT, _body(document, license_id), format="json")
    assert r.status_code == 200, r.content
    assert Load.objects.filter(status="succeeded").count() == 2 and _settlements() == 2
    assert [id(c) for c in worker_client.connections().idle()] != [id(idle)]


def test_a_busy_worker_tried_first_passes_the_load_to_the_next(
    worker, api_client, document, license_id
):
    """The early start's worker answers busy once the load is reserved: the next worker runs
    it; the load is charged once."""

    class FullScheduler:
        def submit(self, job):
            raise engine.Busy("full")

        def in_flight(self) -> int:
            return 0

    busy = worker_server.WorkerServer(name="busy@test", model_slugs=[SLUG], host="127.0.0.1",
                                      port=0)
    busy.app.scheduler = FullScheduler()
    busy.start(heartbeat=False)
    try:
        assert busy.wait_started()
        registry.announce(name="busy@test", url=busy.url, model_slugs=[SLUG],
                          hot_keys=[document.artifact_key], in_flight=0,
                          started_at=timezone.now())
        registry.forget()
        assert registry.workers_for(slug=SLUG, artifact_key=document.artifact_key)[0].name == \
            "busy@test"
        for stream in (False, True):
            r = api_client.post(CHAT, _body(document, license_id, stream=stream), format="json")
            assert r.status_code == 200, r.content
            if stream:
                b"".join(r.streaming_content)
    finally:
        busy.stop()
    assert [load.worker for load in Load.objects.order_by("pk")] == ["inproc@test"] * 2
    assert _settlements() == 2


def test_the_worker_endpoint_writes_each_token_at_once(worker):
    """asyncio sets TCP_NODELAY only on the connections of a socket made for IPPROTO_TCP; without
    it a token's small write waits behind the previous one for the web's delayed ACK (about
    40 ms a token on a reused connection)."""
    import socket

    assert worker.sock.proto == socket.IPPROTO_TCP
    with socket.create_connection(("127.0.0.1", worker.port)) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.1 200")
        accepted = [t.get_extra_info("socket") for t in _transports(worker)]  # kept alive
        assert accepted and all(
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)


def _transports(worker) -> list:
    """The worker server's open connections (uvicorn's protocols hold their transports)."""
    return [c.transport for c in worker.server.server_state.connections]


def test_stream_sends_the_first_chunk_before_the_generation_ends(
    worker, api_client, document, license_id, slow_engine
):
    r = api_client.post(CHAT, _body(document, license_id, stream=True), format="json")
    assert r.status_code == 200, r.content
    chunks = iter(r.streaming_content)
    first = [next(chunks), next(chunks)]  # the role chunk, then the first token's text
    assert not slow_engine["finished"]  # the engine is still generating
    events = _sse_events(first)
    assert events[1]["choices"][0]["delta"]["content"]
    rest = list(chunks)
    assert rest[-1] == b"data: [DONE]\n\n"
    assert slow_engine["finished"]
    load = Load.objects.get()
    assert load.status == "succeeded" and _settlements() == 1


def test_a_client_disconnect_stops_the_generation_and_charges_what_was_made(
    transactional_db, worker, api_client, document, license_id, slow_engine
):
    # transactional_db: closing the response ends the "request" (request_finished), which
    # closes the database connection; a test inside one transaction could not go on.
    from ledger.selectors import tariff_for

    r = api_client.post(CHAT, _body(document, license_id, stream=True, max_tokens=40),
                        format="json")
    assert r.status_code == 200, r.content
    chunks = iter(r.streaming_content)
    next(chunks), next(chunks)  # the role chunk and the first text: then the agent leaves
    r.close()  # what a server does when its write to the gone client fails
    assert slow_engine["closed"].wait(15)  # the worker saw the disconnect and stopped
    assert not slow_engine["finished"] and slow_engine["items"] < 40
    load = Load.objects.get()
    assert load.status == "succeeded" and _settlements() == 1
    assert 1 <= load.output_tokens < 40 and load.suffix_tokens > 0
    assert load.response["finish_reason"] == "disconnected"
    price = tariff_for(SLUG).compute_price_nano(load.suffix_tokens, load.output_tokens)
    assert load.compute_nano == int(price) and load.amount_nano > 0


def test_a_reservation_that_fails_after_the_job_started_cancels_it_uncharged(
    worker, api_client, agent_user, document, license_id, slow_engine, monkeypatch
):
    # The generation is sent to the worker before the reservation: here the reservation
    # fails only once the engine is running, and finds the license used up.
    from ledger.selectors import wallet_balance
    from marketplace.services import completions

    License.objects.filter(pk=license_id).update(loads_used=5)  # all 5 loads used
    real_reserve = completions.reserve_load

    def reserve_once_started(**kwargs):
        deadline = time.monotonic() + 15
        while not slow_engine["started"] and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_reserve(**kwargs)

    monkeypatch.setattr(completions, "reserve_load", reserve_once_started)
    before = wallet_balance(agent_user)
    r = api_client.post(CHAT, _body(document, license_id, stream=True, max_tokens=40),
                        format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "license_exhausted"
    assert slow_engine["started"] == 1
    assert slow_engine["closed"].wait(15)  # the worker saw the stream closed and stopped
    assert not slow_engine["finished"] and slow_engine["items"] < 40
    assert not Load.objects.exists() and _settlements() == 0
    assert wallet_balance(agent_user) == before
    assert License.objects.get(pk=license_id).loads_used == 5


def test_failover_to_the_next_worker_when_the_first_is_unreachable(
    worker, api_client, document, license_id
):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    # The dead worker holds the artifact "hot", so it is tried first.
    registry.announce(name="dead@test", url=f"http://127.0.0.1:{dead_port}", model_slugs=[SLUG],
                      hot_keys=[document.artifact_key], in_flight=0, started_at=timezone.now())
    registry.forget()
    assert registry.workers_for(slug=SLUG, artifact_key=document.artifact_key)[0].name == \
        "dead@test"
    r = api_client.post(CHAT, _body(document, license_id), format="json")
    assert r.status_code == 200, r.content
    assert Load.objects.get().worker == "inproc@test" and _settlements() == 1


def test_no_live_worker_is_503_with_retry_after_and_uncharged(
    api_client, document, license_id
):
    registry.forget()
    r = api_client.post(CHAT, _body(document, license_id), format="json")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    assert r["Retry-After"]
    load = Load.objects.get()
    assert load.status == "failed" and load.amount_nano == 0 and _settlements() == 0
    assert License.objects.get(pk=license_id).loads_used == 0


def test_a_busy_worker_is_429_with_retry_after_and_uncharged(
    worker, api_client, document, license_id, monkeypatch
):
    def full(self, job):
        raise engine.Busy("full")

    monkeypatch.setattr(engine.Scheduler, "submit", full)
    r = api_client.post(CHAT, _body(document, license_id, stream=True), format="json")
    assert r.status_code == 429 and r.json()["error"]["code"] == "busy"
    assert r["Retry-After"] == "1"
    assert Load.objects.get().status == "failed" and _settlements() == 0


def test_an_engine_refusal_before_the_first_token_is_json_and_uncharged(
    worker, api_client, document, license_id, monkeypatch
):
    # The web's early context bound is off here: this is the worker's own exact check.
    monkeypatch.setattr(completion_services, "check_prompt_fits", lambda **_: None)
    too_long = [{"role": "user", "content": "word " * 5000}]
    r = api_client.post(CHAT, _body(document, license_id, stream=True, messages=too_long),
                        format="json")
    assert r.status_code == 422 and r["Content-Type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_request"
    assert Load.objects.get().status == "failed" and _settlements() == 0


# --- the charge outbox and the sweep ---------------------------------------------------------


def test_a_failed_charge_leaves_the_load_served_and_it_is_charged_once_later(
    worker, api_client, document, license_id, monkeypatch
):
    from ledger import services as ledger_services
    from marketplace.services import completions

    real = ledger_services.settle_load
    failures = {"left": completions.CHARGE_ATTEMPTS}  # every attempt of the request fails

    def flaky(**kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("the database went away mid-charge")
        return real(**kwargs)

    monkeypatch.setattr(ledger_services, "settle_load", flaky)
    r = api_client.post(CHAT, _body(document, license_id), format="json",
                        HTTP_IDEMPOTENCY_KEY="outbox")
    assert r.status_code == 200, r.content  # served: the agent gets its answer
    assert r.json()["kvmarket"]["charge_pending"] is True
    load = Load.objects.get()
    assert load.status == "served" and load.response["final"] and _settlements() == 0

    # The sweep charges it; a second sweep and a retry of the request charge nothing more.
    assert completions.sweep_loads()["charged"] == 1
    assert completions.sweep_loads()["charged"] == 0
    again = api_client.post(CHAT, _body(document, license_id), format="json",
                            HTTP_IDEMPOTENCY_KEY="outbox")
    assert again.status_code == 200 and again["Idempotent-Replayed"] == "true"
    assert again.json()["choices"] == r.json()["choices"]
    load.refresh_from_db()
    assert load.status == "succeeded" and load.amount_nano > 0 and _settlements() == 1


def test_an_answer_whose_charge_fails_as_the_database_goes_away_is_still_given(
    worker, api_client, document, license_id, monkeypatch
):
    """The charge fails because the database went away after the result was recorded: the
    agent still gets the answer (not a 503 for a load the sweep will charge)."""
    import contextlib

    from django.db import OperationalError, connection

    from marketplace.services import completions

    def down(execute, sql, params, many, context):
        raise OperationalError("the database is down")

    outage = contextlib.ExitStack()
    real = completions.charge_load
    state = {"down": True}

    def charge_fails(**kwargs):
        if not state["down"]:
            return real(**kwargs)
        if state["down"] is True:  # from the first attempt on, no query gets through
            outage.enter_context(connection.execute_wrapper(down))
            state["down"] = "since"
        raise OperationalError("the database is down")

    monkeypatch.setattr(completions, "charge_load", charge_fails)
    monkeypatch.setattr(completions, "CHARGE_RETRY_SECONDS", 0.0)
    with outage:
        r = api_client.post(CHAT, _body(document, license_id), format="json")
    assert r.status_code == 200, r.content
    assert r.json()["kvmarket"]["charge_pending"] is True and r.json()["choices"]
    state["down"] = False
    assert Load.objects.get().status == "served"
    assert completions.sweep_loads()["charged"] == 1 and _settlements() == 1


def _flaky_record(monkeypatch, fail_call: int) -> None:
    """record_served raises OperationalError (the database went away) on its fail_call-th call."""
    from django.db import OperationalError

    from marketplace.services import completions

    real, calls = completions.record_served, {"n": 0}

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == fail_call:
            raise OperationalError("the database went away")
        return real(**kwargs)

    monkeypatch.setattr(completions, "record_served", flaky)


def _stream_license(client, document) -> dict:
    lic = client.post("/api/v1/licenses", {"document": document.pk, "loads": 2},
                      format="json").json()["id"]
    return {"model": SLUG, "document": document.pk, "license": lic, "messages": QUESTION,
            "stream": True}


def test_a_stream_whose_first_record_fails_sends_no_token_and_is_released(
    fake_worker, api_client, ready_document, funded_agent, monkeypatch
):
    body = _stream_license(api_client, ready_document)
    _flaky_record(monkeypatch, fail_call=1)
    r = api_client.post(CHAT, body, format="json")
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
    load = Load.objects.get()
    assert load.status == "failed" and _settlements() == 0
    assert License.objects.get(pk=body["license"]).loads_used == 0


def test_a_stream_whose_last_record_fails_ends_normally_and_is_charged_by_the_sweep(
    fake_worker, api_client, ready_document, funded_agent, monkeypatch
):
    from marketplace.services import completions

    body = _stream_license(api_client, ready_document)
    _flaky_record(monkeypatch, fail_call=2)  # the first token's record works, the end's not
    r = api_client.post(CHAT, body, format="json")
    assert r.status_code == 200, r.content
    chunks = list(r.streaming_content)
    assert chunks[-1] == b"data: [DONE]\n\n"  # the agent got every token
    load = Load.objects.get()
    assert load.status == "served" and _settlements() == 0  # not lost: in the outbox
    Load.objects.update(heartbeat_at=timezone.now() - timedelta(seconds=31))
    assert completions.sweep_loads() == {"released": 0, "charged": 1}
    load.refresh_from_db()
    assert load.status == "succeeded" and load.amount_nano > 0 and _settlements() == 1


def test_a_retry_of_a_served_load_charges_it(fake_worker, api_client, ready_document,
                                             funded_agent, monkeypatch):
    from ledger import services as ledger_services
    from marketplace.services import completions

    r = api_client.post("/api/v1/licenses", {"document": ready_document.pk, "loads": 2},
                        format="json")
    lic = r.json()["id"]
    real = ledger_services.settle_load
    monkeypatch.setattr(ledger_services, "settle_load",
                        lambda **kw: (_ for _ in ()).throw(RuntimeError("down")))
    body = {"model": SLUG, "document": ready_document.pk, "license": lic, "messages": QUESTION}
    assert api_client.post(CHAT, body, format="json",
                           HTTP_IDEMPOTENCY_KEY="k").status_code == 200
    assert Load.objects.get().status == "served"
    monkeypatch.setattr(ledger_services, "settle_load", real)
    again = api_client.post(CHAT, body, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert again.status_code == 200 and again.json()["kvmarket"]["charge_pending"] is False
    assert Load.objects.get().status == "succeeded" and _settlements() == 1
    assert fake_worker.relayed() == 1 and completions.sweep_loads() == {"released": 0,
                                                                          "charged": 0}


def test_the_sweep_releases_abandoned_reservations_and_charges_abandoned_streams(
    publisher_user, funded_agent
):
    from marketplace.services.completions import record_served, reserve_load, sweep_loads
    from marketplace.services.licenses import purchase_license
    from tests.marketplace.conftest import FAKE_RESULT, make_ready_document

    doc = make_ready_document(publisher_user)
    lic, _ = purchase_license(agent=funded_agent, document_id=doc.pk, loads=3)

    def reserve(key: str) -> Load:
        return reserve_load(agent=funded_agent, license_id=lic.pk, document_id=doc.pk,
                            kind=LoadKind.CHAT, idempotency_key=key, payload={}).load

    pending, streaming = reserve("a"), reserve("b")
    record_served(load=streaming, result={**FAKE_RESULT, "final": False})  # mid-stream
    assert sweep_loads() == {"released": 0, "charged": 0}  # both web processes alive
    stale = timezone.now() - timedelta(seconds=31)
    Load.objects.update(heartbeat_at=stale)  # ... and now both died
    assert sweep_loads() == {"released": 1, "charged": 1}
    assert Load.objects.get(pk=pending.pk).status == "failed"
    served = Load.objects.get(pk=streaming.pk)
    assert served.status == "succeeded" and served.amount_nano > 0 and _settlements() == 1
    assert License.objects.get(pk=lic.pk).loads_used == 1


def test_a_load_the_worker_drops_unanswered_on_a_kept_connection_is_sent_again(db):
    """A worker that closes a kept-alive connection after reading a request, without answering
    (it was closing the connection as the request came): the load is sent again on a new
    connection, and its events are read from there."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answered = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.handled = getattr(self, "handled", 0) + 1
            if self.handled == 2:  # the second request on this connection: dropped
                self.close_connection = True
                return
            answered.append(self.client_address)
            body = json.dumps({"type": "final", "text": "ok", "worker": "w"}).encode() + b"\n"
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker_client.reset_client()
    try:
        registry.announce(name="plain@test", url=f"http://127.0.0.1:{server.server_port}",
                          model_slugs=[SLUG], hot_keys=[], in_flight=0,
                          started_at=timezone.now())
        registry.forget()
        for _ in range(2):
            stream = worker_client.open_stream(slug=SLUG, artifact_key="k", body={},
                                               timeout=5.0, eager=False)
            assert [event["type"] for event in stream] == ["final"]
        assert len(answered) == 2 and answered[0] != answered[1]  # the second on a new one
    finally:
        server.shutdown()
        server.server_close()
        worker_client.reset_client()
        registry.forget()
