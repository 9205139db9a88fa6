"""Where a hot request's time goes on the host (GPU): perf_counter marks at the steps of
generate() for a hot document, as medians in us from generate()'s call, next to the bare
graph: its replay + synchronisation with the GPU idle before, and back to back.

The marks live in a patched copy of inference/ in a temporary folder (they are the
measurement; the served code carries none): this script copies and patches the package, then
runs itself again with the copy first on the path. An anchor the code no longer has stops it
with the anchor's text.

--bench-context: the marks of the hot-tier requests of inference.bench's own run (after its
cold prefills and its disk and host tiers), instead of a loop of hot requests alone.

python bench/trace_host.py [--requests 40] [--bench-context]
CPU smoke run: KVMARKET_FASTPATH=1 python bench/trace_host.py --model-config qwen3-test \
    --device cpu --tokens 256 --requests 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (file in inference/, a unique piece of its text, mark label, where): "before" the line that
# holds the text, or after the line that ends the text.
ANCHORS = [
    ("engine.py", "    t0 = time.perf_counter()\n"
                  "    stops = _validate_sampling(max_tokens, temperature, top_p, stop)\n"
                  "    feed = suffix_ids(", "t0", "inside"),
    ("engine.py", "    stops = _validate_sampling(max_tokens, temperature, top_p, stop)\n"
                  "    feed = suffix_ids(", "validated", "inside"),
    ("engine.py", "    art, tier = store.load_with_tier(key, loaded, overlap=True)", "suffix_ids",
     "before"),
    ("engine.py", "    load_s = time.perf_counter() - t0\n    cached = art.n_tokens", "loaded",
     "before"),
    ("engine.py", "        session = _reuse_session(loaded, art, feed, max_tokens)\n", "session",
     "after"),
    ("engine.py", "        first = session.step(feed)\n", "step_enter", "before"),
    ("engine.py", "        first = session.step(feed)\n", "step_returned", "after"),
    ("engine.py", "        out = next(loop)\n        assert", "loop_ready", "inside"),
    ("engine.py", "            ttft = time.perf_counter() - t0\n", "ttft", "after"),
    ("fastpath/runner.py", "        longest = max(len(s) for s in suffixes)\n", "first_step",
     "before"),
    ("fastpath/runner.py", "        if ready is not None:  # a hot request", "graph_found",
     "before"),
    ("fastpath/runner.py", "        _pack_into(g.host_array, suffixes, width)\n", "inputs_free",
     "before"),
    ("fastpath/runner.py", "        _pack_into(g.host_array, suffixes, width)\n", "inputs_written",
     "after"),
    ("fastpath/runner.py", "        g.graph.replay()\n        return slot, g.logits\n", "replayed",
     "inside"),
    ("fastpath/runner.py", "    g.greedy_ready.synchronize()\n", "token_wait", "before"),
    ("fastpath/runner.py", "    g.greedy_ready.synchronize()\n", "token_ready", "after"),
]
HEADER = (
    "from time import perf_counter as _mark_clock\nimport builtins as _mark_builtins\n"
    "_MARKS = _mark_builtins.__dict__.setdefault('_MARKS', [])\n"
)


def patch(package: Path) -> None:
    """Insert the marks into the copy of inference/ at package."""
    for name in sorted({a[0] for a in ANCHORS}):
        path = package / name
        text = path.read_text()
        future = "from __future__ import annotations\n"
        text = text.replace(future, future + HEADER, 1)
        for _, anchor, label, where in (a for a in ANCHORS if a[0] == name):
            at = text.find(anchor)
            if at < 0 or text.count(anchor) != 1:
                raise SystemExit(f"trace_host: {name} has no unique anchor {anchor!r}")
            if where == "before":
                line = text.rfind("\n", 0, at) + 1
            elif where == "after":
                line = at + len(anchor)
            else:  # "inside": after the anchor's first line
                line = text.index("\n", at) + 1
            # Indented as the line it follows (one level deeper after a colon) or precedes.
            ref = line if where == "before" else text.rfind("\n", 0, line - 1) + 1
            ref_line = text[ref : text.index("\n", ref)]
            indent = ref_line[: len(ref_line) - len(ref_line.lstrip())]
            if where != "before" and ref_line.rstrip().endswith(":"):
                indent += "    "
            mark = f"{indent}_MARKS.append(({label!r}, _mark_clock()))\n"
            text = text[:line] + mark + text[line:]
        path.write_text(text)


def _medians(groups: list[list[tuple[str, float]]]) -> dict[str, float]:
    """Median us from each request's first mark, per label (in the order of the last one)."""
    rows = [{label: (t - group[0][1]) * 1e6 for label, t in group} for group in groups]
    return {
        label: round(statistics.median(r[label] for r in rows if label in r), 1)
        for label in rows[-1]
    }


