"""On a CUDA machine: the pinned arena's start cost, and that its buffers are pinned (copies
to the GPU run asynchronously) and copy exactly. Prints JSON.

python bench/check_pinned_arena.py --gib 8
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference.fastpath.transfer import HostPrefix, PinnedArena  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=int, default=8)
    args = parser.parse_args()
    torch.cuda.init()
    start = time.perf_counter()
    arena = PinnedArena(args.gib << 30)
    report = {"device": torch.cuda.get_device_name(), "arena_bytes": arena.nbytes,
              "arena_pin_s": round(time.perf_counter() - start, 3)}
    shape = (36, 2, 8, 3774, 128)  # Qwen3-4B, 3774 tokens
    start = time.perf_counter()
    fresh = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
    report["fresh_pinned_alloc_s"] = round(time.perf_counter() - start, 3)
    del fresh
    start = time.perf_counter()
    host = HostPrefix.empty(*shape[:1], *shape[2:], torch.bfloat16, arena=arena)
    report["arena_alloc_s"] = round(time.perf_counter() - start, 6)
    report["arena_buffer_is_pinned"] = host.buffer.is_pinned()
    host.buffer.copy_(torch.randn(shape).to(torch.bfloat16))
    torch.cuda.synchronize()
    start = time.perf_counter()
    landing = host.to_device(torch.device("cuda"), overlap=False)
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    report["copy_issue_s"] = round(issued, 6)
    report["copy_s"] = round(total, 5)
    report["copy_gb_per_s"] = round(host.nbytes / total / 1e9, 1)
    report["copy_exact"] = bool(torch.equal(landing.buffer.cpu(), host.buffer))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
