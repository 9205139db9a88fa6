"""The GPU fast path's logic, checked on CPU with the trained built-in model (float32).

CUDA graphs, flash attention and pinned copies only run on the GPU machine (test_gpu.py); what is
checked here is that the split prefix/suffix attention, its log-sum-exp merge, padding and
per-row lengths compute the same thing as transformers.
"""

from __future__ import annotations

import pytest
import torch

from inference.fastpath.model import FastDecoder, PrefixKV
from inference.fastpath.runner import FastReuse
from inference.fastpath.transfer import HostPrefix, read_artifact_into_host
from tests.inference.helpers import DOCS, QUESTIONS


@pytest.fixture(scope="module")
def fast(loaded) -> FastReuse:
    return FastReuse(loaded.model, capacity=96)


def _prefix(shared_store, doc_keys, loaded, doc: str):
    art = shared_store.load(doc_keys[doc], loaded)
    return art, PrefixKV(list(zip(art.keys, art.values, strict=True)))


def _suffix_ids(loaded, question: str) -> list[int]:
    return loaded.tokenizer(" " + question, add_special_tokens=False)["input_ids"]


def _cold_greedy(loaded, ids: list[int], steps: int) -> list[int]:
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = loaded.model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_fast_greedy_matches_cold_prefill_token_for_token(loaded, shared_store, doc_keys, fast):
    distinct = set()
    for doc, question in list(zip(DOCS, QUESTIONS * 4, strict=False))[:6]:
        art, prefix = _prefix(shared_store, doc_keys, loaded, doc)
        suffix = _suffix_ids(loaded, question)
        got = fast.greedy(prefix, [suffix], 24)[0]
        assert got == _cold_greedy(loaded, art.token_ids + suffix, 24)
        distinct.update(got)
    assert len(distinct) >= 8  # a trained model: the comparison is not trivially equal


def test_batched_rows_equal_one_at_a_time(loaded, shared_store, doc_keys, fast):
    _, prefix = _prefix(shared_store, doc_keys, loaded, DOCS[0])
    suffixes = [_suffix_ids(loaded, q) for q in QUESTIONS]  # different lengths: padding
    assert len({len(s) for s in suffixes}) > 1
    one_at_a_time = [fast.greedy(prefix, [s], 24)[0] for s in suffixes]
    assert fast.greedy(prefix, suffixes, 24) == one_at_a_time


