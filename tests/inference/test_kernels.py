"""The fast path's fused Triton kernels against the plain torch step (CPU: Triton's interpreter,
float32; the same kernels compiled for the GPU, with CUDA graphs, PDL and TMA: test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from inference.fastpath.model import PrefixKV, PrefixTable, prefix_capacity
from inference.fastpath.runner import FastReuse
from tests.inference.helpers import DOCS, QUESTIONS

kernels = pytest.importorskip("inference.fastpath.kernels")


@pytest.fixture(scope="module")
def pair(loaded):
    """The same model on the plain torch step and on the Triton kernels."""
    return FastReuse(loaded.model, capacity=64, kernels=False), FastReuse(
        loaded.model, capacity=64, kernels=True
    )


def _prefix(shared_store, doc_keys, loaded, doc: str) -> PrefixKV:
    art = shared_store.load(doc_keys[doc], loaded)
    return PrefixKV(list(zip(art.keys, art.values, strict=True)))


def _ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(" " + text, add_special_tokens=False)["input_ids"]


def test_kernel_step_gives_the_reference_logits_for_a_padded_batch(
    loaded, shared_store, doc_keys, pair
):
    reference, fused = pair
    assert fused.decoder.kernels and not reference.decoder.kernels
    prefix = _prefix(shared_store, doc_keys, loaded, DOCS[0])
    suffixes = [_ids(loaded, q) for q in QUESTIONS[:3]]
    assert len({len(s) for s in suffixes}) > 1  # padding and per-row lengths are exercised
    expected = reference.first_logits(prefix, suffixes)
    got = fused.first_logits(prefix, suffixes)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-5, rtol=0)


# Slow under Triton's interpreter: in CI (make test-all); the padded-batch step test above
# covers the same kernels in make test.
@pytest.mark.slow
def test_kernel_greedy_decode_matches_the_reference_token_for_token(
    loaded, shared_store, doc_keys, pair
):
    reference, fused = pair
    prefix = _prefix(shared_store, doc_keys, loaded, DOCS[1])
    suffixes = [_ids(loaded, q) for q in QUESTIONS[1:3]]
    expected = reference.greedy(prefix, suffixes, 10)
    assert fused.greedy(prefix, suffixes, 10) == expected
    assert len({t for row in expected for t in row}) >= 5  # a trained model, not a constant


def test_kernel_step_without_a_prefix_is_plain_causal_attention(loaded, pair):
    reference, fused = pair
    empty = PrefixKV([])
    suffix = _ids(loaded, QUESTIONS[0])
    expected = reference.first_logits(empty, [suffix])
    assert torch.allclose(fused.first_logits(empty, [suffix]), expected, atol=2e-5, rtol=0)


def test_split_prefix_attention_equals_softmax_over_all_keys():
    """Several key splits plus a suffix, merged by log-sum-exp: one softmax over all keys."""
    torch.manual_seed(0)
    n_heads, n_kv, d, n_prefix, seq, batch, capacity = 4, 2, 16, 300, 5, 2, 16
    q = torch.randn(batch * seq, n_heads * d)
    k_pre, v_pre = torch.randn(n_kv, n_prefix, d), torch.randn(n_kv, n_prefix, d)
    keys, values = torch.randn(batch, n_kv, capacity, d), torch.randn(batch, n_kv, capacity, d)
    start = torch.tensor([0, 3])  # row 1 already holds 3 suffix tokens
    n_valid = torch.tensor([5, 2])  # row 1's last 3 query tokens are padding
    n_splits, split_len = kernels.prefix_splits(n_prefix, batch * seq * 2, n_kv, n_sms=8)
    assert n_splits > 1 and (n_splits - 1) * split_len < n_prefix <= n_splits * split_len
    table = PrefixTable.of(PrefixKV([(k_pre, v_pre)]), 1, torch.device("cpu"), torch.float32)
    out = kernels.attention(
        q, table, keys, values, layer=0, start=start, n_valid=n_valid, seq_len=seq,
        n_heads=n_heads, scale=d**-0.5, n_sms=8,
    )
    for b in range(batch):
        for s in range(int(n_valid[b])):
            pos = int(start[b]) + s
            for h in range(n_heads):
                kv = h // (n_heads // n_kv)
                k_all = torch.cat([k_pre[kv], keys[b, kv, : pos + 1]])
                v_all = torch.cat([v_pre[kv], values[b, kv, : pos + 1]])
                row = q[b * seq + s, h * d : (h + 1) * d]
                expected = torch.softmax(k_all @ row * d**-0.5, dim=0) @ v_all
                got = out[b * seq + s, h * d : (h + 1) * d]
                assert torch.allclose(got, expected, atol=1e-5), (b, s, h)


class _LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's compile-time constants."""

    def __init__(self) -> None:
        self.constants: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **constants):
            self.constants.append(constants)

        return launch


