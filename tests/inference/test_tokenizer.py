"""inference.tokenizer: a model's tokenizer and context without its weights, or the loaded
model's own when this process has it (never a second copy)."""

from __future__ import annotations

import pytest

from inference import document_prefix_ids, get_model
from inference import tokenizer as token_counting


@pytest.fixture(autouse=True)
def _no_cached_counters(monkeypatch) -> None:
    monkeypatch.setattr(token_counting, "_COUNTERS", {})


def test_counts_like_the_engine_without_loading_weights(monkeypatch) -> None:
    monkeypatch.setattr(token_counting, "_MODEL_CACHE", {})
    counter = token_counting.get_token_counter("tiny-qwen3")
    assert counter.max_context == 4096
    loaded = get_model("kvmarket/tiny-qwen3")
    text = "The lighthouse keeper wrote the weather in green ink."
    assert counter.document_tokens(text) == len(document_prefix_ids(loaded, text))


def test_reuses_the_tokenizer_of_a_loaded_model() -> None:
    loaded = get_model("kvmarket/tiny-qwen3")
    counter = token_counting.get_token_counter("builtin")
    assert counter.tokenizer is loaded.tokenizer
    assert counter.max_context == loaded.max_context