def test_logits_match_transformers_and_prefix_is_never_written(loaded, shared_store, doc_keys):
    art, prefix = _prefix(shared_store, doc_keys, loaded, DOCS[1])
    before = [(k.clone(), v.clone()) for k, v in prefix.layers]
    suffix = _suffix_ids(loaded, QUESTIONS[2])
    decoder = FastDecoder(loaded.model)
    fast = FastReuse(loaded.model, capacity=64)
    logits = fast.first_logits(prefix, [suffix])[0]
    with torch.inference_mode():
        expected = loaded.model(torch.tensor([art.token_ids + suffix])).logits[0, -1]
    assert torch.allclose(logits, expected, atol=1e-4, rtol=0)
    assert decoder.n_kv_heads == art.keys[0].shape[0]
    for (k0, v0), (k1, v1) in zip(before, prefix.layers, strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_host_prefix_gives_bitwise_the_same_logits(loaded, shared_store, doc_keys, fast):
    _, prefix = _prefix(shared_store, doc_keys, loaded, DOCS[2])
    suffix = _suffix_ids(loaded, QUESTIONS[0])
    host = HostPrefix.from_layers(prefix.layers)
    assert torch.equal(
        fast.first_logits_from_host(host, [suffix]), fast.first_logits(prefix, [suffix])
    )
    fast.forget_host(host)


def test_artifact_read_into_host_memory_is_verified_per_tensor(
    loaded, shared_store, doc_keys, tmp_path
):
    import hashlib
    import shutil

    from inference.errors import ArtifactCorrupted

    key = doc_keys[DOCS[3]]
    art = shared_store.load(key, loaded)
    hashes = {
        f"layers.{i}.{kind}": hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()
        for i, (k, v) in enumerate(zip(art.keys, art.values, strict=True))
        for kind, t in (("keys", k), ("values", v))
    }
    host = read_artifact_into_host(shared_store.path(key), threads=4, tensor_sha256=hashes)
    for i, (k, v) in enumerate(zip(art.keys, art.values, strict=True)):
        assert torch.equal(host.buffer[i, 0], k) and torch.equal(host.buffer[i, 1], v)

    damaged = tmp_path / "damaged.safetensors"
    shutil.copy(shared_store.path(key), damaged)
    with damaged.open("r+b") as fh:  # flip one byte near the end: inside the last tensor
        fh.seek(-10, 2)
        byte = fh.read(1)
        fh.seek(-10, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactCorrupted):
        read_artifact_into_host(damaged, threads=4, tensor_sha256=hashes)


def test_engine_generate_on_the_fast_path_matches_the_transformers_path(
    loaded, shared_store, doc_keys, monkeypatch
):
    from inference import generate

    request = dict(
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=24,
        temperature=0.8,
        top_p=0.9,
        seed=11,
        stop=["\n\n"],
    )
    key = doc_keys[DOCS[4]]
    results = {}
    for switch in ("0", "1"):  # transformers over a DynamicCache, then the fast path (eager)
        monkeypatch.setenv("KVMARKET_FASTPATH", switch)
        results[switch] = [
            generate(loaded, shared_store, key, **request),
            generate(loaded, shared_store, key, **dict(request, temperature=0.0)),
        ]
    for slow, fast in zip(results["0"], results["1"], strict=True):
        assert fast.token_ids == slow.token_ids and fast.text == slow.text
        assert fast.usage == slow.usage
    assert len(set(results["1"][1].token_ids)) >= 8


def test_artifacts_carry_per_tensor_hashes_and_old_ones_still_read(
    loaded, shared_store, doc_keys, tmp_path
):
    from inference.artifact import KVArtifact, read_artifact, read_manifest, write_artifact

    art = shared_store.load(doc_keys[DOCS[5]], loaded)
    assert set(read_manifest(shared_store.path(art.key))["tensor_sha256"]) == {
        "token_ids",
        *(f"layers.{i}.{kind}" for i in range(len(art.keys)) for kind in ("keys", "values")),
    }
    legacy = KVArtifact(
        key=art.key,
        manifest={**art.manifest, "tensor_sha256": None},  # as written before the field existed
        token_ids=art.token_ids,
        keys=art.keys,
        values=art.values,
    )
    write_artifact(tmp_path / "legacy.safetensors", legacy)
    old = read_artifact(tmp_path / "legacy.safetensors", loaded)
    new = read_artifact(shared_store.path(art.key), loaded)
    assert "host_prefix" not in old.extras and "host_prefix" in new.extras
    assert old.token_ids == new.token_ids == art.token_ids
    for a, b in zip(old.keys + old.values, new.keys + new.values, strict=True):
        assert torch.equal(a, b)


def test_generate_batch_gives_each_request_what_generate_gives(
    loaded, shared_store, doc_keys, monkeypatch
):
    from inference import generate, generate_batch

    key = doc_keys[DOCS[6]]
    requests = [
        dict(messages=[{"role": "user", "content": q}], max_tokens=n, temperature=t, seed=s)
        for q, n, t, s in zip(
            QUESTIONS, (24, 5, 16, 24, 1, 12), (0, 0, 0.8, 0.7, 0, 0), range(6), strict=True
        )
    ]
    requests.append(dict(prompt=" The module", max_tokens=10, stop=["."]))
    monkeypatch.setenv("KVMARKET_FASTPATH", "0")
    expected = [generate(loaded, shared_store, key, **r) for r in requests]
    monkeypatch.setenv("KVMARKET_FASTPATH", "1")  # batched, on the fast path (eager on CPU)
    got = generate_batch(loaded, shared_store, key, requests)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [g.text for g in got] == [g.text for g in expected]
    assert [g.usage for g in got] == [g.usage for g in expected]
    assert [g.finish_reason for g in got] == [g.finish_reason for g in expected]
    assert len({len(g.token_ids) for g in got}) > 1  # rows finished at different steps


def test_rope_tables_are_the_models_own_when_its_buffers_were_cast(loaded):
    """A model cast with .to(bfloat16) rotates with bf16-rounded frequencies; so must reuse."""
    import copy

    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    decoder = FastDecoder(model, kernels=False)
    positions = torch.arange(3000, 3100)[None]
    hidden = torch.zeros(1, 100, decoder.hidden, dtype=torch.bfloat16)
    cos, sin = model.model.rotary_emb(hidden, positions)
    ours = decoder._rope_tables(positions)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], sin)


def test_kernels_read_rope_rows_equal_to_a_steps_own_tables(loaded):
    """The kernels take each token's cos/sin row from tables of every position, built once;
    a row must be what the step's own table would hold, bit for bit."""
    decoder = FastDecoder(loaded.model, kernels=True)
    cos, sin = decoder.rope_table
    assert cos.shape == (loaded.model.config.max_position_embeddings, decoder.head_dim)
    positions = torch.tensor([0, 1, 47, 1362, 3000, cos.shape[0] - 1])
    step_cos, step_sin = decoder._rope_tables(positions)
    assert torch.equal(cos[positions], step_cos) and torch.equal(sin[positions], step_sin)


