"""Precompute task (fake engine, run in-process), routing, housekeeping, seed_demo, schema."""

from __future__ import annotations

import pytest

from marketplace import registry, workers
from marketplace.models import Document, DocumentStatus, License, Load
from tests.marketplace.conftest import make_ready_document

pytestmark = pytest.mark.django_db


def _result(key: str = "a" * 64, n: int = 40, reused: bool = False) -> dict:
    return {"key": key, "n_tokens": n, "seconds": 0.5, "bytes": 4096, "flops": 1e9,
            "reused": reused, "verification": {"passed": True, "greedy_matched": 24}}


@pytest.fixture
def queued_document(publisher_user) -> Document:
    return Document.objects.create(
        publisher=publisher_user, title="t", text="Some text.", model_slug="tiny-qwen3",
        status=DocumentStatus.QUEUED,
    )


def test_precompute_task_records_progress_and_result(queued_document, monkeypatch):
    from marketplace import engine, tasks

    seen = []

    def fake(*, slug, text, progress, should_cancel):
        assert slug == "tiny-qwen3" and text == "Some text."
        for done in (10, 20, 30, 40):
            progress(done, 40)
            doc = Document.objects.get(pk=queued_document.pk)
            seen.append((doc.status, doc.tokens_done, doc.tokens_total))
            assert should_cancel() is False
        return _result()

    monkeypatch.setattr(tasks, "PROGRESS_INTERVAL_SECONDS", 0.0)
    monkeypatch.setattr(engine, "precompute", fake)
    tasks.precompute_document.apply(args=[queued_document.pk])
    assert seen == [("precomputing", d, 40) for d in (10, 20, 30, 40)]
    doc = Document.objects.get(pk=queued_document.pk)
    assert doc.status == "ready" and doc.n_tokens == 40 and doc.artifact_key == "a" * 64
    assert doc.verification["passed"] is True and doc.precompute_attempts == 1

    # Idempotent: a redelivered task for a ready document does no work.
    monkeypatch.setattr(engine, "precompute", lambda **kw: pytest.fail("recomputed"))
    tasks.precompute_document.apply(args=[queued_document.pk])


def test_precompute_progress_is_throttled(queued_document, monkeypatch):
    from marketplace import engine, services, tasks

    writes = []
    real = services.documents.record_progress
    monkeypatch.setattr(
        services.documents, "record_progress",
        lambda **kw: writes.append(kw["tokens_done"]) or real(**kw),
    )

    def fake(*, slug, text, progress, should_cancel):
        for done in range(1, 1001):
            progress(done, 1000)
        return _result(n=1000)

    monkeypatch.setattr(engine, "precompute", fake)
    tasks.precompute_document.apply(args=[queued_document.pk])
    assert writes[-1] == 1000 and len(writes) <= 3


def test_precompute_failure_is_recorded(queued_document, monkeypatch):
    from inference.errors import DocumentTooLong
    from marketplace import engine, tasks

    def fake(**kw):
        raise DocumentTooLong("The document has 9000 tokens; the model takes 2048.")

    monkeypatch.setattr(engine, "precompute", fake)
    tasks.precompute_document.apply(args=[queued_document.pk])
    doc = Document.objects.get(pk=queued_document.pk)
    assert doc.status == "failed" and doc.error_code == "document_too_long"
    assert "9000 tokens" in doc.error


def test_unexpected_precompute_error_is_recorded_and_raised(queued_document, monkeypatch):
    from marketplace import engine, tasks

    monkeypatch.setattr(engine, "precompute", lambda **kw: 1 / 0)
    result = tasks.precompute_document.apply(args=[queued_document.pk])
    assert result.failed()
    doc = Document.objects.get(pk=queued_document.pk)
    assert doc.status == "failed" and doc.error_code == "internal_error"


def test_precompute_task_options():
    from marketplace.tasks import precompute_document

    assert precompute_document.acks_late and precompute_document.reject_on_worker_lost


