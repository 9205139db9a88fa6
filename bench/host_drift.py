"""Whether a hot request's host time drifts as a process serves more of them (GPU).

bench/engine_phases.py measured a hot request's host time before its graph launch at 0.05 ms
early in a process and 0.13 ms after a few hundred requests (or a promotion from host memory).
This serves chunks of hot requests and prints, per chunk, the medians of the host time before
the first step, the first step's host time and the time to first token, with Python's object
count and GC counters; then the same after a promotion from host memory and after gc.collect().

python bench/host_drift.py --model-config qwen3-4b --chunks 8 --per-chunk 100
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference import engine  # noqa: E402
from inference.bench import build_random_model  # noqa: E402
from inference.store import KVStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--per-chunk", type=int, default=100)
    parser.add_argument("--pinned-gib", type=int, default=8)
    args = parser.parse_args()
    loaded = build_random_model(args.model_config, dtype="bfloat16", device="cuda")
    store = KVStore(tempfile.mkdtemp(), gpu_bytes=16 << 30, host_bytes=8 << 30,
                    pinned_bytes=args.pinned_gib << 30)
    store.pin_host_memory()
    doc = torch.randint(2, 150000, (args.n_tokens,)).tolist()
    suffix = torch.randint(2, 150000, (args.suffix,)).tolist()
    key = engine.precompute_ids(loaded, doc, store=store).key
    engine.warm_up(loaded, prefix_tokens=(args.n_tokens,), suffix_tokens=(args.suffix,),
                   batches=())
    fast = engine._fast_reuse(loaded)
    first_step = fast._first_step
    marks: dict[str, float] = {}

    def timed_first_step(*a, **k):
        marks["enter"] = time.perf_counter()
        out = first_step(*a, **k)
        marks["exit"] = time.perf_counter()
        return out

    fast._first_step = timed_first_step

    def chunk(label: str) -> None:
        before, host, ttft = [], [], []
        for _ in range(args.per_chunk):
            torch.cuda.synchronize()
            call = time.perf_counter()
            gen = engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)
            before.append((marks["enter"] - call) * 1e3)
            host.append((marks["exit"] - marks["enter"]) * 1e3)
            ttft.append(gen.timings.ttft_s * 1e3)
        print(json.dumps({
            "chunk": label,
            "before_first_step_ms": round(statistics.median(before), 4),
            "first_step_host_ms": round(statistics.median(host), 4),
            "ttft_ms": round(statistics.median(ttft), 4),
            "python_objects": len(gc.get_objects()),
            "gc_counts": gc.get_count(),
            "gc_collections": [s["collections"] for s in gc.get_stats()],
            "cuda_allocated_mib": torch.cuda.memory_allocated() >> 20,
        }), flush=True)

    for i in range(args.chunks):
        chunk(f"precomputed {i}")
    store.evict_memory(tiers=("gpu",))
    engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)  # host -> GPU
    for i in range(2):
        chunk(f"promoted {i}")
    gc.collect()
    chunk("after gc.collect()")
    gc.freeze()  # everything alive now out of the collector's sight
    chunk("after gc.freeze()")


if __name__ == "__main__":
    main()