def test_warm_up_in_the_middle_of_a_request_leaves_it_intact(
    loaded, shared_store, doc_keys, fast
):
    """Graphs for decode steps are captured at a request's first decode step: the warm-up
    runs before the capture must not disturb that request's suffix state."""
    _, prefix = _prefix(shared_store, doc_keys, loaded, DOCS[3])
    suffix = _suffix_ids(loaded, QUESTIONS[3])
    with fast.session(prefix, graphs=False) as clean:
        token = int(clean.step(suffix).argmax())
        expected = clean.step([token])
    with fast.session(prefix, graphs=False) as disturbed:
        assert int(disturbed.step(suffix).argmax()) == token
        slot = disturbed._slot
        before = slot.state.lengths.clone()
        fast._warm_up(slot, torch.tensor([[7]]), torch.ones(1, dtype=torch.long), fresh=False)
        assert torch.equal(slot.state.lengths, before)
        assert torch.equal(disturbed.step([token]), expected)


def test_verify_checks_what_the_fast_path_serves(loaded, shared_store, doc_keys, monkeypatch):
    from inference import verify

    key = doc_keys[DOCS[7]]
    monkeypatch.setenv("KVMARKET_FASTPATH", "1")  # the serving path, eager on CPU
    report = verify(loaded, shared_store, key, suffixes=QUESTIONS[:2], steps=24, save=False)
    assert report.fast_path_bitwise_equal is True
    assert report.fast_path_greedy_matched == 48 and report.passed
    assert all(case["fast_path_greedy_matched"] == 24 for case in report.cases)

    # A fast path that drifts from one-shot prefill fails float32 verification.
    real_greedy = FastReuse.greedy

    def drifting(self, prefix, suffixes, max_new_tokens):
        rows = real_greedy(self, prefix, suffixes, max_new_tokens)
        return [row[:-1] + [(row[-1] + 1) % 50] for row in rows]

    monkeypatch.setattr(FastReuse, "greedy", drifting)
    report = verify(loaded, shared_store, key, suffixes=QUESTIONS[:1], steps=24, save=False)
    assert report.fast_path_greedy_matched == 23 and not report.passed

    monkeypatch.setenv("KVMARKET_FASTPATH", "0")
    report = verify(loaded, shared_store, key, suffixes=QUESTIONS[:1], steps=24, save=False)
    assert report.fast_path_bitwise_equal is None and report.passed


def test_suffix_buffers_are_sized_to_the_request(loaded, shared_store, doc_keys):
    """Buffers scale with batch x capacity: a batch of 512 at the full capacity of 1024 would
    not fit in GPU memory, so each slot takes the power of two its requests need."""
    fast = FastReuse(loaded.model, capacity=1024)
    assert [fast.slot_capacity(n) for n in (1, 64, 65, 1000, 1024)] == [64, 64, 128, 1024, 1024]
    with pytest.raises(ValueError):
        fast.slot_capacity(1025)
    _, prefix = _prefix(shared_store, doc_keys, loaded, DOCS[8])
    suffix = _suffix_ids(loaded, QUESTIONS[5])
    fast.greedy(prefix, [suffix] * 3, 80)
    (slot,) = fast._slots.values()
    assert slot.state.capacity == fast.slot_capacity(len(suffix) + 80) == 128
    assert slot.state.keys[0].shape[2] == 128
    with fast.session(prefix, graphs=False, max_tokens=len(suffix) + 2) as session:
        session.step(suffix)
        assert session.capacity == 64
        session.step([1])
        with pytest.raises(ValueError):
            session.step([1] * (session.capacity - session.length + 1))


def test_a_first_step_needs_a_token_in_every_suffix(loaded, shared_store, doc_keys):
    fast = FastReuse(loaded.model, capacity=64)
    _, prefix = _prefix(shared_store, doc_keys, loaded, DOCS[8])
    for suffixes in ([], [[]], [[5], []]):
        with pytest.raises(ValueError, match="at least one token"):
            fast.first_logits(prefix, suffixes)
    assert not fast._slots  # nothing was set up for the refused request


