"""Where a hot request's time to first token goes in the engine (GPU): store lookup, session,
first step, sampling, against the fast path's own first step, and the host time of each piece
of that first step (host_*). Prints JSON (medians, ms).

The phases above are each timed to a synchronisation; timeline_* is the same request untouched
(host timestamps only, and two CUDA events around the GPU's work): what the request waits for
before its graph is launched, the GPU's time from then to the first logits, and after.

python bench/engine_phases.py --model-config qwen3-4b --n-tokens 3774
"""

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference import engine  # noqa: E402
from inference.bench import build_random_model  # noqa: E402
from inference.fastpath.runner import _pack_into  # noqa: E402
from inference.store import KVStore  # noqa: E402


def hot_document(
    model_config: str, n_tokens: int, n_suffix: int, *, pinned_gib: int = 8, freeze: bool = True
):
    """A GPU worker's state with one hot document: (loaded, store, key, suffix). A random-weight
    model, a store with host memory pinned once at the start (as bench/kv_reuse.py and a worker
    have it), a random document precomputed into GPU memory, a random suffix, the fast path
    warmed up for that length class and suffix only (a fresh machine compiles every variant),
    then, with freeze, the heap collected and frozen as a worker does (bench/host_drift.py)."""
    loaded = build_random_model(model_config, dtype="bfloat16", device="cuda")
    store = KVStore(tempfile.mkdtemp(), gpu_bytes=16 << 30, host_bytes=8 << 30,
                    pinned_bytes=pinned_gib << 30)
    store.pin_host_memory()
    doc = torch.randint(2, 150000, (n_tokens,)).tolist()
    suffix = torch.randint(2, 150000, (n_suffix,)).tolist()
    key = engine.precompute_ids(loaded, doc, store=store).key
    engine.warm_up(loaded, prefix_tokens=(n_tokens,), suffix_tokens=(n_suffix,), batches=())
    if freeze:
        engine.freeze_startup_heap()
    return loaded, store, key, suffix


def hot_document_parser() -> argparse.ArgumentParser:
    """A parser with the arguments of a hot-request bench (hot_document's): the architecture,
    the document's and the suffix's lengths."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    return parser


def main() -> None:
    parser = hot_document_parser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print the top N functions by own host time over the requests")
    args = parser.parse_args()
    loaded, store, key, suffix = hot_document(args.model_config, args.n_tokens, args.suffix)
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            phases.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
            return out
        return wrapper

    reuse_session, sample = engine._reuse_session, engine._sample
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
    del store.load_with_tier
    engine._reuse_session, engine._sample = reuse_session, sample
    report.update(first_step_host_ms(fast, prefix, suffix, args.repeats))
    report.update(timeline(loaded, store, key, suffix, fast, args.repeats))
    if args.cprofile:
        host_profile(loaded, store, key, suffix, args.repeats, args.cprofile, "precomputed")
    # As bench/kv_reuse.py's GPU tier finds it: read back from disk into the pinned arena,
    # dropped from GPU memory, then brought back from host memory by a request (one buffer,
    # copied layer by layer).
    store.evict_memory()
    engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)  # disk -> host -> GPU
    store.evict_memory(tiers=("gpu",))
    engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)  # host -> GPU
    promoted = timeline(loaded, store, key, suffix, fast, args.repeats)
    report.update({f"promoted_{name}": ms for name, ms in promoted.items()})
    print(json.dumps(report))
    if args.cprofile:
        host_profile(loaded, store, key, suffix, args.repeats, args.cprofile, "promoted")



def host_profile(loaded, store, key, suffix: list[int], repeats: int, top: int, label: str) -> None:
    """The top functions by own host time over `repeats` hot requests (cProfile)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)
    profiler.disable()
    print(f"# cProfile, {repeats} requests, artifact {label}")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


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
            timed("pack_inputs", lambda g=g: _pack_into(g.host_array, [suffix], width))
            timed("replay", g.graph.replay)
            timed("clone_logits", g.logits.clone)
            torch.cuda.synchronize()
            timed("first_step", lambda: fast._first_step(prefix, [suffix]))
            torch.cuda.synchronize()
    return {name: round(statistics.median(v), 4) for name, v in times.items()}


def timeline(
    loaded, store, key, suffix: list[int], fast, repeats: int, *, samples: bool = False
) -> dict:
    """A hot request with no added synchronisation: host timestamps where its phases start and
    end, and CUDA events from just before its first step to the start of sampling (the GPU's
    whole first step, the graph's input copies included). Medians, ms (with samples, every
    request's, in order). timeline_at_* are host times from the call to each phase's entry and
    exit: where the host spends the time before the GPU has work."""
    marks: dict[str, float] = {}
    started, finished = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # (owner, attribute, mark name, event recorded at entry)
    targets = [
        (store, "load_with_tier", "load", None),
        (engine, "_reuse_session", "session", None),
        (fast, "_first_step", "first_step", started),
        (torch.cuda.CUDAGraph, "replay", "replay", None),
        (engine, "_sample", "sample", finished),
    ]
    originals = [getattr(owner, attr) for owner, attr, _, _ in targets]

    def marked(fn, name: str, event: torch.cuda.Event | None):
        """fn, recording the host time at its entry and exit (and the event at its entry)."""
        def wrapper(*a, **k):
            marks[f"{name}_enter"] = time.perf_counter()
            if event is not None:
                event.record()
            out = fn(*a, **k)
            marks[f"{name}_exit"] = time.perf_counter()
            return out
        return wrapper

    for (owner, attr, name, event), fn in zip(targets, originals, strict=True):
        setattr(owner, attr, marked(fn, name, event))
    spans: dict[str, list[float]] = {}
    try:
        for _ in range(repeats):
            torch.cuda.synchronize()
            call = time.perf_counter()
            gen = engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)
            ms = {
                "timeline_before_first_step": marks["first_step_enter"] - call,
                "timeline_first_step_host": marks["first_step_exit"] - marks["first_step_enter"],
                "timeline_to_sample": marks["sample_enter"] - marks["first_step_exit"],
                "timeline_sample_host": marks["sample_exit"] - marks["sample_enter"],
                "timeline_call_to_ttft": gen.timings.ttft_s,
            }
            ms.update({f"timeline_at_{mark}": t - call for mark, t in marks.items()})
            for name, seconds in ms.items():
                spans.setdefault(name, []).append(seconds * 1e3)
            spans.setdefault("timeline_gpu_first_step", []).append(started.elapsed_time(finished))
    finally:
        for (owner, attr, _, _), fn in zip(targets, originals, strict=True):
            if owner in (store, fast):
                delattr(owner, attr)  # the instance's own method again
            else:
                setattr(owner, attr, fn)
    if samples:
        return {name: [round(ms, 4) for ms in v] for name, v in spans.items()}
    return {name: round(statistics.median(v), 4) for name, v in spans.items()}


if __name__ == "__main__":
    main()
