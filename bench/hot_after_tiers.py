"""Why bench/kv_reuse.py's hot requests are slower than engine_phases.py's (GPU).

The engine bench times its GPU tier after cold prefills and the disk and host tiers, with
7 requests: 3.69 ms (falling from 3.81 to 3.67 over them), where engine_phases.py, on a process
that served nothing else, times 3.52. This repeats the engine bench's sequence (whole warm-up,
freeze, cold prefills, precompute, disk and host tiers), then prints every hot request's
untouched timeline (engine_phases.timeline: host time before the first step, the GPU's first
step, time to first token) for: right after the tiers; after gc.collect(); with the GPU left
idle for a while before each request; and after more cold prefills. Each line is JSON.

python bench/hot_after_tiers.py --model-config qwen3-4b --n-tokens 3774
"""

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.engine_phases import hot_document_parser, timeline  # noqa: E402
from inference import engine  # noqa: E402
from inference.bench import _cold_ttft, _synthetic_ids, build_random_model  # noqa: E402
from inference.store import KVStore  # noqa: E402


def gpu_local_cpus() -> set[int]:
    """The CPUs of the GPU's NUMA node (sysfs), all CPUs when unknown."""
    bus = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.split()[0].lower()
    path = Path(f"/sys/bus/pci/devices/{bus[4:]}/local_cpulist")
    if not path.exists():
        return set(os.sched_getaffinity(0))
    cpus = set()
    for part in path.read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def sched_getcpu() -> int:
    return ctypes.CDLL(None).sched_getcpu()


def main() -> None:
    parser = hot_document_parser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hot", type=int, default=20, help="hot requests per condition")
    parser.add_argument("--pin", choices=["none", "gpu-local", "one"], default="none",
                        help="CPU affinity: the GPU's NUMA-local CPUs, or one of them")
    args = parser.parse_args()
    local = gpu_local_cpus()
    if args.pin != "none":
        os.sched_setaffinity(0, local if args.pin == "gpu-local" else {min(local)})
    print(json.dumps({"gpu_local_cpus": sorted(local), "affinity": sorted(os.sched_getaffinity(0)),
                      "cpus": os.cpu_count()}), flush=True)
    loaded = build_random_model(args.model_config, dtype="bfloat16", device="cuda")
    store = KVStore(tempfile.mkdtemp(), gpu_bytes=16 << 30, host_bytes=8 << 30,
                    pinned_bytes=8 << 30)
    store.pin_host_memory()
    vocab = loaded.config.vocab_size
    suffix = _synthetic_ids(vocab, args.suffix, seed=1)
    doc = _synthetic_ids(vocab, args.n_tokens, seed=args.n_tokens)
    _cold_ttft(loaded, _synthetic_ids(vocab, 64, seed=2) + suffix, 32768)
    engine.warm_up(loaded)
    engine.freeze_startup_heap()
    fast = engine._fast_reuse(loaded)

    def colds() -> None:
        for _ in range(args.repeats):
            _cold_ttft(loaded, doc + suffix, 32768)

    def condition(label: str, before_each=None) -> None:
        if before_each is None:
            spans = timeline(loaded, store, key, suffix, fast, args.hot, samples=True)
        else:
            spans = {}
            for _ in range(args.hot):
                before_each()
                for name, v in timeline(loaded, store, key, suffix, fast, 1,
                                        samples=True).items():
                    spans.setdefault(name, []).extend(v)
        spans["cpu"] = [sched_getcpu()]
        medians = {f"median_{n}": round(statistics.median(v), 4) for n, v in spans.items()}
        print(json.dumps({"condition": label, **medians, "gc_counts": gc.get_count(),
                          "samples": spans}), flush=True)

    colds()
    key = engine.precompute_ids(loaded, doc, store=store, chunk_size=32768).key
    for tier in ("gpu", "disk", "host"):
        for _ in range(args.repeats):
            if tier == "disk":
                store.evict_memory()
            elif tier == "host":
                store.evict_memory(tiers=("gpu",))
            torch.cuda.synchronize()
            engine.generate(loaded, store, key, prompt_ids=suffix, max_tokens=1)
            torch.cuda.synchronize()
        if tier == "gpu":
            condition("hot, after cold prefills and precompute")
    condition("hot, after the disk and host tiers (as bench/kv_reuse.py times it)")
    condition("hot, again")
    gc.collect()
    condition("hot, after gc.collect()")
    condition("hot, GPU idle 50 ms before each", lambda: time.sleep(0.05))
    colds()
    condition("hot, after more cold prefills")


if __name__ == "__main__":
    main()
