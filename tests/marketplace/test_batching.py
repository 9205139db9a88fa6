"""The GPU worker's scheduler: dynamic batching, per-row streaming, back-pressure.

Runs the real engine (built-in model, CPU, the fast path forced on so batches really share
their steps) through marketplace.engine.Scheduler, as the worker's HTTP endpoint does.
"""

from __future__ import annotations

import threading
import time

import pytest

from marketplace import engine

SLUG = "tiny-qwen3"
DOC = (
    "The Python Software Foundation License permits copying, modifying and distributing the "
    "software, provided the copyright notice and this permission notice are kept."
)


@pytest.fixture
def artifact_key(settings, tmp_path, monkeypatch):
    settings.KV_STORE_DIR = tmp_path / "kv"
    engine.reset_store()
    monkeypatch.setenv("KVMARKET_FASTPATH", "1")  # the GPU path's batching, eagerly on CPU
    yield engine.precompute(slug=SLUG, text=DOC)["key"]
    engine.reset_store()


def _request(i: int) -> dict:
    questions = ["What is permitted?", "Quote the notice.", "Who holds the copyright?", "Why?"]
    return dict(messages=[{"role": "user", "content": questions[i]}], max_tokens=8 + 4 * i)


class Collector:
    """A job's events, and an event set when its last one arrived."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.done = threading.Event()

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["type"] in ("final", "error"):
            self.done.set()

    @property
    def last(self) -> dict:
        assert self.done.wait(60), self.events
        return self.events[-1]

    @property
    def streamed_text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta")


def _job(key: str, request: dict) -> tuple[engine.Job, Collector]:
    out = Collector()
    return engine.Job(slug=SLUG, artifact_key=key, request=request, emit=out), out


def test_waiting_requests_run_as_one_batch_each_streamed_with_its_own_result(artifact_key):
    alone = [engine.generate(slug=SLUG, artifact_key=artifact_key, **_request(i))
             for i in range(4)]
    scheduler = engine.Scheduler(max_batch=8, max_queue=16)
    jobs = [_job(artifact_key, _request(i)) for i in range(4)]
    with scheduler._cond:  # the engine thread cannot take any before all four wait
        for job, _ in jobs:
            scheduler.submit(job)
    for (_, out), expected in zip(jobs, alone, strict=True):
        final = out.last
        assert final["type"] == "final" and final["batch"] == 4
        assert final["text"] == expected["text"] == out.streamed_text
        assert final["usage"] == expected["usage"]
        deltas = [e for e in out.events if e["type"] == "delta"]
        assert [e["n"] for e in deltas] == sorted(e["n"] for e in deltas)  # tokens so far
        assert deltas[0]["usage"]["cached_tokens"] == expected["usage"]["cached_tokens"]
    assert scheduler.batches == 1


def test_a_lone_request_runs_at_once_and_an_invalid_one_in_a_batch_fails_alone(artifact_key):
    scheduler = engine.Scheduler(max_batch=8, max_queue=16)
    job, out = _job(artifact_key, _request(0))
    scheduler.submit(job)
    assert out.last["type"] == "final" and out.last["batch"] == 1

    bad = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, top_p=7.0)
    (good_job, good), (bad_job, bad_out) = _job(artifact_key, _request(1)), _job(artifact_key, bad)
    with scheduler._cond:
        scheduler.submit(good_job)
        scheduler.submit(bad_job)
    assert bad_out.last == {"type": "error", "code": "invalid_request",
                            "message": bad_out.last["message"]}
    assert good.last["type"] == "final" and good.last["usage"]["output_tokens"] > 0


def test_a_full_queue_answers_busy_and_a_cancelled_job_stops(artifact_key):
    scheduler = engine.Scheduler(max_batch=1, max_queue=2)
    jobs = [_job(artifact_key, dict(_request(3), max_tokens=40)) for _ in range(3)]
    with scheduler._cond:
        scheduler.submit(jobs[0][0])
        scheduler.submit(jobs[1][0])
        with pytest.raises(engine.Busy):
            scheduler.submit(jobs[2][0])
        jobs[1][0].cancel()  # its client left while it waited: it never runs
    assert jobs[0][1].last["type"] == "final"
    assert jobs[1][1].events == []
    deadline = time.monotonic() + 10
    while scheduler.in_flight() and time.monotonic() < deadline:  # the thread's bookkeeping
        time.sleep(0.01)
    assert scheduler.in_flight() == 0


def test_a_cpu_engine_thread_uses_engine_cpu_threads_and_leaves_the_process_default(
    artifact_key, settings
):
    import torch

    default = torch.get_num_threads()
    settings.ENGINE_CPU_THREADS = default + 1  # distinct from the default on any machine
    seen: list[int] = []
    scheduler = engine.Scheduler(max_batch=1, max_queue=4)
    job, out = _job(artifact_key, _request(0))
    job.emit = lambda event: (seen.append(torch.get_num_threads()), out(event))
    scheduler.submit(job)
    assert out.last["type"] == "final"
    assert set(seen) == {default + 1}  # every event came from the engine thread
    assert torch.get_num_threads() == default  # precomputes (other threads) keep theirs
