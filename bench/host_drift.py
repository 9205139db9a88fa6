"""Whether a hot request's host time drifts as a process serves more of them (GPU).

bench/engine_phases.py measured a hot request's host time before its graph launch at 0.05 ms
early in a process and 0.13 ms after a few hundred requests (or a promotion from host memory).
This serves chunks of hot requests and prints, per chunk, engine_phases' untouched timeline
(medians: host time before the first step, the first step's host time, time to first token...)
with Python's object count and GC counters; then the same after a promotion from host memory,
after gc.collect() and after gc.freeze(). (The stored result, from before this used
engine_phases.timeline, names the first three before_first_step_ms, first_step_host_ms,
ttft_ms.)

python bench/host_drift.py --model-config qwen3-4b --chunks 8 --per-chunk 100
"""

import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.engine_phases import hot_document, hot_document_parser, timeline  # noqa: E402
from inference import engine  # noqa: E402


def main() -> None:
    parser = hot_document_parser()
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--per-chunk", type=int, default=100)
    parser.add_argument("--pinned-gib", type=int, default=8)
    args = parser.parse_args()
    # Not frozen: the drift after the warm-up is what this measures.
    loaded, store, key, suffix = hot_document(
        args.model_config, args.n_tokens, args.suffix, pinned_gib=args.pinned_gib, freeze=False
    )
    fast = engine._fast_reuse(loaded)

    def chunk(label: str) -> None:
        print(json.dumps({
            "chunk": label,
            **timeline(loaded, store, key, suffix, fast, args.per_chunk),
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
