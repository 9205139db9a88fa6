"""End to end with a REAL Celery worker process, Redis and PostgreSQL, and the built-in model.

One worker (queues default + gpu.tiny-qwen3, solo pool, the built-in model on CPU) serves the
whole module. Flow: a publisher lists a document; the worker precomputes and verifies its KV;
an agent buys a license and completes (through the test client and through the official openai
package against a live server, streaming and not); the ledger shows the purchase and the
settlement; a timed-out load is not charged.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from marketplace.models import Document, License, Load
from tests.marketplace.conftest import NANO, fund, wallet
from tests.marketplace.integration import (
    DOCUMENT_TEXT,
    GPU_QUEUES,
    partial_files,
    skip_module_unless_worker_can_run,
    wait_for,
    wait_for_live_worker,
    wait_until_ready,
)
from tests.support.celery_worker import start_celery_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

skip_module_unless_worker_can_run()


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def gpu_worker(django_db_setup, django_db_blocker, kv_dir):
    with django_db_blocker.unblock(), start_celery_worker(
        GPU_QUEUES, extra_env={"KV_STORE_DIR": str(kv_dir)}, ready_timeout=120
    ) as worker:
        yield worker


@pytest.fixture(autouse=True)
def _same_store(settings, kv_dir):
    """This process (KV downloads, direct engine calls) reads the worker's store."""
    from marketplace import engine, registry

    settings.KV_STORE_DIR = kv_dir
    engine.reset_store()
    registry.forget()
    yield
    engine.reset_store()


def _publish(publisher_client, text: str = DOCUMENT_TEXT) -> Document:
    r = publisher_client.post(
        "/api/v1/documents", {"title": "Skerry Point", "text": text, "model": "tiny-qwen3"},
        format="json",
    )
    assert r.status_code == 201, r.content
    doc, _ = wait_until_ready(r.json()["id"])
    wait_for_live_worker()
    return doc