def _requests(marks: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
    """The marks split into requests (each begins at 't0')."""
    groups: list[list[tuple[str, float]]] = []
    for label, t in marks:
        if label == "t0":
            groups.append([])
        if groups:
            groups[-1].append((label, t))
    return groups


def _bench_context(args: argparse.Namespace, marks: list) -> dict:
    from inference import bench

    report = bench.run(bench.build_parser().parse_args([
        "--device", args.device, "--model-config", args.model_config,
        "--lengths", str(args.tokens), "--suffix-tokens", "48", "--repeats", str(args.requests),
    ]))
    row = report["results"][0]
    hot = row["reuse"].get("gpu") or row["reuse"]["host"]
    return {"mode": "bench context: its hot-tier requests", "ttft_samples_ms":
            [round(s * 1e3, 3) for s in hot["ttft_samples_s"]],
            "marks_us_median": _medians(_requests(marks)[-args.requests:])}


def _loop(args: argparse.Namespace, marks: list) -> list[dict]:
    import torch

    from inference.bench import _synthetic_ids, build_random_model
    from inference.engine import (
        _fast_reuse,
        freeze_startup_heap,
        generate,
        precompute_ids,
        warm_up,
    )
    from inference.store import KVStore

    cuda = args.device.startswith("cuda")
    loaded = build_random_model(args.model_config, dtype="bfloat16" if cuda else "float32",
                                device=args.device)
    store = KVStore(tempfile.mkdtemp(prefix="kv-trace-"), gpu_bytes=24 << 30,
                    host_bytes=32 << 30, pinned_bytes=(8 << 30) if cuda else 0)
    store.pin_host_memory()
    suffix = _synthetic_ids(loaded.config.vocab_size, 48, seed=1)
    warm_up(loaded)
    if cuda:
        freeze_startup_heap()
    doc = _synthetic_ids(loaded.config.vocab_size, args.tokens, seed=args.tokens)
    key = precompute_ids(loaded, doc, store=store, chunk_size=32768 if cuda else 512).key

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(5):  # to the GPU tier, graphs captured, clocks up
        generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)
    marks.clear()
    ttfts = []
    for _ in range(args.requests):
        sync()
        ttfts.append(generate(loaded, store, key, prompt_ids=suffix, max_tokens=1).timings.ttft_s)
    rows = [{"mode": "hot requests in a loop", "ttft_us_median":
             round(statistics.median(ttfts) * 1e6, 1), "marks_us_median":
             _medians(_requests(marks))}]
    fast = _fast_reuse(loaded)
    slot = fast._slots[next(reversed(fast._slots))] if fast and fast._slots else None
    if cuda and slot is not None and slot.last is not None:
        graph = slot.last.graph

        def timed(run) -> float:
            samples = []
            for _ in range(args.requests):
                sync()
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            return round(statistics.median(samples) * 1e6, 1)

        rows.append({"mode": "the hot request's graph", "replay_and_sync_us":
                     timed(lambda: (graph.replay(), sync())),
                     "replay_call_us": timed(graph.replay)})
        sync()
        start = time.perf_counter()
        for _ in range(20):
            graph.replay()
        sync()
        rows[-1]["back_to_back_us"] = round((time.perf_counter() - start) / 20 * 1e6, 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=3774)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--bench-context", action="store_true")
    parser.add_argument("--patched", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.patched:
        with tempfile.TemporaryDirectory(prefix="kv-trace-src-") as tmp:
            shutil.copytree(ROOT / "inference", Path(tmp) / "inference",
                            ignore=shutil.ignore_patterns("__pycache__"))
            patch(Path(tmp) / "inference")
            env = dict(os.environ, PYTHONPATH=tmp)
            cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--patched"]
            raise SystemExit(subprocess.call(cmd, env=env, cwd=tmp))
    import builtins

    marks = builtins.__dict__.setdefault("_MARKS", [])
    import inference

    assert Path(inference.__file__).parent.parent != ROOT, "not the patched copy"
    rows = [_bench_context(args, marks)] if args.bench_context else _loop(args, marks)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