def test_enqueue_goes_to_the_models_gpu_queue(queued_document, monkeypatch):
    from marketplace import tasks

    sent = {}

    class Result:
        id = "tid"

    def fake_apply_async(*, args, queue):
        sent.update(args=args, queue=queue)
        return Result()

    monkeypatch.setattr(tasks.precompute_document, "apply_async", fake_apply_async)
    assert tasks.enqueue_precompute(document_id=7, model_slug="tiny-qwen3") == "tid"
    assert sent == {"args": [7], "queue": "gpu.tiny-qwen3"}


# --- routing -------------------------------------------------------------------------------


def _info(name: str, *, models=("tiny-qwen3",), hot=()) -> registry.WorkerInfo:
    return registry.WorkerInfo(name=name, url=f"http://{name}", model_slugs=tuple(models),
                               hot_keys=frozenset(hot), in_flight=0)


def _first(key: str, names: list[str]) -> str:
    return registry.rank([_info(n) for n in names], slug="tiny-qwen3", artifact_key=key)[0].name


def test_rendezvous_is_stable_and_moves_little():
    hosts = [f"w{i}@h" for i in range(5)]
    keys = [f"{i:064x}" for i in range(400)]
    before = {k: _first(k, hosts) for k in keys}
    assert before == {k: _first(k, list(reversed(hosts))) for k in keys}
    assert len(set(before.values())) == 5  # spread over all workers
    after = {k: _first(k, hosts[:-1]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "w4@h" for k in moved)  # only the departed worker's keys move


def test_ranking_prefers_the_worker_holding_the_artifact_and_skips_other_models():
    key = "f" * 64
    names = [f"w{i}@h" for i in range(4)]
    plain = registry.rank([_info(n) for n in names], slug="tiny-qwen3", artifact_key=key)
    hot_name = plain[-1].name  # the rendezvous order's last choice holds it in memory
    ranked = registry.rank(
        [_info(n, hot=[key] if n == hot_name else []) for n in names]
        + [_info("other@h", models=("big",))],
        slug="tiny-qwen3", artifact_key=key,
    )
    assert ranked[0].name == hot_name
    assert [w.name for w in ranked[1:]] == [w.name for w in plain[:-1]]
    assert "other@h" not in {w.name for w in ranked}


def test_live_workers_are_those_with_a_fresh_heartbeat(db, settings):
    from datetime import timedelta

    from django.utils import timezone

    from marketplace.models import GpuWorker

    now = timezone.now()
    registry.announce(name="live@h", url="http://a", model_slugs=["tiny-qwen3"], hot_keys=[],
                      in_flight=0, started_at=now)
    GpuWorker.objects.create(name="dead@h", url="http://b", model_slugs=["tiny-qwen3"],
                             started_at=now, heartbeat_at=now - timedelta(seconds=60))
    registry.forget()
    assert [w.name for w in registry.live_workers()] == ["live@h"]
    registry.withdraw(name="live@h")
    registry.forget()
    assert registry.live_workers() == []
    registry.forget()


# --- housekeeping ----------------------------------------------------------------------------


def test_stale_pending_loads_are_failed_uncharged(publisher_user, funded_agent):
    from datetime import timedelta

    from django.utils import timezone

    from marketplace.models import LoadKind
    from marketplace.services.completions import expire_stale_loads, reserve_load
    from marketplace.services.licenses import purchase_license

    doc = make_ready_document(publisher_user)
    lic, _ = purchase_license(agent=funded_agent, document_id=doc.pk, loads=1)
    reserve_load(agent=funded_agent, license_id=lic.pk, document_id=doc.pk, kind=LoadKind.CHAT,
                 idempotency_key=None, payload={})
    assert License.objects.get(pk=lic.pk).loads_used == 1
    assert expire_stale_loads() == 0
    Load.objects.update(heartbeat_at=timezone.now() - timedelta(seconds=31))
    assert expire_stale_loads() == 1
    load = Load.objects.get()
    assert load.status == "failed" and load.amount_nano == 0
    assert License.objects.get(pk=lic.pk).loads_used == 0


def test_collect_artifacts_keeps_what_live_licenses_need(publisher_user, funded_agent,
                                                         monkeypatch):
    from marketplace import engine
    from marketplace.services.documents import collect_artifacts, unlist_document
    from marketplace.services.licenses import purchase_license

    deleted = []
    monkeypatch.setattr(engine, "delete_artifact", deleted.append)
    with_license = make_ready_document(publisher_user)
    without = make_ready_document(publisher_user)
    purchase_license(agent=funded_agent, document_id=with_license.pk, loads=1)
    unlist_document(document=with_license, publisher=publisher_user)
    unlist_document(document=without, publisher=publisher_user)
    assert collect_artifacts() == [without.artifact_key]
    assert deleted == [without.artifact_key]
    assert Document.objects.get(pk=without.pk).status == "draft"
    assert Document.objects.get(pk=with_license.pk).status == "ready"


def test_loads_used_constraint_is_enforced_by_the_database(publisher_user, funded_agent):
    from django.db import IntegrityError, transaction

    from marketplace.services.licenses import purchase_license

    doc = make_ready_document(publisher_user)
    lic, _ = purchase_license(agent=funded_agent, document_id=doc.pk, loads=2)
    with pytest.raises(IntegrityError), transaction.atomic():
        License.objects.filter(pk=lic.pk).update(loads_used=3)
    with pytest.raises(IntegrityError), transaction.atomic():
        License.objects.filter(pk=lic.pk).update(loads_used=-1)


# --- seed_demo and schema --------------------------------------------------------------------


@pytest.mark.slow  # seeds the whole demo twice; in CI (make test-all)
def test_seed_demo_is_idempotent(monkeypatch, settings, django_capture_on_commit_callbacks):
    from io import StringIO

    from django.core.management import call_command

    from ledger.selectors import wallet_balance
    from marketplace.models import User

    queued = []
    monkeypatch.setattr(
        "marketplace.tasks.enqueue_precompute",
        lambda *, document_id, model_slug: queued.append(document_id) or "t",
    )
    outs = []
    for _ in range(2):
        out = StringIO()
        with django_capture_on_commit_callbacks(execute=True):
            call_command("seed_demo", stdout=out)
        outs.append(out.getvalue())
    agent = User.objects.get(email="agent@demo.kvmarket")
    assert User.objects.get(email="publisher@demo.kvmarket").role == "publisher"
    assert wallet_balance(agent) == 20 * 10**9
    from marketplace.management.commands.seed_demo import demo_documents

    specs = demo_documents()
    docs = list(Document.objects.order_by("pk"))
    assert [d.title for d in docs] == [s["title"] for s in specs]  # created once
    assert all(d.status == "queued" for d in docs) and queued == [d.pk for d in docs]
    assert "Call me Ishmael" in docs[0].text
    assert docs[0].example_questions == ["Who is the narrator?"]
    assert all(d.example_questions == [q["question"] for q in s["questions"]]
               for d, s in zip(docs, specs, strict=True))
    assert {d.model_slug for d in docs} == {next(iter(settings.KVMARKET_MODELS))}
    assert "kvm_" in outs[0] and "kvmarket-demo-2026" in outs[0]
    assert "ask: Who is the narrator?" in outs[0]
    assert agent.api_keys.count() == 2


def test_demo_documents_are_real_texts_of_the_right_size():
    """Two or more of 1-4k tokens besides the Moby-Dick opening; every question's expected
    answer is written in the text itself."""
    import re

    from marketplace.management.commands.seed_demo import DEMO_DIR, demo_documents

    specs = demo_documents()
    words = {s["title"]: len((DEMO_DIR / s["file"]).read_text().split()) for s in specs}
    assert sum(700 <= n <= 3000 for n in words.values()) >= 2, words  # about 1-4k tokens
    for spec in specs:
        text = " ".join((DEMO_DIR / spec["file"]).read_text().split()).lower()
        assert spec["licence"] and spec["source"] and 1 <= len(spec["questions"]) <= 3
        for item in spec["questions"]:
            answer = re.sub(r"\s+", " ", item["answer_contains"].lower())
            assert answer in text, (spec["title"], answer)


def test_schema_generates_without_warnings():
    from django.urls import include, path
    from drf_spectacular.drainage import GENERATOR_STATS
    from drf_spectacular.generators import SchemaGenerator

    # The marketplace's own API (the ledger's endpoints are checked in the ledger's tests).
    patterns = [path("api/v1/", include("marketplace.api_urls"))]
    GENERATOR_STATS.reset()
    schema = SchemaGenerator(patterns=patterns).get_schema(request=None, public=True)
    assert not GENERATOR_STATS._warn_cache and not GENERATOR_STATS._error_cache
    paths = schema["paths"]
    for p in ["/api/v1/documents", "/api/v1/documents/{id}", "/api/v1/documents/{id}/kv",
              "/api/v1/licenses", "/api/v1/licenses/{id}", "/api/v1/chat/completions",
              "/api/v1/completions"]:
        assert p in paths, p


def test_schema_and_docs_pages(client):
    assert client.get("/api/schema/").status_code == 200
    assert client.get("/api/docs/").status_code == 200


def test_worker_loads_its_models_and_warms_up_the_cuda_ones(settings, monkeypatch):
    from types import SimpleNamespace

    import inference
    from marketplace import engine

    settings.KVMARKET_MODELS = {
        "big": {"ref": "x", "device": "cuda:0"},
        "other-gpu": {"ref": "y", "device": "cuda"},
        "tiny": {"ref": "z", "device": "cpu"},
    }
    queues = ["default", "gpu.big", "gpu.tiny", "worker.host"]
    assert workers.cuda_models_served(queues) == ["big"]
    assert workers.models_served(queues) == ["big", "tiny"]

    loaded, warmed, pinned = [], [], []
    monkeypatch.setattr(engine, "get_loaded", lambda slug: loaded.append(slug) or f"loaded:{slug}")
    monkeypatch.setattr(inference, "warm_up", lambda loaded: warmed.append(loaded) or {})
    store = SimpleNamespace(pin_host_memory=lambda: pinned.append(True))
    monkeypatch.setattr(engine, "get_store", lambda: store)
    frozen = []  # the real one would freeze the test process's heap
    monkeypatch.setattr(inference, "freeze_startup_heap", lambda: frozen.append(True))
    limited = []  # the real one would set the test process's torch threads
    monkeypatch.setattr(engine, "limit_cpu_threads", lambda: limited.append(True) or 1)

    def consumer_of(names):
        return SimpleNamespace(
            app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=names)))
        )

    consumer = consumer_of(queues)
    workers.prepare_models(consumer)
    assert loaded == ["big", "tiny"]  # every model served, CPU ones too, before any task
    assert warmed == ["loaded:big"]
    assert pinned == [True]  # the store's host memory for disk reads, pinned at start
    assert frozen == [True]  # then start-up's garbage collected and the rest frozen
    assert limited == [True]  # it runs "tiny" on the CPU: torch's threads are bounded
    workers.prepare_models(consumer_of(["default", "gpu.tiny"]))
    assert loaded[-1] == "tiny"
    assert warmed == ["loaded:big"] and pinned == [True]  # a CPU worker pins nothing
    assert frozen == [True]  # nor freezes anything
    assert limited == [True, True]
    workers.prepare_models(consumer_of(["gpu.big"]))
    assert limited == [True, True]  # a worker of CUDA models only keeps torch's default

    def broken(loaded):
        raise RuntimeError("no GPU")

    monkeypatch.setattr(inference, "warm_up", broken)
    workers.prepare_models(consumer)  # logged, never raised: the worker still starts
    assert frozen == [True, True, True]


def test_a_cpu_worker_leaves_one_cpu_to_the_host(settings, monkeypatch):
    """Torch's default takes every core; a CPU worker sharing its host with the web leaves one
    (at least one thread), unless GPU_WORKER_CPU_THREADS says how many."""
    import os

    from marketplace import engine

    settings.GPU_WORKER_CPU_THREADS = 0
    for cpus, threads in ((4, 3), (2, 1), (1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert engine.cpu_threads() == threads
    settings.GPU_WORKER_CPU_THREADS = 3
    assert engine.cpu_threads() == 3

    import torch

    before = torch.get_num_threads()
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert engine.limit_cpu_threads() == 3 and set_to == [3]
    assert torch.get_num_threads() == before
