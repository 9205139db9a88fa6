"""Cold prefill vs KV reuse from each store tier, for a list of document lengths. Prints JSON.

CPU:  python bench/kv_reuse.py --model builtin --lengths 256,1024,3000
      python bench/kv_reuse.py --model smollm2-135m --lengths 2048 --load-times
GPU:  python bench/kv_reuse.py --device cuda --model-config qwen3-4b \
          --lengths 1024,3774,8192,32768
The qwen3-4b path builds Qwen3-4B from its config with random bf16 weights (prefill and reuse
time the same as with trained weights) and feeds synthetic token ids, so no tokenizer is needed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from .random_models import MODEL_CONFIGS, build_random_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_state(device: str) -> dict[str, Any] | None:
    """The GPU's SM clock, temperature and power as NVML last sampled them (None off CUDA or
    where NVML does not answer): a hot request's time follows the SM clock, which the cold
    prefills run before it may have left lower."""
    if not device.startswith("cuda"):
        return None
    try:
        return {
            "sm_clock_mhz": torch.cuda.clock_rate(),
            "temperature_c": torch.cuda.temperature(),
            "power_w": round(torch.cuda.power_draw() / 1000, 1),
        }
    except Exception:  # noqa: BLE001 - NVML missing or refused: the state is only a reading
        return None


def _builtin_doc_ids(loaded: Any, n: int) -> list[int]:
    """Real text (stdlib docstrings) tokenised to n tokens: the built-in model's own domain."""
    import json as json_mod
    import pathlib
    import re

    from .engine import document_prefix_ids

    text = ""
    for mod in (re, json_mod, pathlib, argparse, statistics, shutil, tempfile):
        text += (mod.__doc__ or "") + "\n\n"
    ids: list[int] = []
    while len(ids) < n:
        ids = document_prefix_ids(loaded, text)
        text += text
    return ids[:n]


