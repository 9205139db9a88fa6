"""Token-exactness of reuse: bitwise vs two-step prefill, greedy vs one-shot prefill."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from inference import (
    cold_generate,
    document_prefix_ids,
    generate,
    generate_stream,
    precompute,
    read_verification,
    verify,
)
from inference.engine import conversation_ids, suffix_ids
from tests.inference.helpers import DOCS, PAIRS, QUESTIONS


def _digest(art) -> str:
    h = hashlib.sha256()
    for t in (*art.keys, *art.values):
        h.update(t.contiguous().view(-1).numpy().tobytes())
    return h.hexdigest()


def test_enough_pairs():
    assert len(PAIRS) >= 20


@pytest.mark.parametrize("doc,question", PAIRS, ids=[f"pair{i}" for i in range(len(PAIRS))])
def test_float32_one_shot_greedy_24_of_24_and_bitwise(loaded, shared_store, doc_keys, doc,
                                                      question):
    report = verify(loaded, shared_store, doc_keys[doc], suffixes=[question], steps=24)
    case = report.cases[0]
    assert case["greedy_matched"] == 24, case
    assert report.bitwise_equal and report.kv_equal
    assert report.passed
    assert report.match_rate == 1.0


def test_report_is_stored_beside_the_artifact(loaded, shared_store, doc_keys):
    key = doc_keys[DOCS[0]]
    report = verify(loaded, shared_store, key)
    stored = read_verification(shared_store, key)
    assert stored == report.to_dict()
    assert shared_store.verification_path(key).parent == shared_store.path(key).parent
    assert len(report.cases) == 3 and report.greedy_total == 72


def test_bf16_report(loaded_bf16, store):
    doc = DOCS[1]
    key = precompute(loaded_bf16, doc, store=store).key
    report = verify(loaded_bf16, store, key, suffixes=QUESTIONS[:2])
    assert report.dtype == "bfloat16"
    assert report.bitwise_equal and report.kv_equal  # same engine, same shapes: still bitwise
    assert 0.0 <= report.match_rate <= 1.0
    assert report.max_logit_diff >= 0.0
    assert read_verification(store, key)["match_rate"] == report.match_rate


def test_conversation_tokenises_as_cached_prefix_plus_suffix(loaded):
    for doc in DOCS[:5]:
        for messages in (
            [{"role": "user", "content": "Quote it."}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Continue the text.\n"}],
        ):
            whole = conversation_ids(loaded, doc, messages=messages, prompt=None)
            prefix = document_prefix_ids(loaded, doc)
            assert whole == prefix + suffix_ids(loaded, messages=messages)


def test_two_questions_on_one_artifact_match_their_cold_runs(loaded, shared_store, doc_keys):
    doc = DOCS[2]
    key = doc_keys[doc]
    for question in ("What does the text say?", "Which sentence mentions the module?"):
        messages = [{"role": "user", "content": question}]
        warm = generate(loaded, shared_store, key, messages=messages, max_tokens=24)
        cold = cold_generate(loaded, doc, messages=messages, max_tokens=24)
        assert warm.token_ids == cold.token_ids and warm.text == cold.text
        assert warm.usage.cached_tokens == len(document_prefix_ids(loaded, doc))
        assert warm.usage.suffix_tokens == cold.usage.suffix_tokens
        assert warm.usage.prefill_tokens == warm.usage.suffix_tokens
        assert cold.usage.prefill_tokens == warm.usage.cached_tokens + warm.usage.suffix_tokens


def test_raw_prompt_and_sampling_match_cold(loaded, shared_store, doc_keys):
    doc = DOCS[3]
    key = doc_keys[doc]
    warm = generate(loaded, shared_store, key, prompt="In short,", max_tokens=16)
    cold = cold_generate(loaded, doc, prompt="In short,", max_tokens=16)
    assert warm.token_ids == cold.token_ids
    kw = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=16)
    msgs = [{"role": "user", "content": "Continue the text."}]
    a = generate(loaded, shared_store, key, messages=msgs, **kw)
    b = generate(loaded, shared_store, key, messages=msgs, **kw)
    c = cold_generate(loaded, doc, messages=msgs, **kw)
    assert a.token_ids == b.token_ids == c.token_ids


def test_empty_prompt_continues_the_document(loaded, shared_store, doc_keys):
    doc = DOCS[4]
    warm = generate(loaded, shared_store, doc_keys[doc], prompt="", max_tokens=8)
    cold = cold_generate(loaded, doc, prompt="", max_tokens=8)
    assert warm.token_ids == cold.token_ids


def test_eight_threads_equal_serial_and_tensors_untouched(loaded, shared_store, doc_keys):
    key = doc_keys[DOCS[5]]
    art = shared_store.load(key, loaded)
    before = _digest(art)
    requests = [
        dict(messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
             max_tokens=12, temperature=0.0 if i % 2 else 0.7, seed=i)
        for i in range(8)
    ]
    serial = [generate(loaded, shared_store, key, **r).token_ids for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda r: generate(loaded, shared_store, key, **r).token_ids,
                                 requests))
    assert parallel == serial
    assert _digest(shared_store.load(key, loaded)) == before
    assert shared_store.load(key, loaded) is art  # same shared tensors, never copied in place


def test_stream_yields_deltas_then_generation(loaded, shared_store, doc_keys):
    key = doc_keys[DOCS[6]]
    items = list(generate_stream(loaded, shared_store, key, prompt="The", max_tokens=16))
    final = items[-1]
    assert all(isinstance(x, str) for x in items[:-1])
    assert "".join(items[:-1]) == final.text
    assert final.finish_reason in ("stop", "length")
    assert final.timings.ttft_s <= final.timings.total_s


def test_stop_strings(loaded, shared_store, doc_keys):
    key = doc_keys[DOCS[7]]
    full = generate(loaded, shared_store, key, prompt="The", max_tokens=24)
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = generate(loaded, shared_store, key, prompt="The", max_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    streamed = list(generate_stream(loaded, shared_store, key, prompt="The", max_tokens=24,
                                    stop=[stop]))
    assert "".join(streamed[:-1]) == cut.text


def test_max_tokens_gives_length(loaded, shared_store, doc_keys):
    gen = generate(loaded, shared_store, doc_keys[DOCS[8]], prompt="The", max_tokens=3)
    assert gen.usage.output_tokens == len(gen.token_ids) <= 3
    if gen.usage.output_tokens == 3:
        assert gen.finish_reason == "length"


def test_verify_detects_a_wrong_cache(loaded, tmp_path):
    from inference import KVStore

    store = KVStore(tmp_path / "kv")
    key = precompute(loaded, DOCS[9], store=store).key
    good = store.load(key, loaded)
    # A same-shaped artifact whose stored K/V are slightly off: every check must notice.
    bad = good.to("cpu")
    bad.keys[0] = bad.keys[0] + 1e-3
    store.host.discard(key)
    store.host.put(bad)
    report = verify(loaded, store, key, suffixes=QUESTIONS[:1], steps=4, save=False)
    assert not report.kv_equal and not report.bitwise_equal and not report.passed
    assert report.max_logit_diff > 0
    assert not store.verification_path(key).exists()
