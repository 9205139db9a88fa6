"""What a graph replay's host call costs, and whether the GPU waits for it (GPU): chains of
dependent one-value kernels captured as CUDA graphs (as a reuse step's ~330 kernels are),
launched plainly or with programmatic dependent launch, with and without the extra nodes a
first-step graph holds (an input copy from pinned memory, two external event records). For
each: the host time of replay() alone, replay + synchronise latency with the GPU idle before,
and back-to-back time per replay. latency - back_to_back is what a lone request pays for the
launch; if it grows with the graph's length, the GPU starts only once most of the graph is
submitted, and a short head graph launched first (the rest launched while it runs) hides it.
Prints JSON (us).

python bench/graph_launch_probe.py
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.launch_chain_probe import _link  # noqa: E402
from inference.fastpath.kernels import _launch  # noqa: E402


def _timings(launch, n: int = 300) -> dict:
    """launch(): replays one request's graph(s). Medians over n, the GPU idle before each."""
    host, latency = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        launch()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        latency.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        launch()
    torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - start) / n
    return {"host_us": round(statistics.median(host) * 1e6, 1),
            "latency_us": round(statistics.median(latency) * 1e6, 1),
            "back_to_back_us": round(back_to_back * 1e6, 1)}


def _graphs(n_kernels: int, *, pdl: bool, extras: bool, head: int = 0) -> list:
    """One graph of the chain, or two (its first `head` kernels, then the rest)."""
    cells = torch.zeros(n_kernels + 1, dtype=torch.int64, device="cuda")
    host = torch.zeros(64, dtype=torch.long).pin_memory()
    inputs = torch.zeros(64, dtype=torch.long, device="cuda")
    events = [torch.cuda.Event(external=True) for _ in range(2)]

    def links(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            _link[(1,)](cells[i:], cells[i + 1:], PDL=pdl, **_launch(pdl))

    def part(lo: int, hi: int) -> None:
        if extras and lo == 0:
            inputs.copy_(host, non_blocking=True)
            events[0].record()
        links(lo, hi)
        if extras and hi == n_kernels:
            events[1].record()

    bounds = [(0, head), (head, n_kernels)] if head else [(0, n_kernels)]
    links(0, n_kernels)  # compile
    graphs = []
    for lo, hi in bounds:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            part(lo, hi)
        graphs.append(graph)
    cells.zero_()
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    assert int(cells[-1]) == n_kernels  # every link saw its predecessor's write
    return graphs


def _host_buffer_us(n: int = 20000) -> dict:
    """A request's host-side buffer work: 48 token ids written, one token read back, in a
    pinned buffer (what the graphs copy from and write into) and in pageable memory."""
    row = list(range(1000, 1048))
    pinned = torch.zeros(65, dtype=torch.long).pin_memory()
    arrays = {"pinned": pinned.numpy(), "pageable": torch.zeros(65, dtype=torch.long).numpy()}
    out = {}
    for name, arr in arrays.items():
        start = time.perf_counter()
        for _ in range(n):
            arr[:48] = row
            arr[48:64] = 0
            arr[64] = 48
        out[f"write_ids_{name}_us"] = round((time.perf_counter() - start) / n * 1e6, 2)
        start = time.perf_counter()
        for _ in range(n):
            int(arr[0])
        out[f"read_token_numpy_{name}_us"] = round((time.perf_counter() - start) / n * 1e6, 2)
    start = time.perf_counter()
    for _ in range(n):
        pinned[:1].tolist()
    out["read_token_tolist_pinned_us"] = round((time.perf_counter() - start) / n * 1e6, 2)
    return out


def main() -> None:
    report = {"device": torch.cuda.get_device_name()}
    rows = []
    for n in (30, 330):
        for pdl in (False, True):
            for extras in (False, True):
                graphs = _graphs(n, pdl=pdl, extras=extras)
                rows.append({"kernels": n, "pdl": pdl, "copy_and_events": extras,
                             **_timings(graphs[0].replay)})
    for head in (30, 100):
        graphs = _graphs(330, pdl=True, extras=True, head=head)

        def both(graphs=graphs):
            for graph in graphs:
                graph.replay()

        rows.append({"kernels": 330, "pdl": True, "copy_and_events": True,
                     "head_graph_kernels": head, **_timings(both)})
    for row in rows:
        print(json.dumps(row), flush=True)
    print(json.dumps(_host_buffer_us()), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
