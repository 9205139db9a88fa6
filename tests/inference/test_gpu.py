"""The fast path's CUDA-only parts on a real GPU: CUDA graphs (and their per-layer event waits
for a prefix still being copied in), programmatic dependent launch, TMA loads, the greedy
tokens a graph writes to pinned memory, and the pinned arena. Skipped without CUDA.

Run on the GPU machine:
    python -m pytest -m gpu tests/inference -p no:django --confcutdir=tests/inference -q

The model is the trained built-in one (a random model repeats one token, so every comparison
of greedy tokens would pass trivially), in float32 unless a test says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference import BUILTIN_MODEL_ID, KVStore, generate, generate_batch, get_model, precompute
from inference.engine import _fast_prefix, _fast_reuse, suffix_ids, verify, warm_up
from inference.fastpath.model import PrefixKV
from inference.fastpath.runner import FastReuse
from inference.fastpath.transfer import HostPrefix, PinnedArena
from inference.models import LoadedModel
from tests.inference.helpers import DOCS, QUESTIONS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
GPU_TIER_BYTES = 1 << 30  # the stores keep artifacts hot in GPU memory, as a GPU worker's does


def _hopper() -> bool:
    return torch.cuda.get_device_capability(CUDA) >= (9, 0)


@pytest.fixture(scope="module")
def cuda_model() -> LoadedModel:
    return get_model(BUILTIN_MODEL_ID, device="cuda")


@pytest.fixture(scope="module")
def cuda_store(tmp_path_factory: pytest.TempPathFactory) -> KVStore:
    return KVStore(tmp_path_factory.mktemp("kv-gpu"), gpu_bytes=GPU_TIER_BYTES)


@pytest.fixture(scope="module")
def cuda_keys(cuda_model: LoadedModel, cuda_store: KVStore) -> dict[str, str]:
    return {doc: precompute(cuda_model, doc, store=cuda_store).key for doc in DOCS[:4]}


def _gpu_prefix(model: LoadedModel, store: KVStore, key: str) -> PrefixKV:
    art = store.load(key, model)
    return PrefixKV([(k.to(CUDA), v.to(CUDA)) for k, v in zip(art.keys, art.values, strict=True)])


def _questions(model: LoadedModel, n: int = 4) -> list[list[int]]:
    return [suffix_ids(model, messages=[{"role": "user", "content": q}]) for q in QUESTIONS[:n]]


def _long_suffix(model: LoadedModel, tokens: int = 48) -> list[int]:
    """A suffix of more than 16 tokens: its first step uses PDL and TMA on Hopper."""
    ids = model.tokenizer(" " + " ".join(QUESTIONS * 4), add_special_tokens=False)["input_ids"]
    assert len(ids) >= tokens
    return ids[:tokens]


def test_the_engine_serves_cuda_requests_on_graphs_of_triton_kernels(
    cuda_model: LoadedModel,
) -> None:
    fast = _fast_reuse(cuda_model)
    assert fast is not None
    assert fast.decoder.kernels and fast.use_graphs and fast.any_prefix_graphs
    if _hopper():
        assert fast.decoder.tma
        assert fast.decoder.pdl, "PDL is off on Hopper (Triton without griddepcontrol?)"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_on_the_gpu_checks_the_fast_path(dtype: str, tmp_path: Path) -> None:
    """The engine's own check: reuse is bitwise two-step prefill on the fast path too, and in
    float32 its greedy tokens equal one-shot prefill's (bf16 may flip a near-tie)."""
    model = get_model(BUILTIN_MODEL_ID, dtype=dtype, device="cuda")
    store = KVStore(tmp_path / "kv", gpu_bytes=GPU_TIER_BYTES)
    key = precompute(model, DOCS[5], store=store).key
    report = verify(model, store, key, steps=24, save=False)
    assert report.fast_path_bitwise_equal is True
    assert report.bitwise_equal and report.kv_equal
    if dtype == "float32":
        assert report.passed
        assert report.greedy_matched == report.greedy_total
        assert report.fast_path_greedy_matched == report.greedy_total