def test_slots_past_the_byte_budget_go_least_recently_used_first(
    loaded, shared_store, doc_keys
):
    """Slots hold suffix buffers of batch x capacity: a count limit alone would let a few large
    batches take the GPU's memory. The slot in use is never the one dropped."""
    _, prefix = _prefix(shared_store, doc_keys, loaded, DOCS[3])
    suffix = _suffix_ids(loaded, QUESTIONS[2])
    probe = FastReuse(loaded.model, capacity=64)
    probe.first_logits(prefix, [suffix])
    one_row = next(iter(probe._slots.values())).nbytes
    fast = FastReuse(loaded.model, capacity=64, max_slot_bytes=6 * one_row)
    for batch in (1, 2, 4):  # 7 rows' worth: the oldest (1 row) must go
        fast.first_logits(prefix, [suffix] * batch)
    assert sorted(key[1] for key in fast._slots) == [2, 4]
    assert sum(slot.nbytes for slot in fast._slots.values()) == 6 * one_row
    fast.first_logits(prefix, [suffix] * 8)  # alone over the budget: kept, the rest dropped
    assert [key[1] for key in fast._slots] == [8]
    fast.first_logits(prefix, [suffix] * 2)
    assert [key[1] for key in fast._slots] == [2]


def test_warm_up_runs_the_fast_path_and_leaves_nothing_behind(loaded, monkeypatch):
    from inference import warm_up
    from inference.engine import _fast_reuse

    monkeypatch.setenv("KVMARKET_FASTPATH", "0")
    assert warm_up(loaded) == {"fast_path": False, "runs": 0, "seconds": 0.0}
    monkeypatch.setenv("KVMARKET_FASTPATH", "1")  # eager on CPU; compiles and captures on CUDA
    # Slots keyed by a dead prefix's id (left by earlier tests) could be taken for a synthetic
    # prefix's and freed with it: start from none, so "nothing behind" is exact.
    _fast_reuse(loaded)._slots.clear()
    report = warm_up(loaded, prefix_tokens=(64, 8000), suffix_tokens=(3, 64), batches=(2, 8))
    # 2 prefixes x every suffix capacity (64 ... 1024) for the 3-token suffix and the four
    # that can hold a 64-token one, then 2 batch sizes
    assert report["fast_path"] and report["runs"] == 2 * (5 + 4) + 2
    assert list(_fast_reuse(loaded)._slots) == []  # synthetic prefixes are freed


def test_freeze_startup_heap_collects_start_up_garbage_and_freezes_the_survivors():
    import gc
    import weakref

    from inference import freeze_startup_heap

    class Node:
        pass

    survivor, cycle = Node(), Node()
    cycle.itself = cycle  # garbage only the collector finds
    gone = weakref.ref(cycle)
    del cycle
    frozen_before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gone() is None
        # The survivor is out of every generation a later collection walks.
        assert gc.get_freeze_count() > frozen_before
        assert not any(obj is survivor for obj in gc.get_objects())
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert any(obj is survivor for obj in gc.get_objects())


def test_a_slot_does_not_keep_a_finished_requests_prefix_alive(loaded, shared_store, doc_keys):
    """Once the store and the request let a document go, its KV must be freeable: slots (and
    the graphs they serve) hold the bound prefix only weakly."""
    import gc
    import weakref

    fast = FastReuse(loaded.model, capacity=64)
    art, _ = _prefix(shared_store, doc_keys, loaded, DOCS[5])
    prefix = PrefixKV([(k.clone(), v.clone()) for k, v in zip(art.keys, art.values, strict=True)])
    suffix = _suffix_ids(loaded, QUESTIONS[2])
    first = fast.first_logits(prefix, [suffix])
    (slot,) = fast._slots.values()
    assert slot.prefix is prefix
    # The same prefix again: bound already, the same result.
    assert torch.equal(fast.first_logits(prefix, [suffix]), first)
    alive = weakref.ref(prefix)
    del prefix
    gc.collect()
    assert alive() is None and slot.prefix is None


@pytest.mark.parametrize("rows", [[[5, 6, 7]], [[5, 6, 7], [8]], [[1] * 16]])
def test_inputs_written_in_place_equal_the_packed_list(rows):
    # A first step's graph copies its inputs from one pinned buffer: token rows padded to the
    # width, then each row's length. A lone request writes it in place; stale values left by
    # a longer earlier request must not survive in the padding.
    import numpy as np

    from inference.fastpath.runner import _pack_into, _packed

    width = 16
    out = np.full(len(rows) * width + len(rows), 99, dtype=np.int64)
    _pack_into(out, rows, width)
    assert out.tolist() == _packed(rows, width)