def test_compiled_attention_is_one_variant_for_every_length_class_and_capacity(monkeypatch):
    """A worker's warm-up compiles what the launches' constants tell apart: with runtime
    loops (compiled kernels) neither the prefix's length class nor the suffix buffer's
    capacity is one of them (they made 150 variants of the attention, nearly all of the
    190 s warm-up on an H200). The interpreter's static loops still get the real bounds."""
    parts, merge = _LaunchRecorder(), _LaunchRecorder()
    monkeypatch.setattr(kernels, "_attention_parts_kernel", parts)
    monkeypatch.setattr(kernels, "_merge_kernel", merge)
    n_heads, n_kv, d, seq = 4, 2, 16, 8
    q = torch.zeros(seq, n_heads * d)
    start, n_valid = torch.tensor([0]), torch.tensor([seq])

    def launch(n_prefix: int, capacity: int, runtime_loop: bool) -> dict:
        kv = torch.zeros(n_kv, n_prefix, d)
        table = PrefixTable.of(PrefixKV([(kv, kv)]), 1, torch.device("cpu"), torch.float32)
        cache = torch.zeros(1, n_kv, capacity, d)
        kernels.attention(
            q, table, cache, cache, layer=0, start=start, n_valid=n_valid, seq_len=seq,
            n_heads=n_heads, scale=1.0, n_sms=8, runtime_loop=runtime_loop,
        )
        return parts.constants[-1]

    shapes = [(300, 16), (3000, 16), (300, 64), (20000, 128)]
    compiled = [launch(n, c, runtime_loop=True) for n, c in shapes]
    assert all(constants == compiled[0] for constants in compiled)
    interpreted = [launch(n, c, runtime_loop=False) for n, c in shapes]
    assert len({(c["SPLIT_LEN"], c["CAPACITY"]) for c in interpreted}) == len(shapes)
    assert [c["CAPACITY"] for c in interpreted] == [c for _, c in shapes]


def test_prefix_splits_fill_the_chip_with_few_compiled_variants():
    # One request of 48 tokens (192 query rows per KV head) on 132 SMs: 1-4 blocks per SM.
    n_splits, split_len = kernels.prefix_splits(4096, 192, 8, 132)
    assert 132 <= 3 * 8 * n_splits <= 4 * 132 and split_len % 64 == 0
    assert n_splits * split_len >= 4096 > (n_splits - 1) * split_len
    # A decode step (4 query rows per KV head): many splits, but a bounded merge.
    n_splits, split_len = kernels.prefix_splits(3774, 4, 8, 132)
    assert 16 <= n_splits <= 32 and split_len >= 64
    # A big batch fills the chip without splitting the prefix.
    assert kernels.prefix_splits(4096, 512 * 48 * 4, 8, 132) == (1, 4096)
    assert kernels.prefix_splits(0, 192, 8, 132) == (0, 0)
    # Graphs and kernels serve a length class: its capacity decides the splits.
    lengths = {
        kernels.prefix_splits(prefix_capacity(n), 192, 8, 132)[1] for n in range(100, 40000, 97)
    }
    assert len(lengths) <= 10
    # The merge kernel's static bound holds every split plus the suffix, for any length.
    most = max(
        kernels.prefix_splits(n, rows, 8, sms)[0]
        for n in range(1, 200000, 997)
        for rows in (4, 64, 192, 98304)
        for sms in (8, 132)
    )
    assert most + 1 <= kernels.MAX_PARTS


