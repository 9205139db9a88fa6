"""Concurrent completions of one artifact, gathered by the worker's batching window.

Runs the real engine (built-in model, CPU) through marketplace.engine in several threads, as a
GPU worker with a thread pool would: the requests that arrive within the window are served by
one inference.generate_batch call, and each gets exactly what it would get alone.
"""

from __future__ import annotations

import threading

import pytest

from marketplace import engine

SLUG = "tiny-qwen3"
DOC = (
    "The Python Software Foundation License permits copying, modifying and distributing the "
    "software, provided the copyright notice and this permission notice are kept."
)


@pytest.fixture
def artifact_key(settings, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    settings.KV_STORE_DIR = tmp_path / "kv"
    engine.reset_store()
    monkeypatch.setenv("KVMARKET_FASTPATH", "1")  # the GPU path's batching, eagerly on CPU
    yield engine.precompute(slug=SLUG, text=DOC)["key"]
    engine.reset_store()


def _request(i: int) -> dict:
    questions = ["What is permitted?", "Quote the notice.", "Who holds the copyright?", "Why?"]
    return dict(messages=[{"role": "user", "content": questions[i]}], max_tokens=8 + 4 * i)


def test_requests_in_one_window_run_as_one_batch_with_their_own_results(settings, artifact_key):
    settings.COMPLETION_BATCH_WINDOW_MS = 0
    alone = [engine.generate(slug=SLUG, artifact_key=artifact_key, **_request(i)) for i in range(4)]

    settings.COMPLETION_BATCH_WINDOW_MS = 500
    batches, served = engine.batcher.batches, engine.batcher.requests
    results: list[dict | None] = [None] * 4

    def call(i: int) -> None:
        results[i] = engine.generate(slug=SLUG, artifact_key=artifact_key, **_request(i))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert engine.batcher.batches == batches + 1  # one window, one batch
    assert engine.batcher.requests == served + 4
    for got, expected in zip(results, alone, strict=True):
        assert got["text"] == expected["text"]
        assert got["usage"] == expected["usage"]
        assert got["finish_reason"] == expected["finish_reason"]


def test_an_invalid_request_in_a_batch_fails_alone(settings, artifact_key):
    from inference.errors import InvalidRequest

    settings.COMPLETION_BATCH_WINDOW_MS = 300
    results: list = [None] * 2
    bad = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, top_p=7.0)

    def call(i: int, request: dict) -> None:
        try:
            results[i] = engine.generate(slug=SLUG, artifact_key=artifact_key, **request)
        except InvalidRequest as exc:
            results[i] = exc

    threads = [
        threading.Thread(target=call, args=(0, _request(0))),
        threading.Thread(target=call, args=(1, bad)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results[1], InvalidRequest)
    assert isinstance(results[0], dict) and results[0]["usage"]["output_tokens"] > 0
