"""The built-in model: small, in the repo, a real chat template, and context-dependent output."""

from __future__ import annotations

import json

from inference import BUILTIN_MODEL_ID, cold_generate, document_prefix_ids
from inference.models import BUILTIN_DIR
from tests.inference.helpers import DOCS, QUESTIONS


def test_weights_are_in_the_repo_and_small():
    names = {p.name for p in BUILTIN_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    total = sum(p.stat().st_size for p in BUILTIN_DIR.iterdir() if p.is_file())
    assert total <= 21 * 1024 * 1024
    config = json.loads((BUILTIN_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA like Qwen3


def test_loaded_identity(loaded):
    assert loaded.model_id == BUILTIN_MODEL_ID
    assert len(loaded.fingerprint) == 64 and len(loaded.tokenizer_fingerprint) == 64
    assert loaded.dtype == "float32" and loaded.device == "cpu"
    assert loaded.max_context == 4096 and loaded.n_layers == 4


def test_chat_template_turns_end_on_a_special_token(loaded):
    tok = loaded.tokenizer
    assert "chat_template" in json.loads((BUILTIN_DIR / "tokenizer_config.json").read_text())
    ids = document_prefix_ids(loaded, "A short passage.")
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start
    assert ids[-2] == im_end and tok.decode(ids[-1:]) == "\n"


def test_greedy_output_depends_on_context(loaded):
    outputs = set()
    for doc, question in zip(DOCS[:4], QUESTIONS[:4], strict=True):
        gen = cold_generate(loaded, doc, messages=[{"role": "user", "content": question}],
                            max_tokens=24)
        generated = gen.token_ids
        # Ignore a trailing end-of-turn: the count is over what the model chose to say.
        assert len(set(generated)) >= 8, (doc[:40], gen.text)
        outputs.add(tuple(generated))
    assert len(outputs) == 4  # different documents, different continuations


def test_raw_prompt_output_depends_on_context(loaded):
    texts = {cold_generate(loaded, doc, prompt="The module", max_tokens=24).text
             for doc in DOCS[4:8]}
    assert len(texts) >= 3  # the same prompt continues differently after different documents
