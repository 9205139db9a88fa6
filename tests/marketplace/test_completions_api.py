"""Completions API with a fake worker: shapes, SSE, exactly-once metering, errors, isolation."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import License, Load, LoadKind
from marketplace.services.errors import MarketplaceError
from tests.marketplace.conftest import FAKE_RESULT, NANO, fund, make_ready_document, wallet

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("sql_path")]

CHAT = "/api/v1/chat/completions"


def buy(client, document, loads=3) -> dict:
    r = client.post("/api/v1/licenses", {"document": document.pk, "loads": loads}, format="json")
    assert r.status_code == 201, r.content
    return r.json()


def chat_body(document, license, **extra) -> dict:
    return {
        "model": "tiny-qwen3", "document": document.pk, "license": license["id"],
        "messages": [{"role": "user", "content": "What is this about?"}], **extra,
    }


def payable(publisher) -> int:
    from ledger.selectors import payable_balance

    return payable_balance(publisher)


def test_chat_completion_shape_and_charge(api_client, funded_agent, ready_document,
                                          publisher_user, fake_worker):
    lic = buy(api_client, ready_document)
    before = wallet(funded_agent)
    r = api_client.post(CHAT, chat_body(ready_document, lic, max_tokens=8), format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-qwen3"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world."}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 1012, "completion_tokens": 3, "total_tokens": 1015,
        "prompt_tokens_details": {"cached_tokens": 1000},
    }
    assert body["kvmarket"]["loads_left"] == 2
    assert fake_worker.calls[0]["params"]["max_tokens"] == 8
    assert fake_worker.calls[0]["params"]["messages"] == [
        {"role": "user", "content": "What is this about?"}
    ]
    load = Load.objects.get()
    assert load.status == "succeeded" and load.amount_nano == 10_000
    # Publisher gets 80% of the 10,000 nano load price; compute (12 in, 3 out) from the wallet.
    assert payable(publisher_user) == 8_000
    assert load.compute_nano == 12 * 100 + 3 * 400
    assert wallet(funded_agent) == before - load.compute_nano
    assert License.objects.get(pk=lic["id"]).loads_used == 1


def test_retry_with_idempotency_key_replays_and_charges_once(
    api_client, funded_agent, ready_document, publisher_user, fake_worker
):
    lic = buy(api_client, ready_document)
    h = {"HTTP_IDEMPOTENCY_KEY": "req-1"}
    first = api_client.post(CHAT, chat_body(ready_document, lic), format="json", **h)
    second = api_client.post(CHAT, chat_body(ready_document, lic), format="json", **h)
    assert first.status_code == second.status_code == 200
    assert second["Idempotent-Replayed"] == "true"
    a, b = first.json(), second.json()
    assert a.pop("kvmarket")["replayed"] is False and b.pop("kvmarket")["replayed"] is True
    assert a == b
    # One generation's events were read: a retry may start early (its document is cached, so
    # the key is not looked up first) but is replayed, and its early start closed unread.
    assert fake_worker.relayed() == 1
    assert Load.objects.count() == 1
    assert payable(publisher_user) == 8_000
    assert License.objects.get(pk=lic["id"]).loads_used == 1
    # Same key, different body: refused.
    r = api_client.post(
        CHAT, chat_body(ready_document, lic, max_tokens=3), format="json", **h
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"


def test_failed_load_is_not_charged_and_retry_charges_once(
    api_client, funded_agent, ready_document, publisher_user, fake_worker
):
    lic = buy(api_client, ready_document)
    before = wallet(funded_agent)

    def boom(call):
        raise MarketplaceError(code="generation_failed", message="worker died", status=502)

    fake_worker.behaviour = boom
    h = {"HTTP_IDEMPOTENCY_KEY": "req-fail"}
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json", **h)
    assert r.status_code == 502 and r.json()["error"]["code"] == "generation_failed"
    load = Load.objects.get()
    assert load.status == "failed" and load.amount_nano == 0
    assert License.objects.get(pk=lic["id"]).loads_used == 0
    assert payable(publisher_user) == 0 and wallet(funded_agent) == before

    fake_worker.behaviour = lambda call: dict(FAKE_RESULT)
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json", **h)
    assert r.status_code == 200
    load.refresh_from_db()
    assert load.status == "succeeded" and load.attempts == 2
    assert payable(publisher_user) == 8_000
    assert License.objects.get(pk=lic["id"]).loads_used == 1


def test_timeout_is_504_and_not_charged(api_client, funded_agent, ready_document,
                                        publisher_user, fake_worker):
    from marketplace.services.completions import CompletionTimeout

    lic = buy(api_client, ready_document)
    before = wallet(funded_agent)

    def slow(call):
        raise CompletionTimeout(call["timeout"])

    fake_worker.behaviour = slow
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "timeout"
    assert Load.objects.get().status == "failed"
    assert payable(publisher_user) == 0 and wallet(funded_agent) == before
    assert License.objects.get(pk=lic["id"]).loads_used == 0


def test_engine_rejection_is_422(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)

    def bad(call):
        raise MarketplaceError(code="invalid_request", message="bad stop", status=422)

    fake_worker.behaviour = bad
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    assert r.status_code == 422


def test_in_progress_retry_is_409(api_client, funded_agent, ready_document, fake_worker):
    from marketplace.models import LoadKind
    from marketplace.services.completions import reserve_load

    lic = buy(api_client, ready_document)
    body = chat_body(ready_document, lic)
    # A first attempt that is still running (reserved, not finished):
    ser_params = {
        "messages": body["messages"], "max_tokens": 64, "temperature": 0.0, "top_p": 1.0,
        "seed": None, "stop": None,
    }
    reserve_load(agent=funded_agent, license_id=lic["id"], document_id=ready_document.pk,
                 kind=LoadKind.CHAT, idempotency_key="busy", payload=ser_params)
    r = api_client.post(CHAT, body, format="json", HTTP_IDEMPOTENCY_KEY="busy")
    assert r.status_code == 409 and r.json()["error"]["code"] == "request_in_progress"
    # Once it is stale (the API process died), it is failed uncharged and the retry runs.
    Load.objects.update(heartbeat_at=timezone.now() - timedelta(hours=1))
    r = api_client.post(CHAT, body, format="json", HTTP_IDEMPOTENCY_KEY="busy")
    assert r.status_code == 200, r.content
    assert License.objects.get(pk=lic["id"]).loads_used == 1


def test_exhausted_license_is_409(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document, loads=1)
    assert api_client.post(CHAT, chat_body(ready_document, lic), format="json").status_code == 200
    assert License.objects.get(pk=lic["id"]).status == "exhausted"
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "license_exhausted"


def test_expired_license_is_409(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)
    License.objects.filter(pk=lic["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "license_expired"


def test_another_agents_license_is_404(api_client, funded_agent, ready_document,
                                       other_agent_client, fake_worker):
    theirs = buy(other_agent_client, ready_document)
    r = api_client.post(CHAT, chat_body(ready_document, theirs), format="json")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert fake_worker.relayed() == 0 and fake_worker.all_cancelled()
    assert License.objects.get(pk=theirs["id"]).loads_used == 0


def test_license_for_another_document_is_409(api_client, funded_agent, ready_document,
                                             publisher_user, fake_worker):
    lic = buy(api_client, ready_document)
    other = make_ready_document(publisher_user)
    r = api_client.post(CHAT, chat_body(other, lic), format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "license_document_mismatch"


def test_validation_errors_are_422(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)
    cases = [
        chat_body(ready_document, lic, messages=[]),
        chat_body(ready_document, lic, messages=[{"role": "wizard", "content": "x"}]),
        chat_body(ready_document, lic, temperature=-1),
        chat_body(ready_document, lic, max_tokens=0),
        chat_body(ready_document, lic, stop=["a", "b", "c", "d", "e"]),
        chat_body(ready_document, lic, n=2),
        {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}]},
    ]
    for body in cases:
        r = api_client.post(CHAT, body, format="json")
        assert r.status_code == 422, (body, r.content)
        assert r.json()["error"]["code"] == "invalid_request"
    r = api_client.post(CHAT, chat_body(ready_document, lic, model="gpt-4o"), format="json")
    assert r.status_code == 422 and r.json()["error"]["code"] == "model_mismatch"
    assert not fake_worker.calls
    assert License.objects.get(pk=lic["id"]).loads_used == 0


def test_unknown_document_is_404(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)
    body = chat_body(ready_document, lic)
    body["document"] = 987654
    assert api_client.post(CHAT, body, format="json").status_code == 404


def test_content_parts_and_developer_role(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)
    body = chat_body(ready_document, lic, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Sum"}, {"type": "text",
                                                                       "text": "marise."}]},
    ])
    assert api_client.post(CHAT, body, format="json").status_code == 200
    assert fake_worker.calls[0]["params"]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise."}
    ]


def test_publisher_key_or_session_cannot_complete(publisher_client, ready_document):
    r = publisher_client.post(CHAT, {"document": ready_document.pk, "license": 1,
                                     "messages": [{"role": "user", "content": "x"}]},
                              format="json")
    assert r.status_code == 403 and r.json()["error"]["code"] == "agent_only"


def test_wallet_that_cannot_pay_output_is_402(api_client, agent_user, publisher_user,
                                               fake_worker):
    from ledger.services import purchase_license  # noqa: F401 - the ledger is installed

    doc = make_ready_document(publisher_user, price=0)  # a free document
    fund(agent_user, amount_nano=1000)
    lic = buy(api_client, doc)
    r = api_client.post(CHAT, chat_body(doc, lic, max_tokens=64), format="json")
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_funds"
    assert fake_worker.relayed() == 0 and fake_worker.all_cancelled()
    assert License.objects.get(pk=lic["id"]).loads_used == 0


def _events(response) -> list:
    raw = b"".join(response.streaming_content).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def test_chat_stream_is_openai_sse(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)
    r = api_client.post(
        CHAT, chat_body(ready_document, lic, stream=True, stream_options={"include_usage": True}),
        format="json",
    )
    assert r.status_code == 200
    assert r["Content-Type"].startswith("text/event-stream")
    chunks = _events(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello world."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 1000
    load = Load.objects.get()
    assert load.status == "succeeded"
    # the usage chunk tells the load as charged (from the charge, not read again)
    details = chunks[-1]["kvmarket"]
    assert (details["load"], details["license"], details["document"]) == (
        load.pk, lic["id"], ready_document.pk)
    assert (details["charged_nano"], details["compute_nano"], details["charge_pending"]) == (
        load.amount_nano, load.compute_nano, False)
    assert details["loads_left"] == load.response["loads_left"] == 2


def test_raw_completion_and_stream(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)
    body = {"model": "tiny-qwen3", "document": ready_document.pk, "license": lic["id"],
            "prompt": "Once upon", "max_tokens": 5}
    r = api_client.post("/api/v1/completions", body, format="json")
    assert r.status_code == 200, r.content
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["choices"][0]["text"] == "Hello world."
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 1000
    assert fake_worker.calls[0]["params"]["prompt"] == "Once upon"
    r = api_client.post("/api/v1/completions", {**body, "stream": True}, format="json")
    chunks = _events(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert Load.objects.filter(status="succeeded").count() == 2


def test_kv_download_streams_artifact_and_meters_egress(
    api_client, funded_agent, ready_document, publisher_user, tmp_path, monkeypatch
):
    from marketplace import engine

    artifact = tmp_path / f"{ready_document.artifact_key}.safetensors"
    artifact.write_bytes(b"K" * 50_000)
    monkeypatch.setattr(engine, "artifact_path", lambda key: artifact)
    lic = buy(api_client, ready_document, loads=2)
    before = wallet(funded_agent)
    url = f"/api/v1/documents/{ready_document.pk}/kv?license={lic['id']}"
    r = api_client.get(url, HTTP_IDEMPOTENCY_KEY="dl-1")
    assert r.status_code == 200
    assert b"".join(r.streaming_content) == b"K" * 50_000
    load = Load.objects.get()
    assert load.kind == "kv_download" and load.egress_bytes == 50_000
    assert load.egress_nano == 4_500  # $0.09/GB
    assert wallet(funded_agent) == before - 4_500
    assert payable(publisher_user) == 8_000
    # A retried download with the same key is free.
    r = api_client.get(url, HTTP_IDEMPOTENCY_KEY="dl-1")
    assert r.status_code == 200 and r["Idempotent-Replayed"] == "true"
    assert b"".join(r.streaming_content) == b"K" * 50_000
    assert wallet(funded_agent) == before - 4_500
    assert License.objects.get(pk=lic["id"]).loads_used == 1


def test_kv_download_errors(api_client, agent_user, ready_document, tmp_path, monkeypatch,
                            other_agent_client):
    from marketplace import engine

    artifact = tmp_path / "a.safetensors"
    artifact.write_bytes(b"K" * 10**6)
    fund(agent_user, amount_nano=10_000)  # the license, not the egress (90,000)
    lic = buy(api_client, ready_document, loads=1)
    url = f"/api/v1/documents/{ready_document.pk}/kv"
    monkeypatch.setattr(engine, "artifact_path", lambda key: None)
    assert api_client.get(f"{url}?license={lic['id']}").status_code == 503
    monkeypatch.setattr(engine, "artifact_path", lambda key: artifact)
    r = api_client.get(f"{url}?license={lic['id']}")
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_funds"
    assert License.objects.get(pk=lic["id"]).loads_used == 0
    assert api_client.get(url).status_code == 422
    assert api_client.get(f"/api/v1/documents/99999/kv?license={lic['id']}").status_code == 404
    theirs = buy(other_agent_client, ready_document)
    assert api_client.get(f"{url}?license={theirs['id']}").status_code == 404


def test_loads_history(api_client, funded_agent, ready_document, fake_worker):
    lic = buy(api_client, ready_document)
    api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    rows = api_client.get("/api/v1/loads").json()["results"]
    assert len(rows) == 1 and rows[0]["status"] == "succeeded" and rows[0]["cached_tokens"] == 1000


def test_too_many_in_flight_loads_is_429_with_retry_after(
    api_client, funded_agent, ready_document, fake_worker, settings
):
    from marketplace.services.completions import reserve_load

    lic = buy(api_client, ready_document, loads=5)
    settings.MAX_IN_FLIGHT_LOADS_PER_AGENT = 1
    # One load in flight (reserved, its web process alive): the next one is refused.
    held = reserve_load(agent=funded_agent, license_id=lic["id"], document_id=ready_document.pk,
                        kind=LoadKind.CHAT, idempotency_key="held", payload={})
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"
    assert r["Retry-After"] == "1"
    assert License.objects.get(pk=lic["id"]).loads_used == 1
    # A load whose web process died (stale heartbeat) no longer counts.
    Load.objects.filter(pk=held.load.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    assert r.status_code == 200, r.content


def test_concurrent_requests_never_overdraw_a_license(transactional_db, publisher_user,
                                                       agent_user):
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    from marketplace.models import LoadKind
    from marketplace.services.completions import reserve_load
    from marketplace.services.licenses import purchase_license

    fund(agent_user, amount_nano=NANO)
    doc = make_ready_document(publisher_user)
    lic, _ = purchase_license(agent=agent_user, document_id=doc.pk, loads=2)

    def attempt(i: int) -> str:
        try:
            reserve_load(agent=agent_user, license_id=lic.pk, document_id=doc.pk,
                         kind=LoadKind.CHAT, idempotency_key=f"c{i}", payload={})
            return "ok"
        except MarketplaceError as exc:
            return exc.code
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(attempt, range(6)))
    assert outcomes.count("ok") == 2
    assert set(outcomes) - {"ok"} == {"license_exhausted"}
    assert License.objects.get(pk=lic.pk).loads_used == 2


# The built-in tiny-qwen3 has a 4096-token context; "hello world " is five of its tokens.
def test_text_that_cannot_fit_the_context_is_422_before_anything_is_reserved(
    api_client, funded_agent, publisher_user, fake_worker
):
    document = make_ready_document(publisher_user, n_tokens=4000)
    lic = buy(api_client, document)
    before = wallet(funded_agent)
    body = chat_body(document, lic)
    body["messages"] = [{"role": "user", "content": "hello world " * 60}]
    r = api_client.post(CHAT, body, format="json")
    assert r.status_code == 422, r.content
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "4096-token context" in error["message"]
    assert fake_worker.calls == []  # not even started early
    assert not Load.objects.exists() and wallet(funded_agent) == before


def test_text_of_many_bytes_but_few_tokens_still_fits(
    api_client, funded_agent, publisher_user, fake_worker
):
    document = make_ready_document(publisher_user, n_tokens=4000)
    lic = buy(api_client, document)
    body = chat_body(document, lic)
    body["messages"] = [{"role": "user", "content": "hello world " * 10}]  # 120 bytes, 50 tokens
    r = api_client.post(CHAT, body, format="json")
    assert r.status_code == 200, r.content
    assert len(fake_worker.calls) == 1


def test_every_worker_stream_is_closed_when_its_completion_ends(
    api_client, funded_agent, ready_document, fake_worker
):
    """Closed here, not by the garbage collector, which could take httpx's pool lock in a thread
    already holding it (a process-wide hang)."""
    lic = buy(api_client, ready_document)
    plain = api_client.post(CHAT, chat_body(ready_document, lic), format="json")
    assert plain.status_code == 200, plain.content
    streamed = api_client.post(CHAT, chat_body(ready_document, lic, stream=True), format="json")
    assert streamed.status_code == 200
    b"".join(streamed.streaming_content)
    assert len(fake_worker.streams) == 2
    assert all(stream.closed for stream in fake_worker.streams)


def test_the_request_reads_its_document_without_the_text(
    api_client, funded_agent, ready_document, other_agent_client, fake_worker
):
    """One query before the reservation, for the fields the path reads (a document's text may
    be long), saying whether this agent used the Idempotency-Key before."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from marketplace.services.completions import request_document

    with CaptureQueriesContext(connection) as queries:
        document = request_document(agent=funded_agent, document_id=ready_document.pk,
                                    idempotency_key="k-1")
        read = (document.pk, document.model_slug, document.artifact_key, document.n_tokens)
    assert read == (ready_document.pk, "tiny-qwen3", ready_document.artifact_key,
                    ready_document.n_tokens)
    assert not document.key_seen
    assert len(queries) == 1 and "text" in document.get_deferred_fields()

    lic = buy(api_client, ready_document)
    r = api_client.post(CHAT, chat_body(ready_document, lic), format="json",
                        HTTP_IDEMPOTENCY_KEY="k-1")
    assert r.status_code == 200, r.content
    assert request_document(agent=funded_agent, document_id=ready_document.pk,
                            idempotency_key="k-1").key_seen
    for agent, key in ((other_agent_client.user, "k-1"), (funded_agent, "k-2"),
                       (funded_agent, None)):
        assert not request_document(agent=agent, document_id=ready_document.pk,
                                    idempotency_key=key).key_seen
    assert request_document(agent=funded_agent, document_id=ready_document.pk + 1,
                            idempotency_key=None) is None