def test_fused_norm_rope_and_activation_round_like_the_reference(loaded):
    from inference.fastpath.model import FastDecoder

    decoder = FastDecoder(loaded.model, kernels=False)
    torch.manual_seed(1)
    x = torch.randn(6, decoder.hidden)
    delta = torch.randn(6, decoder.hidden)
    w = decoder.layers[0]
    expected_x = x + delta
    h = kernels.add_rms_norm(x, delta[None], w.input_norm, decoder.eps)
    assert torch.equal(x, expected_x)  # the residual add happened in place
    assert torch.allclose(h, decoder._rms_norm(expected_x, w.input_norm), atol=1e-6)

    gate_up = torch.randn(6, 2 * decoder.intermediate)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert torch.allclose(kernels.silu_mul(gate_up[None], torch.float32), expected, atol=1e-6)
    # Partial products (split-K) are summed before the activation.
    parts = torch.stack([gate_up * 0.25, gate_up * 0.75])
    assert torch.allclose(kernels.silu_mul(parts, torch.float32), expected, atol=1e-5)


def test_step_start_and_end_norms_gather_their_rows(loaded):
    from inference.fastpath.model import FastDecoder

    decoder = FastDecoder(loaded.model, kernels=False)
    w = decoder.layers[0]
    ids = torch.tensor([5, 0, 17, 5, 3, 9])
    x, h = kernels.embed_rms_norm(ids, decoder.embed, w.input_norm, decoder.eps)
    assert torch.equal(x, decoder.embed[ids])
    assert torch.equal(h, kernels.add_rms_norm(decoder.embed[ids], None, w.input_norm,
                                               decoder.eps))
    # Two batch rows of three tokens: row 0 holds 2 valid tokens, row 1 all 3.
    torch.manual_seed(3)
    parts = torch.randn(2, 6, decoder.hidden)
    n_valid = torch.tensor([2, 3])
    lengths = torch.tensor([10, 20])
    before = x.clone()
    last = kernels.last_rows_rms_norm(x, parts, decoder.final_norm, decoder.eps,
                                      n_valid=n_valid, seq_len=3, lengths=lengths)
    every_row = kernels.add_rms_norm(before.clone(), parts, decoder.final_norm, decoder.eps)
    assert torch.equal(last, every_row[[1, 5]])  # bitwise the rows the LM head needs
    assert torch.equal(x, before)  # the residual is not written at the step's end
    assert lengths.tolist() == [12, 23]


def test_kernel_step_with_all_logits_gives_every_position(loaded, shared_store, doc_keys, pair):
    from inference.fastpath.model import SuffixState

    decoder = pair[1].decoder
    prefix = _prefix(shared_store, doc_keys, loaded, DOCS[0])
    ids = torch.tensor([_ids(loaded, q)[:5] for q in QUESTIONS[:2]])
    n_valid = torch.tensor([3, 5])  # row 0: two padding tokens after its last real one
    runs = {}
    for every in (False, True):
        state = SuffixState(decoder, batch=2, capacity=16, device=ids.device)
        logits = decoder.forward(ids, prefix=prefix, state=state, n_valid=n_valid,
                                 all_logits=every, fresh=True)
        runs[every] = logits, state.lengths.tolist()
    (last, last_lengths), (every, every_lengths) = runs[False], runs[True]
    assert every.shape == (2, 5, last.shape[-1])
    assert torch.allclose(every[[0, 1], [2, 4]], last, atol=1e-5, rtol=0)
    assert last_lengths == every_lengths == [3, 5]


def test_silu_mul_reads_gate_and_up_interleaved_in_groups():
    torch.manual_seed(2)
    gate, up = torch.randn(4, 96), torch.randn(4, 96)
    expected = torch.nn.functional.silu(gate) * up
    # Columns as interleave_gate_up lays out weight rows: 32 gate, their 32 up, and so on.
    interleaved = torch.stack([gate.view(4, 3, 32), up.view(4, 3, 32)], dim=2).reshape(4, 192)
    got = kernels.silu_mul(interleaved[None], torch.float32, group=32)
    assert torch.allclose(got, expected, atol=1e-6)
    weights = kernels.interleave_gate_up(gate.T.contiguous(), up.T.contiguous(), 32)
    assert torch.equal(weights.T, interleaved)