def _synthetic_ids(vocab: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    # Stay below the special tokens that sit at the end of Qwen's vocabulary.
    return torch.randint(2, min(vocab, 150000), (n,), generator=gen).tolist()


def _cold_ttft(loaded: Any, ids: list[int], chunk: int) -> tuple[float, int]:
    from .engine import forward, new_cache, prefill

    _sync(loaded.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = new_cache(loaded)
        cut = ((len(ids) - 1) // chunk) * chunk
        if cut:
            prefill(loaded, ids[:cut], cache, chunk_size=chunk)
        token = int(torch.argmax(forward(loaded, ids[cut:], cache)[-1]))
    _sync(loaded.device)
    return time.perf_counter() - t0, token


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .engine import freeze_startup_heap, generate, precompute_ids, suffix_ids, warm_up
    from .models import get_model
    from .store import KVStore

    device = args.device
    load_times = None
    if args.model_config:
        dtype = args.dtype or "bfloat16"
        loaded = build_random_model(args.model_config, dtype=dtype, device=device)
    elif args.load_times:
        load_times, loaded = _load_times(args.model, dtype=args.dtype or "float32", device=device)
    else:
        loaded = get_model(args.model, dtype=args.dtype or "float32", device=device,
                           cache_dir=args.model_cache)
    # One-shot prefill on GPU up to 32k tokens: chunks there only add masked attention calls.
    chunk = args.chunk_size or (32768 if device.startswith("cuda") else 512)
    root = args.store or tempfile.mkdtemp(prefix="kv-bench-")
    started = time.perf_counter()
    store = KVStore(root, gpu_bytes=args.gpu_gib << 30, host_bytes=args.host_gib << 30,
                    pinned_bytes=args.pinned_gib << 30 if device.startswith("cuda") else 0)
    store.pin_host_memory()  # as a GPU worker does at its start
    pinned_s = time.perf_counter() - started
    if loaded.tokenizer is not None and getattr(loaded.tokenizer, "chat_template", None):
        question = [{"role": "user", "content": "What does the document say?"}]
        suffix = suffix_ids(loaded, messages=question)
    else:
        suffix = _synthetic_ids(loaded.config.vocab_size, args.suffix_tokens, seed=1)

    results = []
    # Warm up kernels and allocator so the first length is not charged for them.
    warm = _synthetic_ids(loaded.config.vocab_size, 64, seed=2)
    _cold_ttft(loaded, warm + suffix, chunk)
    # As a GPU worker does at start: compile and capture the fast path before any request.
    warm_up_report = None if args.no_warm_up else warm_up(loaded)
    if device.startswith("cuda"):  # as a GPU worker does once warmed up
        freeze_startup_heap()
    for n in args.lengths:
        row: dict[str, Any] = {"n_tokens": n, "suffix_tokens": len(suffix)}
        if n + len(suffix) + 1 >= loaded.max_context:
            row["skipped"] = f"exceeds the model's {loaded.max_context}-token context"
            results.append(row)
            continue
        if loaded.tokenizer is not None:
            doc = _builtin_doc_ids(loaded, n)
        else:
            doc = _synthetic_ids(loaded.config.vocab_size, n, seed=n)
        colds = [_cold_ttft(loaded, doc + suffix, chunk) for _ in range(args.repeats)]
        cold_s = statistics.median(t for t, _ in colds)
        pre = precompute_ids(loaded, doc, store=store, chunk_size=chunk)
        row.update(
            cold_ttft_s=round(cold_s, 5),
            precompute_s=pre.seconds,
            artifact_bytes=pre.bytes,
            kv_bytes_per_token=round(pre.bytes / n),
            prefill_flops=pre.flops,
            reuse={},
        )
        tiers = ["disk", "host"]
        if store.gpu.budget and device.startswith("cuda"):
            tiers.append("gpu")
        first_tokens = {}
        for tier in tiers:
            samples = []
            state_before = _gpu_state(device)
            for _ in range(args.repeats):
                if tier == "disk":
                    store.evict_memory()
                elif tier == "host":
                    store.evict_memory(tiers=("gpu",))
                _sync(device)
                gen = generate(loaded, store, pre.key, prompt_ids=suffix, max_tokens=1)
                _sync(device)
                samples.append(gen)
                first_tokens[tier] = gen.token_ids[0]
            served = {g.cache_tier for g in samples}
            ttft = statistics.median(g.timings.ttft_s for g in samples)
            row["reuse"][tier] = {
                "ttft_s": round(ttft, 5),
                "ttft_samples_s": [round(g.timings.ttft_s, 5) for g in samples],
                "load_s": round(statistics.median(g.timings.load_s for g in samples), 5),
                "served_from": sorted(served),
                "speedup_vs_cold": round(cold_s / ttft, 2) if ttft else None,
                "gpu_state": {"before": state_before, "after": _gpu_state(device)},
            }
        # Reuse and cold must pick the same first token (a cheap exactness check).
        row["first_token_match"] = all(t == colds[0][1] for t in first_tokens.values())
        if args.decode_tokens:
            # The first run captures CUDA graphs and compiles kernels for the decode shapes
            # (once per process, Triton caches on disk): reported apart, not in the rate.
            first = generate(
                loaded, store, pre.key, prompt_ids=suffix, max_tokens=args.decode_tokens
            )
            row["decode_first_run_s"] = round(first.timings.total_s, 4)
            gen = generate(loaded, store, pre.key, prompt_ids=suffix, max_tokens=args.decode_tokens)
            decode_s = gen.timings.total_s - gen.timings.ttft_s
            steps = max(1, gen.usage.output_tokens - 1)
            row["decode_tokens_per_s"] = round(steps / decode_s, 2) if decode_s > 0 else None
        if args.batches:
            row["batched"] = _batched(loaded, store, pre.key, suffix, args, device)
        store.delete(pre.key)
        results.append(row)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if not args.store:
        shutil.rmtree(root, ignore_errors=True)

    import transformers

    return {
        "bench": "kv_reuse",
        "model": loaded.model_id,
        "dtype": loaded.dtype,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "chunk_size": chunk,
        "repeats": args.repeats,
        "model_load": load_times,
        "warm_up": warm_up_report,
        "pinned_arena": {"bytes": store.pinned_bytes,
                         "seconds": round(pinned_s, 3)},
        "note": "ttft = time to first token incl. store load; disk reads may hit the OS page cache",
        "results": results,
    }


def _load_times(model_ref: str, *, dtype: str, device: str) -> tuple[dict[str, Any], Any]:
    """Seconds to load the model cold (a GGUF file converted into an empty model cache) and
    from the cache that conversion left (a later start: the weights hashed again for the
    fingerprint; this process's imports are already done, a new process adds them)."""
    from .models import _FILE_HASH_CACHE, gguf_path, load_model

    cache = tempfile.mkdtemp(prefix="model-cache-bench-")
    try:
        times = {}
        for name in ("cold", "cached"):
            _FILE_HASH_CACHE.clear()
            _sync(device)
            start = time.perf_counter()
            loaded = load_model(model_ref, dtype=dtype, device=device, cache_dir=cache)
            _sync(device)
            times[f"{name}_s"] = round(time.perf_counter() - start, 3)
            if name == "cold":
                del loaded
        times["gguf"] = gguf_path(model_ref) is not None
        return times, loaded
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _batched(
    loaded: Any, store: Any, key: str, suffix: list[int], args: argparse.Namespace, device: str
) -> dict[str, Any]:
    """Requests/s of generate_batch: B agents, each its own suffix, against one hot document."""
    from .engine import generate_batch

    out = {}
    for b in args.batches:
        requests = [
            dict(prompt_ids=_synthetic_ids(loaded.config.vocab_size, len(suffix), seed=100 + i),
                 max_tokens=args.batch_tokens)
            for i in range(b)
        ]
        generate_batch(loaded, store, key, requests)  # warm-up: loads, graph capture
        times = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            generate_batch(loaded, store, key, requests)
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out[str(b)] = {"seconds": round(seconds, 5), "requests_per_s": round(b / seconds, 1)}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kv_reuse", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin",
                   help="'builtin', 'smollm2-135m', a local folder, a .gguf file, "
                        "pkg:<package>/<file>.gguf or a cached hub id")
    p.add_argument("--model-cache", help="folder of converted GGUF models (default "
                                         "$KVMARKET_MODEL_CACHE or ~/.cache/kvmarket/models)")
    p.add_argument("--load-times", action="store_true",
                   help="also time loading the model cold (GGUF converted into an empty "
                        "cache) and cached")
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS),
                   help="build this architecture with random weights instead of --model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="default float32 (--model) or bfloat16 (--model-config)")
    p.add_argument("--lengths", default="256,1024,3000",
                   type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=0, help="0: 32768 on CUDA, 512 on CPU")
    p.add_argument("--decode-tokens", type=int, default=0, help="also time N decode steps")
    p.add_argument("--gpu-gib", type=int, default=24)
    p.add_argument("--host-gib", type=int, default=32)
    p.add_argument("--pinned-gib", type=int, default=8,
                   help="host memory the store pins at its start for reads from disk (CUDA)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, one per core)")
    p.add_argument("--store", help="store root (default: a temp folder, removed afterwards)")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--no-warm-up", action="store_true",
                   help="skip the worker-start warm-up (inference.warm_up) before timing")
    p.add_argument("--batches", default="", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="also time generate_batch with these batch sizes (e.g. 1,8,32,128)")
    p.add_argument("--batch-tokens", type=int, default=1,
                   help="tokens each batched request generates (1: first-token throughput)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