def _dispatched_after(api_client, body, fake_worker, keys) -> list[list[str]]:
    """Per request: the SQL it ran before its (first) generation was sent to the worker."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    before = []
    with CaptureQueriesContext(connection) as ctx:
        fake_worker.behaviour = lambda call: (before.append(len(ctx)), dict(FAKE_RESULT))[1]
        starts = []
        for key in keys:
            starts.append(len(ctx))
            r = api_client.post(CHAT, body, format="json", HTTP_IDEMPOTENCY_KEY=key)
            assert r.status_code == 200, r.content
    firsts = [min(n for n in before if n >= start) for start in starts]
    return [[q["sql"] for q in ctx.captured_queries[s:e]]
            for s, e in zip(starts, firsts, strict=True)]


def test_a_document_read_lately_is_sent_to_its_worker_before_any_query(
    api_client, funded_agent, ready_document, fake_worker, monkeypatch
):
    """The request's document is read once per DOCUMENT_CACHE_SECONDS and process: later
    completions on it reach the worker before the database is asked about it."""
    from marketplace.services import completions

    monkeypatch.setattr(completions, "DOCUMENT_CACHE_SECONDS", 60.0)  # a slow first request
    body = chat_body(ready_document, buy(api_client, ready_document))
    first, second = _dispatched_after(api_client, body, fake_worker, ["k-1", "k-2"])
    assert any("marketplace_document" in sql for sql in first)
    assert not any("marketplace_document" in sql or "marketplace_load" in sql for sql in second)
    assert fake_worker.relayed() == 2


def test_a_cached_document_whose_kv_moved_runs_on_its_new_artifact(
    api_client, funded_agent, ready_document, fake_worker, monkeypatch
):
    """The cache only routes the early start: the reservation reads the document again, and a
    document whose artifact changed meanwhile is run on the new one (the early start closed)."""
    from marketplace.services import completions

    monkeypatch.setattr(completions, "DOCUMENT_CACHE_SECONDS", 60.0)
    body = chat_body(ready_document, buy(api_client, ready_document))
    _dispatched_after(api_client, body, fake_worker, ["k-1"])
    old = ready_document.artifact_key
    ready_document.artifact_key = "moved"
    ready_document.save(update_fields=["artifact_key"])
    fake_worker.calls.clear()
    fake_worker.streams.clear()
    _dispatched_after(api_client, body, fake_worker, ["k-2"])
    assert [call["document"].artifact_key for call in fake_worker.calls] == [old, "moved"]
    early, reserved = fake_worker.streams
    assert early.closed and not early.read and reserved.read


def test_a_retry_of_a_licenses_last_load_is_replayed_when_its_document_is_cached(
    api_client, funded_agent, ready_document, fake_worker, monkeypatch, sql_path
):
    """A cached document does not say whether the key was used: the reservation, refused
    (the license is used up by the load being retried), finds the earlier Load and replays."""
    from marketplace.services import completions

    monkeypatch.setattr(completions, "DOCUMENT_CACHE_SECONDS", 60.0)
    body = chat_body(ready_document, buy(api_client, ready_document, loads=1))
    first = api_client.post(CHAT, body, format="json", HTTP_IDEMPOTENCY_KEY="last")
    again = api_client.post(CHAT, body, format="json", HTTP_IDEMPOTENCY_KEY="last")
    assert first.status_code == again.status_code == 200, again.content
    assert again["Idempotent-Replayed"] == "true"
    assert Load.objects.count() == 1 and fake_worker.relayed() == 1
    other = api_client.post(CHAT, body, format="json", HTTP_IDEMPOTENCY_KEY="new")
    assert other.status_code == 409 and other.json()["error"]["code"] == "license_exhausted"