def test_graph_replays_equal_the_eager_step_bitwise(
    cuda_model: LoadedModel, cuda_store: KVStore, cuda_keys: dict[str, str]
) -> None:
    prefix = _gpu_prefix(cuda_model, cuda_store, cuda_keys[DOCS[0]])
    suffixes = _questions(cuda_model)
    eager = FastReuse(cuda_model.model, capacity=128, use_graphs=False)
    graphs = FastReuse(cuda_model.model, capacity=128, use_graphs=True)
    expected = eager.first_logits(prefix, suffixes)
    captured = graphs.first_logits(prefix, suffixes)  # the first call captures
    replayed = graphs.first_logits(prefix, suffixes)  # the second replays
    assert torch.equal(captured, expected)
    assert torch.equal(replayed, expected)
    # decode steps too: greedy continuations of a batch, graphs against eager
    assert graphs.greedy(prefix, suffixes, 16) == eager.greedy(prefix, suffixes, 16)


def test_one_captured_graph_serves_another_document_of_its_length_class(
    cuda_model: LoadedModel, cuda_store: KVStore, cuda_keys: dict[str, str]
) -> None:
    eager = FastReuse(cuda_model.model, capacity=128, use_graphs=False)
    graphs = FastReuse(cuda_model.model, capacity=128, use_graphs=True)
    suffix = _questions(cuda_model, 1)
    for doc in DOCS[:4]:  # the first capture serves the others (same class, other lengths)
        prefix = _gpu_prefix(cuda_model, cuda_store, cuda_keys[doc])
        assert torch.equal(graphs.first_logits(prefix, suffix), eager.first_logits(prefix, suffix))


def test_a_prefix_copied_in_layer_by_layer_gives_the_hot_logits(
    cuda_model: LoadedModel, cuda_store: KVStore, cuda_keys: dict[str, str]
) -> None:
    """From pinned host memory the graph waits for each layer's copy (event wait nodes)."""
    fast = FastReuse(cuda_model.model, capacity=128)
    prefix = _gpu_prefix(cuda_model, cuda_store, cuda_keys[DOCS[1]])
    suffixes = _questions(cuda_model, 3)
    host = HostPrefix.from_layers([(k.cpu(), v.cpu()) for k, v in prefix.layers])
    assert host.buffer.is_pinned()
    hot = fast.first_logits(prefix, suffixes)
    for _ in range(2):  # the capture, then a replay
        assert torch.equal(fast.first_logits_from_host(host, suffixes), hot)
        fast.forget_host(host)


@pytest.mark.skipif(not torch.cuda.is_available() or not _hopper(), reason="PDL needs Hopper")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pdl_launches_give_bitwise_the_results_of_plain_launches(
    dtype: str, tmp_path: Path
) -> None:
    model = get_model(BUILTIN_MODEL_ID, dtype=dtype, device="cuda")
    store = KVStore(tmp_path / "kv", gpu_bytes=GPU_TIER_BYTES)
    prefix = _gpu_prefix(model, store, precompute(model, DOCS[2], store=store).key)
    suffixes = [_long_suffix(model), _long_suffix(model, 40)]
    with_pdl = FastReuse(model.model, capacity=128)
    plain = FastReuse(model.model, capacity=128)
    plain.decoder.pdl = False
    assert with_pdl.decoder.pdl
    for use_graphs in (False, True):
        with_pdl.use_graphs = plain.use_graphs = use_graphs
        assert torch.equal(
            with_pdl.first_logits(prefix, suffixes), plain.first_logits(prefix, suffixes)
        )


