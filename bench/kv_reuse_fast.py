"""Fast-path reuse benchmark: cold prefill vs reuse from GPU, pinned host memory and disk.

Prints one JSON document. Cold prefill (transformers, SDPA) and every reuse path are measured
in the same run on the same model, so the speed-ups compare like with like.

GPU (Qwen3-4B architecture, random weights, bf16):
    python bench/kv_reuse_fast.py --model-config qwen3-4b --device cuda \
        --lengths 1024,3774,8192,32768 --batches 1,8,32,128,512
CPU smoke run (a two-layer stand-in, float32):
    python bench/kv_reuse_fast.py --model-config qwen3-test --device cpu --lengths 256 --batches 1,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.bench import MODEL_CONFIGS  # noqa: E402
from inference.fastpath.model import NATIVE_GQA_FLASH, PrefixKV  # noqa: E402
from inference.fastpath.runner import FastReuse  # noqa: E402
from inference.fastpath.transfer import HostPrefix, read_artifact_into_host  # noqa: E402


def build_model(name: str, device: str, dtype: torch.dtype, layers: int | None = None):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kwargs = dict(MODEL_CONFIGS[name])
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = Qwen3Config(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> tuple[float, object]:
    """Median wall seconds of fn() over `repeat` runs after one warm-up."""
    result = fn()
    sync(device)
    samples = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def hf_prefill(model, ids: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], cache


def save_artifact(path: Path, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, str]:
    """Write a KV file in the artifact's tensor layout; returns per-tensor sha256."""
    import hashlib

    from safetensors.torch import save_file

    tensors, hashes = {}, {}
    for i, (k, v) in enumerate(layers):
        for kind, t in (("keys", k), ("values", v)):
            cpu = t.detach().to("cpu").contiguous()
            name = f"layers.{i}.{kind}"
            tensors[name] = cpu
            hashes[name] = hashlib.sha256(cpu.view(torch.uint8).numpy().tobytes()).hexdigest()
    save_file(tensors, str(path))
    return hashes


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def bench_length(
    model, fast: FastReuse, reference: FastReuse | None, n_tokens: int, args, device: str,
    tmp: Path,
) -> dict:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(n_tokens)
    doc = torch.randint(0, vocab, (1, n_tokens), generator=gen)
    suffix = torch.randint(0, vocab, (1, args.suffix), generator=gen)
    doc_d, full_d = doc.to(device), torch.cat([doc, suffix], 1).to(device)
    r = {"n_tokens": n_tokens, "suffix_tokens": args.suffix}

    cold_s, (cold_logits, _) = timed(lambda: hf_prefill(model, full_d), device, args.repeat)
    r["cold_prefill_ttft_ms"] = cold_s * 1e3
    _, cache = hf_prefill(model, doc_d)
    layers = [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in cache.layers]
    del cache
    prefix = PrefixKV(layers)
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in layers)
    r["kv_bytes"] = kv_bytes
    s_ids = suffix[0].tolist()

    # Plain transformers reuse, the baseline the fast path replaces.
    def hf_reuse():
        from transformers import DynamicCache

        c = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(layers):
            c.update(k[None], v[None], i)
        with torch.inference_mode():
            return model(
                suffix.to(device), past_key_values=c, use_cache=True, logits_to_keep=1
            ).logits[:, -1]

    t, hf_logits = timed(hf_reuse, device, args.repeat)
    r["hf_reuse_hot_ttft_ms"] = t * 1e3

    t, hot_logits = timed(lambda: fast.first_logits(prefix, [s_ids]), device, args.repeat)
    r["hot_ttft_ms"] = t * 1e3
    r["hot_speedup"] = cold_s / t
    if reference is not None:  # the same step without the fused kernels (plain torch ops)
        t, ref_logits = timed(
            lambda: reference.first_logits(prefix, [s_ids]), device, args.repeat
        )
        r["hot_torch_ops_ttft_ms"] = t * 1e3
        r["hot_vs_torch_ops_max_logit_diff"] = (
            (hot_logits.float() - ref_logits.float()).abs().max().item()
        )
        reference.forget(prefix)
    for name, other in (("cold", cold_logits), ("hf_reuse", hf_logits)):
        r[f"hot_vs_{name}_relative_l2"] = _relative_l2(hot_logits, other)
    r["hf_reuse_vs_cold_relative_l2"] = _relative_l2(hf_logits, cold_logits)
    r["hf_reuse_vs_cold_max_logit_diff"] = (
        (hf_logits.float() - cold_logits.float()).abs().max().item()
    )
    r["hot_vs_hf_reuse_max_logit_diff"] = (
        (hot_logits.float() - hf_logits.float()).abs().max().item()
    )
    r["hot_vs_cold_argmax_equal"] = bool(
        hot_logits.argmax(-1).item() == cold_logits.argmax(-1).item()
    )

    # Decode after reuse: 24 greedy tokens, one stream.
    t, tokens = timed(lambda: fast.greedy(prefix, [s_ids], args.decode_tokens), device, args.repeat)
    first_s = r["hot_ttft_ms"] / 1e3
    r["decode_tokens_per_s"] = (args.decode_tokens - 1) / max(t - first_s, 1e-9)
    r["greedy_24_s"] = t

    if device == "cuda":
        host = HostPrefix.from_layers(layers)
        staging = torch.empty_like(host.buffer, device=device)

        def warm_copy():
            host.to_device(device, out=staging, overlap=False)

        t, _ = timed(warm_copy, device, args.repeat)
        r["warm_h2d_gb_per_s"] = kv_bytes / t / 1e9

        t, warm_logits = timed(
            lambda: fast.first_logits_from_host(host, [s_ids]), device, args.repeat
        )
        r["warm_ttft_ms"] = t * 1e3
        r["warm_speedup"] = cold_s / t

        path = tmp / f"kv-{n_tokens}.safetensors"
        hashes = save_artifact(path, layers)
        disk_host = HostPrefix.empty(len(layers), *layers[0][0].shape, layers[0][0].dtype)

        def read():
            return read_artifact_into_host(
                path, threads=args.threads, tensor_sha256=hashes, into=disk_host
            )

        t, _ = timed(read, device, args.repeat)
        r["disk_to_host_gb_per_s"] = kv_bytes / t / 1e9

        def cold_reuse():
            read()
            return fast.first_logits_from_host(disk_host, [s_ids])

        t, disk_logits = timed(cold_reuse, device, args.repeat)
        r["disk_ttft_ms"] = t * 1e3
        r["disk_effective_gb_per_s"] = kv_bytes / t / 1e9
        r["disk_speedup"] = cold_s / t
        # Bitwise: KV that went through host memory or disk gives the same logits as in memory.
        r["disk_vs_memory_bitwise_equal"] = bool(torch.equal(hot_logits, disk_logits))
        r["warm_vs_memory_bitwise_equal"] = bool(torch.equal(hot_logits, warm_logits))
        # The graph waits for each layer's copy (event wait nodes): with the staging buffer
        # poisoned first, any layer read before its copy landed would change the logits.
        with torch.inference_mode():
            fast._staging[id(host)][1].buffer.fill_(float("nan"))
        poisoned = fast.first_logits_from_host(host, [s_ids])
        r["warm_after_poison_bitwise_equal"] = bool(torch.equal(hot_logits, poisoned))
        fast.forget_host(host)
        fast.forget_host(disk_host)
        path.unlink()
        del host, staging, disk_host

    batches = {}
    for b in args.batch_list:
        gen_b = torch.Generator().manual_seed(b)
        suffixes = torch.randint(0, vocab, (b, args.suffix), generator=gen_b).tolist()
        try:
            t, _ = timed(
                lambda s=suffixes: fast.first_logits(prefix, s), device, max(2, args.repeat // 2)
            )
        except torch.OutOfMemoryError:
            batches[str(b)] = {"error": "out of memory"}
            torch.cuda.empty_cache()
            continue
        batches[str(b)] = {"seconds": t, "requests_per_s": b / t}
    r["batched_first_token"] = batches
    fast.forget(prefix)
    return r


VERIFY_QUESTIONS = [
    "What does the text say?",
    "Quote the passage.",
    "Continue the text.",
    "What does it say about functions?",
]


def _stdlib_document(max_chars: int = 4000) -> str:
    """Module docstrings: text in the style the built-in model was trained on."""
    import importlib

    parts = []
    for name in ("json", "argparse", "textwrap", "functools", "collections", "pathlib", "re"):
        parts.append(" ".join((importlib.import_module(name).__doc__ or "").split()))
    return " ".join(parts)[:max_chars]


def exactness(device: str) -> dict:
    """On the trained built-in model (random weights make near-ties that say nothing): the
    engine's checks with the fast path on this device, float32 and bf16, and batched greedy
    rows against one at a time."""
    from inference import BUILTIN_MODEL_ID, KVStore, get_model, precompute, verify
    from inference.engine import _fast_prefix, _fast_reuse, generate, generate_batch, suffix_ids

    text = _stdlib_document()
    fields = (
        "passed", "bitwise_equal", "kv_equal", "greedy_matched", "greedy_total", "match_rate",
        "max_logit_diff", "fast_path_bitwise_equal", "fast_path_greedy_matched",
    )
    report = {"model": BUILTIN_MODEL_ID}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            loaded = get_model(BUILTIN_MODEL_ID, dtype=dtype, device=device)
            store = KVStore(Path(tmp) / dtype)
            key = precompute(loaded, text, store=store).key
            checked = verify(loaded, store, key, suffixes=VERIFY_QUESTIONS, steps=24, save=False)
            entry = {name: getattr(checked, name) for name in fields}
            entry["n_tokens"] = checked.n_tokens
            fast = _fast_reuse(loaded)
            entry["fast_path_kernels"] = fast.decoder.kernels
            prefix, _ = _fast_prefix(loaded, store.load(key, loaded))
            sids = [
                suffix_ids(loaded, messages=[{"role": "user", "content": q}])
                for q in VERIFY_QUESTIONS
            ]
            one = [fast.greedy(prefix, [s], 24)[0] for s in sids]
            batched = fast.greedy(prefix, sids, 24)
            entry["batched_tokens_equal_single"] = batched == one
            entry["batched_token_match"] = sum(
                a == b for x, y in zip(batched, one, strict=True) for a, b in zip(x, y, strict=True)
            )
            entry["distinct_tokens"] = len({t for row in one for t in row})
            # The engine's requests take their greedy tokens from the graphs (greedy_tokens):
            # one at a time and as a batch, they must be the argmax tokens above (a request
            # stops early at an end-of-sequence token).
            requests = [{"messages": [{"role": "user", "content": q}], "max_tokens": 24}
                        for q in VERIFY_QUESTIONS]
            singles = [generate(loaded, store, key, **r).token_ids for r in requests]
            batch = [g.token_ids for g in generate_batch(loaded, store, key, requests)]
            for name, rows in (("engine", singles), ("engine_batch", batch)):
                entry[f"{name}_tokens_equal_fast_path"] = all(
                    got == want[: len(got)] for got, want in zip(rows, one, strict=True)
                )
            report[dtype] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default="qwen3-test", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--lengths", default="1024,3774")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    args.batch_list = [int(x) for x in args.batches.split(",") if x]
    device = args.device
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device == "cuda" else torch.float32)
    )
    model = build_model(args.model_config, device, dtype)
    fast = FastReuse(model, capacity=128)
    reference = FastReuse(model, capacity=128, kernels=False) if fast.decoder.kernels else None
    report = {
        "benchmark": "kv_reuse_fast",
        "model_config": args.model_config,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "cuda_graphs": fast.use_graphs,
        "triton_kernels": fast.decoder.kernels,
        "flash_native_gqa": NATIVE_GQA_FLASH,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.lengths.split(",") if x]:
            report["results"].append(
                bench_length(model, fast, reference, n, args, device, Path(tmp))
            )
            print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    del model, fast, reference
    if device == "cuda":
        torch.cuda.empty_cache()
    report["exactness"] = exactness(device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
