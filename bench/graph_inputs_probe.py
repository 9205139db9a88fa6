"""What a first-step graph's input copies cost (GPU): replay + synchronise latency of small
graphs that bring a step's inputs (48 token ids and a length, 49 int64 in one pinned buffer) to
the GPU as the fast path's graphs do (two copies, an event, the lengths zeroed) and in cheaper
ways (one copy; a kernel that reads the pinned buffer itself). Each graph ends with the same
tiny kernel that reads the ids, so they do equal work after the inputs. Prints JSON (us).

python bench/graph_inputs_probe.py
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.profile_fastpath import _captured  # noqa: E402


@triton.jit
def _read_ids(ids_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.load(ids_ptr + i) + 1)


@triton.jit
def _copy_in(host_ptr, dev_ptr, lengths_ptr, N: tl.constexpr, B: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(dev_ptr + i, tl.load(host_ptr + i))
    tl.store(lengths_ptr + tl.arange(0, B), tl.zeros([B], tl.int64))


def _latency_us(graph: torch.cuda.CUDAGraph, n: int = 2000) -> float:
    """Median time of a replay and the synchronisation after it, the GPU idle before each."""
    samples = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def main() -> None:
    n_ids, batch = 48, 1
    width = 64  # power of two for tl.arange; the ids past 49 are padding
    host = torch.zeros(width, dtype=torch.long).pin_memory()
    dev = torch.zeros(width, dtype=torch.long, device="cuda")
    ids, n_valid = dev[:n_ids], dev[n_ids:n_ids + batch]
    lengths = torch.zeros(batch, dtype=torch.long, device="cuda")
    out = torch.zeros(width, dtype=torch.long, device="cuda")
    event = torch.cuda.Event(external=True)

    def two_copies():
        ids.copy_(host[:n_ids], non_blocking=True)
        n_valid.copy_(host[n_ids:n_ids + batch], non_blocking=True)
        event.record()
        lengths.zero_()
        _read_ids[(1,)](dev, out, N=width)

    def one_copy():
        dev.copy_(host, non_blocking=True)
        event.record()
        lengths.zero_()
        _read_ids[(1,)](dev, out, N=width)

    def kernel_reads_host():
        _copy_in[(1,)](host, dev, lengths, N=width, B=batch)
        event.record()
        _read_ids[(1,)](dev, out, N=width)

    def nothing_in():
        _read_ids[(1,)](dev, out, N=width)

    report = {"device": torch.cuda.get_device_name()}
    for name, fn in [("two_copies_event_zero", two_copies), ("one_copy_event_zero", one_copy),
                     ("kernel_reads_pinned_host", kernel_reads_host),
                     ("no_inputs", nothing_in)]:
        graph = _captured(fn)
        host.copy_(torch.arange(width))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:n_ids].cpu(), torch.arange(n_ids) + 1), name
        report[f"{name}_us"] = round(_latency_us(graph), 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
