"""Where a hot request's time to first token goes in the engine (GPU): store lookup, session,
first step, sampling, against the fast path's own first step, and the host time of each piece
of that first step (host_*). Prints JSON (medians, ms).

python bench/engine_phases.py --model-config qwen3-4b --n-tokens 3774
"""

import argparse
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
from inference.fastpath.runner import _packed  # noqa: E402
from inference.store import KVStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    loaded = build_random_model(args.model_config, dtype="bfloat16", device="cuda")
    store = KVStore(tempfile.mkdtemp(), gpu_bytes=16 << 30, host_bytes=8 << 30, pinned_bytes=0)
    doc = torch.randint(2, 150000, (args.n_tokens,)).tolist()
    suffix = torch.randint(2, 150000, (args.suffix,)).tolist()
    key = engine.precompute_ids(loaded, doc, store=store).key
    # Only the length class and suffix this bench runs: a fresh machine compiles every variant.
    engine.warm_up(loaded, prefix_tokens=(args.n_tokens,), suffix_tokens=(args.suffix,), batches=())
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            phases.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
            return out
        return wrapper

    store.load_with_tier = timed("load_with_tier", store.load_with_tier)
    engine._reuse_session = timed("reuse_session", engine._reuse_session)
    engine._sample = timed("sample", engine._sample)
    fast = engine._fast_reuse(loaded)
    fast._first_step = timed("fast_first_step", fast._first_step)
    ttft = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        gen = engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)
        ttft.append(gen.timings.ttft_s * 1e3)
    report = {"device": torch.cuda.get_device_name(), "engine_ttft_ms": statistics.median(ttft)}
    report.update({name: round(statistics.median(v), 4) for name, v in phases.items()})
    art = store.load(key, loaded)
    prefix, _ = engine._fast_prefix(loaded, art)
    samples = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        int(torch.argmax(fast.first_logits(prefix, [suffix])[0]))
        samples.append((time.perf_counter() - start) * 1e3)
    report["first_logits_argmax_ms"] = round(statistics.median(samples), 4)
    del fast._first_step  # the runner's own again, untimed
    report.update(first_step_host_ms(fast, prefix, suffix, args.repeats))
    print(json.dumps(report))


def first_step_host_ms(fast, prefix, suffix: list[int], repeats: int) -> dict[str, float]:
    """Host time of each piece of a hot first step, the GPU idle before each (medians, ms)."""
    width = -(-len(suffix) // 16) * 16
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(f"host_{name}", []).append((time.perf_counter() - start) * 1e3)
        return out

    with torch.inference_mode():
        for _ in range(repeats):
            torch.cuda.synchronize()
            slot = timed("slot", lambda: fast._slot(prefix, 1, fast.slot_capacity(len(suffix))))
            g = timed("graph_lookup", lambda s=slot: fast._graph(s, width, fresh=True))
            timed("inputs_read_sync", g.inputs_read.synchronize)
            timed("pack_inputs", lambda g=g: g.host_inputs.numpy().__setitem__(
                slice(None), _packed([suffix], width)))
            timed("replay", g.graph.replay)
            timed("clone_logits", g.logits.clone)
            torch.cuda.synchronize()
            timed("first_step", lambda: fast._first_step(prefix, [suffix]))
            torch.cuda.synchronize()
    return {name: round(statistics.median(v), 4) for name, v in times.items()}


if __name__ == "__main__":
    main()