def test_publish_precompute_license_complete_ledger(
    gpu_worker, transactional_db, publisher_client, publisher_user, api_client, agent_user, kv_dir
):
    from ledger.models import Transaction
    from ledger.selectors import escrow_balance, payable_balance

    # Publish: the worker precomputes on gpu.tiny-qwen3, with progress and verification.
    r = publisher_client.post(
        "/api/v1/documents",
        {"title": "Skerry Point", "text": DOCUMENT_TEXT, "model": "tiny-qwen3"},
        format="json",
    )
    assert r.status_code == 201, r.content
    doc, seen = wait_until_ready(r.json()["id"])
    assert doc.n_tokens and doc.n_tokens > 50
    assert doc.tokens_done == doc.tokens_total == doc.n_tokens
    assert doc.artifact_bytes and (kv_dir / doc.artifact_key[:2]).is_dir()
    assert doc.verification["passed"] is True
    assert doc.verification["greedy_matched"] == doc.verification["greedy_total"]
    assert not partial_files(kv_dir)
    wait_for_live_worker(gpu_worker.hostname)

    # Same content, same artifact: a second listing reuses the KV.
    twin = _publish(publisher_client)
    assert twin.artifact_key == doc.artifact_key

    # Buy a license (wallet -> escrow).
    fund(agent_user, amount_nano=NANO)
    r = api_client.post("/api/v1/licenses", {"document": doc.pk, "loads": 3}, format="json")
    assert r.status_code == 201, r.content
    lic = r.json()
    price = lic["price_per_load_nano"]
    assert price == doc.n_tokens * 10  # cache-read tariff: $0.10/Mtok x 0.1
    assert escrow_balance(f"license:{lic['id']}") == 3 * price

    # Complete on the worker, over its HTTP endpoint.
    r = api_client.post(
        "/api/v1/chat/completions",
        {"model": "tiny-qwen3", "document": doc.pk, "license": lic["id"], "max_tokens": 12,
         "messages": [{"role": "user", "content": "What did the keeper write every evening?"}]},
        format="json", HTTP_IDEMPOTENCY_KEY="int-1",
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == doc.n_tokens
    assert body["usage"]["completion_tokens"] > 0
    load = Load.objects.get()
    assert load.status == "succeeded" and load.worker == gpu_worker.hostname

    # Token-exact: the same greedy request run in-process from the artifact gives the same text.
    from marketplace import engine

    local = engine.generate(
        slug="tiny-qwen3", artifact_key=doc.artifact_key, max_tokens=12,
        messages=[{"role": "user", "content": "What did the keeper write every evening?"}],
    )
    assert local["text"] == body["choices"][0]["message"]["content"]

    # Ledger: purchase, then one settlement (80% payable, 20% platform) and the escrow drawn.
    kinds = list(Transaction.objects.order_by("id").values_list("kind", flat=True))
    assert kinds[-2:] == ["license_purchase", "load_settlement"], kinds
    assert payable_balance(publisher_user) == price * 8 // 10
    assert escrow_balance(f"license:{lic['id']}") == 2 * price
    # A retry with the same key is not charged again.
    again = api_client.post(
        "/api/v1/chat/completions",
        {"model": "tiny-qwen3", "document": doc.pk, "license": lic["id"], "max_tokens": 12,
         "messages": [{"role": "user", "content": "What did the keeper write every evening?"}]},
        format="json", HTTP_IDEMPOTENCY_KEY="int-1",
    )
    assert again.json()["choices"] == body["choices"]
    assert Transaction.objects.filter(kind="load_settlement").count() == 1

    # Shipping mode: the artifact's bytes, one more load, egress metered.
    before = wallet(agent_user)
    r = api_client.get(f"/api/v1/documents/{doc.pk}/kv?license={lic['id']}")
    assert r.status_code == 200
    data = b"".join(r.streaming_content)
    assert data == (kv_dir / doc.artifact_key[:2] / f"{doc.artifact_key}.safetensors").read_bytes()
    assert wallet(agent_user) < before
    assert License.objects.get(pk=lic["id"]).loads_used == 2
    assert Transaction.objects.filter(kind="load_settlement").count() == 2


def test_timed_out_load_is_not_charged(
    gpu_worker, transactional_db, publisher_client, publisher_user, api_client, agent_user,
    settings,
):
    from ledger.models import Transaction
    from ledger.selectors import payable_balance

    doc = _publish(publisher_client)
    fund(agent_user, amount_nano=NANO)
    lic = api_client.post("/api/v1/licenses", {"document": doc.pk, "loads": 1},
                          format="json").json()
    settings.COMPLETION_TIMEOUT_SECONDS = 0.001  # no round trip is that fast
    body = {"model": "tiny-qwen3", "document": doc.pk, "license": lic["id"], "max_tokens": 16,
            "messages": [{"role": "user", "content": "Who kept the logbook?"}]}
    r = api_client.post("/api/v1/chat/completions", body, format="json",
                        HTTP_IDEMPOTENCY_KEY="slow")
    assert r.status_code == 504, r.content
    assert r.json()["error"]["code"] == "timeout"
    # The worker drops the request (or finishes it unread): no charge either way. Wait for a
    # heartbeat a whole interval after the timeout that reports nothing in flight.
    from django.utils import timezone

    from marketplace.models import GpuWorker

    after = timezone.now() + timedelta(seconds=settings.GPU_WORKER_HEARTBEAT_SECONDS)
    wait_for(lambda: GpuWorker.objects.filter(heartbeat_at__gt=after, in_flight=0).exists(),
             timeout=60, what="a heartbeat of an idle worker after the timeout")
    assert Load.objects.get().status == "failed"
    assert not Transaction.objects.filter(kind="load_settlement").exists()
    assert payable_balance(publisher_user) == 0
    assert License.objects.get(pk=lic["id"]).loads_used == 0

    # The client retries with the same key and a sane timeout: served and charged once.
    settings.COMPLETION_TIMEOUT_SECONDS = 120
    r = api_client.post("/api/v1/chat/completions", body, format="json",
                        HTTP_IDEMPOTENCY_KEY="slow")
    assert r.status_code == 200, r.content
    assert Transaction.objects.filter(kind="load_settlement").count() == 1
    assert License.objects.get(pk=lic["id"]).loads_used == 1


def test_openai_client_against_live_server(
    gpu_worker, transactional_db, live_server, publisher_client, agent_user, agent_key
):
    import openai

    doc = _publish(publisher_client)
    fund(agent_user, amount_nano=NANO)
    from marketplace.services.licenses import purchase_license

    lic, _ = purchase_license(agent=agent_user, document_id=doc.pk, loads=5)
    client = openai.OpenAI(base_url=f"{live_server.url}/api/v1", api_key=agent_key,
                           max_retries=0, timeout=120)
    extra = {"document": doc.pk, "license": lic.pk}
    question = [{"role": "user", "content": "What did the keeper eat in 1911?"}]

    plain = client.chat.completions.create(
        model="tiny-qwen3", messages=question, max_tokens=10, temperature=0, extra_body=extra
    )
    assert plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content
    assert plain.usage.prompt_tokens_details.cached_tokens == doc.n_tokens
    assert plain.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="tiny-qwen3", messages=question, max_tokens=10, temperature=0, extra_body=extra,
        stream=True, stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == plain.choices[0].message.content  # greedy: same tokens
    assert finish in ("stop", "length")
    assert usage is not None and usage.prompt_tokens_details.cached_tokens == doc.n_tokens

    raw = client.completions.create(
        model="tiny-qwen3", prompt="The keeper", max_tokens=6, extra_body=extra
    )
    assert raw.object == "text_completion" and raw.choices[0].text
    assert raw.usage.prompt_tokens_details.cached_tokens == doc.n_tokens
    raw_stream = client.completions.create(
        model="tiny-qwen3", prompt="The keeper", max_tokens=6, extra_body=extra, stream=True
    )
    assert "".join(c.choices[0].text for c in raw_stream if c.choices) == raw.choices[0].text

    # Errors come back as OpenAI-style exceptions with our JSON body.
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="tiny-qwen3", messages=question,
                                       extra_body={"document": doc.pk, "license": 999999})
    assert exc.value.status_code == 404 and exc.value.code == "not_found"
    assert License.objects.get(pk=lic.pk).loads_used == 4
    assert wallet(agent_user) < 1 * NANO