@pytest.mark.skipif(not torch.cuda.is_available() or not _hopper(), reason="TMA needs Hopper")
def test_tma_products_equal_pointer_loads(
    cuda_model: LoadedModel, cuda_store: KVStore, cuda_keys: dict[str, str]
) -> None:
    from inference.fastpath import kernels

    n_sms = kernels.sm_count(CUDA)
    for rows in (17, 48, 64):
        torch.manual_seed(rows)
        x = torch.randn(rows, 640, device=CUDA)
        weight = torch.randn(384, 640, device=CUDA)
        tma = kernels.matmul(x, weight, n_sms, tma=True)
        pointer = kernels.matmul(x, weight, n_sms, tma=False)
        assert torch.allclose(tma.sum(0), x @ weight.T, atol=1e-3, rtol=1e-4)
        assert torch.allclose(tma, pointer, atol=1e-5, rtol=0)
    # the whole first step with TMA products against pointer loads: the same greedy tokens
    prefix = _gpu_prefix(cuda_model, cuda_store, cuda_keys[DOCS[3]])
    suffix = [_long_suffix(cuda_model)]
    with_tma = FastReuse(cuda_model.model, capacity=128)
    pointer_loads = FastReuse(cuda_model.model, capacity=128)
    pointer_loads.decoder.tma = False
    assert with_tma.decoder.tma
    a, b = with_tma.first_logits(prefix, suffix), pointer_loads.first_logits(prefix, suffix)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)
    assert with_tma.greedy(prefix, suffix, 16) == pointer_loads.greedy(prefix, suffix, 16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_requests_single_and_batched_give_the_fast_paths_argmax_tokens(
    dtype: str, tmp_path: Path
) -> None:
    """The engine reads each greedy token from what the step's graph wrote to pinned memory;
    those must be the argmax tokens, one request at a time and in a batch."""
    model = get_model(BUILTIN_MODEL_ID, dtype=dtype, device="cuda")
    store = KVStore(tmp_path / "kv", gpu_bytes=GPU_TIER_BYTES)
    key = precompute(model, DOCS[6], store=store).key
    fast = _fast_reuse(model)
    prefix, _ = _fast_prefix(model, store.load(key, model))
    suffixes = _questions(model, 5)
    one_at_a_time = [fast.greedy(prefix, [s], 24)[0] for s in suffixes]
    assert fast.greedy(prefix, suffixes, 24) == one_at_a_time
    assert len({t for row in one_at_a_time for t in row}) >= 8  # a trained model

    requests = [{"messages": [{"role": "user", "content": q}], "max_tokens": 24}
                for q in QUESTIONS[:5]]  # fmt: skip
    singles = [generate(model, store, key, **r).token_ids for r in requests]
    batch = [g.token_ids for g in generate_batch(model, store, key, requests)]
    for rows in (singles, batch):
        for got, want in zip(rows, one_at_a_time, strict=True):
            assert got and got == want[: len(got)]  # a request may stop at end of sequence


def test_pinned_arena_buffers_are_pinned_and_copy_exactly() -> None:
    arena = PinnedArena(64 << 20)
    shape = (4, 2, 8, 777, 64)  # [layers, k/v, heads, tokens, head_dim]
    host = HostPrefix.empty(shape[0], shape[2], shape[3], shape[4], torch.bfloat16, arena=arena)
    assert host.buffer.is_pinned()
    host.buffer.copy_(torch.randn(shape).to(torch.bfloat16))
    landed = host.to_device(CUDA, overlap=True)
    torch.cuda.synchronize()
    device_copy = torch.stack([torch.stack([k, v]) for k, v in landed.prefix.layers])
    assert torch.equal(device_copy.cpu(), host.buffer)


def test_warm_up_captures_without_changing_what_a_request_gets(
    cuda_model: LoadedModel, cuda_store: KVStore, cuda_keys: dict[str, str]
) -> None:
    request = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 16}
    key = cuda_keys[DOCS[0]]
    before = generate(cuda_model, cuda_store, key, **request).token_ids
    report = warm_up(cuda_model, prefix_tokens=(1024,), suffix_tokens=(16, 32), batches=(2,))
    assert report["fast_path"] and report["runs"] > 0
    assert generate(cuda_model, cuda_store, key, **request).token_ids == before
