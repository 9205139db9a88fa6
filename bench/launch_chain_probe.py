"""What a kernel boundary costs inside a CUDA graph (GPU): chains of small dependent kernels
(each reads the one value the kernel before it wrote and writes its own, on one program or on
132), captured in one graph, launched plainly or with programmatic dependent launch as the
fast path's kernels are (signal the next kernel first, then wait for the previous one). A reuse
step is ~330 kernels in a row; the time a boundary takes is what fusing kernels, or one
persistent kernel per layer, could save. Prints JSON (us per kernel).

python bench/launch_chain_probe.py
"""

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.graph_inputs_probe import _latency_us  # noqa: E402
from bench.profile_fastpath import _captured  # noqa: E402
from inference.fastpath.kernels import (  # noqa: E402
    _launch,
    _start_dependents,
    _wait_for_previous,
)


@triton.jit
def _link(src_ptr, dst_ptr, PDL: tl.constexpr):
    _start_dependents(PDL)
    _wait_for_previous(PDL)
    if tl.program_id(0) == 0:
        tl.store(dst_ptr, tl.load(src_ptr) + 1)


def _chain_us(n_kernels: int, programs: int, pdl: bool) -> float:
    cells = torch.zeros(n_kernels + 1, dtype=torch.int64, device="cuda")

    def chain():
        for i in range(n_kernels):
            _link[(programs,)](cells[i:], cells[i + 1:], PDL=pdl, **_launch(pdl))

    graph = _captured(chain)
    cells.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert int(cells[-1]) == n_kernels  # every link saw its predecessor's write
    return _latency_us(graph, 200)


def main() -> None:
    report = {"device": torch.cuda.get_device_name()}
    for programs in (1, 132):
        for pdl in (False, True):
            short, long = _chain_us(30, programs, pdl), _chain_us(330, programs, pdl)
            key = f"{'pdl' if pdl else 'plain'}_{programs}_programs_us_per_kernel"
            report[key] = round((long - short) / 300, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