@pytest.mark.parametrize("tma", [False, True], ids=["pointer_loads", "tma_loads"])
@pytest.mark.parametrize("rows", [5, 48])
def test_gate_up_product_computes_the_activation_in_its_own_blocks(rows, tma):
    torch.manual_seed(rows)
    x, gate, up = torch.randn(rows, 640) / 25, torch.randn(96, 640), torch.randn(96, 640)
    weight = kernels.interleave_gate_up(gate, up, 32)
    expected = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    for n_sms in (2, 8):  # 3 tiles: one split on 2 SMs (fused), two splits on 8 (not fused)
        splits = kernels.matmul_plan(192, 640, n_sms, waves=1.0 if rows > 16 else 2.0)[0]
        assert (splits == 1) == (n_sms == 2)
        act = kernels.matmul(x, weight, n_sms, tma=tma, silu_group=32)
        assert act.shape == (rows, 96) and act.dtype == torch.float32
        assert torch.allclose(act, expected, rtol=1e-4, atol=1e-4)
        # Fused or not, the same rounding steps: equal to the partial sums then silu_mul.
        parts = kernels.matmul(x, weight, n_sms, tma=tma)
        assert torch.equal(act, kernels.silu_mul(parts, torch.float32, group=32))


@pytest.mark.parametrize("tma", [False, True], ids=["pointer_loads", "tma_loads"])
@pytest.mark.parametrize("rows", [1, 5, 48])
def test_split_k_products_sum_to_the_matrix_product(rows, tma):
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 640), torch.randn(384, 640)
    splits, k_per_split = kernels.matmul_plan(384, 640, n_sms=8, waves=2.0)
    assert splits > 1 and k_per_split % 128 == 0  # split K, in whole blocks
    parts = kernels.matmul(x, weight, n_sms=8, waves=2.0, tma=tma)
    assert parts.shape == (splits, rows, 384) and parts.dtype == torch.float32
    assert torch.allclose(parts.sum(0), x @ weight.T, atol=1e-4)
    # K not a multiple of the block: the last block's columns past K must count as zeros.
    x, weight = torch.randn(rows, 200), torch.randn(96, 200)
    parts = kernels.matmul(x, weight, n_sms=8, waves=2.0, tma=tma, block_k=128)
    assert torch.allclose(parts.sum(0), x @ weight.T, atol=1e-4)


def test_kernel_step_with_one_product_per_matrix_gives_the_same_tokens(
    loaded, shared_store, doc_keys, pair
):
    """Above a few rows the step uses whole cuBLAS products instead of split-K partials."""
    reference, fused = pair
    prefix = _prefix(shared_store, doc_keys, loaded, DOCS[2])
    suffix = _ids(loaded, QUESTIONS[4])
    split_k = fused.first_logits(prefix, [suffix])
    fused.decoder.skinny_rows = 0
    try:
        whole = fused.first_logits(prefix, [suffix])
    finally:
        fused.decoder.skinny_rows = 64
    expected = reference.first_logits(prefix, [suffix])
    assert torch.allclose(split_k, expected, atol=2e-5, rtol=0)
    assert torch.allclose(whole, expected, atol=2e-5, rtol=0)