def test_a_request_past_the_context_fails_before_any_step_and_leaves_the_engine_usable(
    loaded, shared_store, doc_keys, monkeypatch
):
    # The first step is launched before the decode loop is built: the context check has to
    # come first, with a clear error, and the session must be let go.
    from inference import engine, generate
    from inference.errors import InvalidRequest

    key = doc_keys[DOCS[2]]
    cached = shared_store.load(key, loaded).n_tokens
    forward, steps = engine.forward, []
    monkeypatch.setattr(engine, "forward", lambda *a, **k: steps.append(1) or forward(*a, **k))
    too_long = [7] * (loaded.max_context - cached)
    with pytest.raises(InvalidRequest, match="tokens of context"):
        generate(loaded, shared_store, key, prompt_ids=too_long, max_tokens=1)
    assert steps == []
    ok = generate(loaded, shared_store, key, prompt_ids=[7, 8, 9], max_tokens=2)
    assert ok.usage.output_tokens == 2 and len(steps) == 2


def test_a_stream_dropped_before_its_first_item_lets_the_engine_go(
    loaded, shared_store, doc_keys, monkeypatch
):
    # A stream starts its first step (and holds the one-request-at-a-time GPU lock) when it is
    # made, not when it is first iterated: dropped unread, it must still let the lock go.
    import gc

    from inference import engine, generate_stream

    monkeypatch.setenv("KVMARKET_FASTPATH", "1")  # the serving path, eager on CPU
    key = doc_keys[DOCS[1]]
    stream = generate_stream(loaded, shared_store, key, prompt_ids=[7, 8, 9], max_tokens=2)
    lock = engine._fast_reuse(loaded)._lock
    try:
        assert lock.locked()
        del stream
        gc.collect()
        assert not lock.locked()
    finally:  # a failure here must not leave later tests waiting on the lock
        if lock.locked():
            lock.release()
    assert engine.generate(loaded, shared_store, key, prompt_ids=[7, 8, 9], max_tokens=2)


class _Recorded:
    """Stands in for a CUDA event or graph on CPU: counts the calls the runner makes."""

    def __init__(self) -> None:
        self.calls = 0

    def synchronize(self) -> None:
        self.calls += 1

    replay = synchronize


def test_a_first_step_asks_the_gpu_about_its_inputs_only_when_the_host_has_not_seen_the_end(
    fast, monkeypatch
):
    # A graph's first step copies its inputs from a pinned buffer, so a request may write the
    # buffer only once the graph's last replay has read it. The host knows that without a
    # CUDA call once it has waited for a greedy token the slot's graphs wrote after it.
    import numpy as np

    from inference.fastpath.runner import _Graph, graph_greedy

    def graph(width: int) -> _Graph:
        return _Graph(
            graph=_Recorded(), input_ids=None, n_valid=None, logits=torch.zeros(1, 4),
            host_inputs=None, host_array=np.full(width + 1, 99, dtype=np.int64),
            inputs_read=_Recorded(), greedy_host=torch.tensor([3]),
            greedy_array=np.array([3]), greedy_ready=_Recorded(),
        )

    first, later = graph(16), graph(1)
    slot = type("Slot", (), {"graphs": {16: first, 1: later}, "last": None})()
    monkeypatch.setattr(fast, "_ready_graph", lambda *args: (slot, first))
    prefix = PrefixKV([])

    fast._first_step(prefix, [[5, 6, 7]])  # never replayed: nothing to wait for
    assert first.inputs_read.calls == 0 and first.graph.calls == 1
    assert first.host_array.tolist() == [5, 6, 7] + [0] * 13 + [3]
    assert slot.last is first and not first.finished
    fast._first_step(prefix, [[8]])  # the replay before may still be reading: ask
    assert first.inputs_read.calls == 1 and first.graph.calls == 2
    slot.last = later  # a decode step ran after it; its greedy token is waited for
    later.finished = False
    assert graph_greedy(slot) == [3] and later.greedy_ready.calls == 1
    assert first.finished and later.finished
    fast._first_step(prefix, [[9, 10]])
    assert first.inputs_read.calls == 1 and first.graph.calls == 3


def test_the_fast_path_of_a_collected_model_is_let_go(loaded, monkeypatch):
    """The runner cache is keyed by id(loaded): a collected model's entry must go, or a new
    model that gets the same id would be served by its predecessor's runner."""
    import copy
    import gc

    from inference import engine

    monkeypatch.setenv("KVMARKET_FASTPATH", "1")
    other = copy.copy(loaded)  # another LoadedModel (sharing the weights)
    key = id(other)
    assert engine._fast_reuse(other) is not None and key in engine._FAST_REUSE
    del other
    gc.collect()
    assert key not in engine._FAST_REUSE