@pytest.mark.slow  # six prefixes under the interpreter; in CI (make test-all)
def test_one_slot_serves_every_prefix_of_a_length_class(loaded, shared_store, doc_keys, pair):
    """The kernels read the prefix through a table of addresses and a length, so a slot (and,
    on GPU, its captured graphs) is per length class, not per document: a new document runs
    on what is already there, including splits past its end, which merge as empty."""
    from inference.fastpath.model import prefix_capacity

    reference, fused = pair
    prefixes = [_prefix(shared_store, doc_keys, loaded, doc) for doc in DOCS[:6]]
    by_class: dict[int, set[int]] = {}
    for prefix in prefixes:
        by_class.setdefault(prefix_capacity(prefix.n_tokens), set()).add(prefix.n_tokens)
    assert any(len(lengths) > 1 for lengths in by_class.values())  # shared classes exercised
    suffix = _ids(loaded, QUESTIONS[4])
    fused._slots.clear()
    for prefix in prefixes:
        expected = reference.first_logits(prefix, [suffix])
        assert torch.allclose(fused.first_logits(prefix, [suffix]), expected, atol=2e-5, rtol=0)
    assert sorted(key[0] for key in fused._slots) == sorted(by_class)
    # Letting a prefix go unbinds it but keeps the slot for the next document of its class.
    last = prefixes[-1]
    fused.forget(last)
    assert len(fused._slots) == len(by_class)
    assert all(slot.prefix is not last for slot in fused._slots.values())


def test_prefix_table_refuses_what_the_kernels_cannot_read():
    from inference.fastpath.model import prefix_capacity

    assert [prefix_capacity(n) for n in (0, 1, 64, 65, 3774, 4096)] == [0, 64, 64, 128, 4096, 4096]
    table = PrefixTable(2, 128, torch.device("cpu"), torch.float32)
    layer = (torch.zeros(2, 100, 8), torch.zeros(2, 100, 8))
    table.bind(PrefixKV([layer, layer]))
    assert int(table.n_tokens) == 100 and int(table.entries[1, 3]) == 8
    with pytest.raises(ValueError, match="float32"):
        table.bind(PrefixKV([(layer[0].double(), layer[1].double())] * 2))
    with pytest.raises(ValueError, match="exceeds"):
        table.bind(PrefixKV([(torch.zeros(2, 129, 8),) * 2] * 2))
    with pytest.raises(ValueError, match="layers"):
        table.bind(PrefixKV([layer]))
    strided = torch.zeros(2, 100, 16)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        table.bind(PrefixKV([(strided, strided)] * 2))
    odd = torch.zeros(2, 100, 6)  # a token stride of 6 elements: no vector loads
    with pytest.raises(ValueError, match="alignment"):
        table.bind(PrefixKV([(odd, odd)] * 2))
    shifted = torch.zeros(2 * 100 * 8 + 1)[1:].view(2, 100, 8)  # 4 bytes past an aligned start
    with pytest.raises(ValueError, match="alignment"):
        table.bind(PrefixKV([(shifted, shifted)] * 2))


def test_prefetch_settings_read_from_the_environment():
    from inference.fastpath.model import _prefetch_overrides

    assert _prefetch_overrides("") == {}
    assert _prefetch_overrides("gate_up=384:first, down=128") == {
        "gate_up": (384, True),
        "down": (128, False),
    }
    for bad in ("gate=384", "down=lots", "down=128:all"):
        with pytest.raises(ValueError, match="KVMARKET_PREFETCH"):
            _prefetch_overrides(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_tokens_pick_the_first_maximum_as_torch_argmax(dtype):
    vocab = 2 * kernels.GREEDY_CHUNK + 37  # three chunks, the last one partial
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[1, 100] = logits[1, kernels.GREEDY_CHUNK + 5] = 50.0  # a tie across chunks
    logits[2, 7] = logits[2, 9] = 60.0  # a tie inside a chunk
    logits[3, vocab - 1] = 70.0  # the last column, in the partial chunk
    logits[4] = float("-inf")  # nothing finite: torch picks column 0
    got = kernels.greedy_tokens(logits)
    assert got.dtype == torch.long
    assert got.tolist() == torch.argmax(logits, dim=-1).tolist() == [
        int(torch.argmax(logits[0])), 100, 7, vocab - 1, 0
    ]


def test_greedy_tokens_write_into_a_given_buffer():
    logits = torch.zeros(3, 50)
    logits[0, 4] = logits[1, 49] = logits[2, 0] = 1.0
    out = torch.full((3,), -1, dtype=torch.long)
    assert kernels.greedy_tokens(logits, out=out) is out
    assert out.tolist() == [4, 49, 0]
