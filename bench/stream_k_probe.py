"""Probe: a Gluon stream-K product for few rows against the Triton split-K product.

Every SM streams one equal, contiguous share of the weight matrix's (tile, k-step) units through
one TMA ring that never drains between tiles, so there are no waves, no per-tile ramp and no
tail of idle SMs. A tile split between programs leaves one fp32 partial per piece (summed by the
next kernel, as split-K partials are).

The last rows (`_chained_kernel`) run gate_up then down in one persistent launch with a grid
barrier between them, against two launches: what a kernel boundary between products costs.
On an H200 the single launch was slower: 48.2 us a layer (47.7 with the second product's weights
prefetched across the barrier) against 45.4 for two launches
(bench/results/stream_k_probe-chained-qwen3-4b-h200.txt). Its grid barrier needs every program
resident (one per SM), so run it under `timeout`.

python bench/stream_k_probe.py                 # GPU (Hopper): JSON lines, us per layer of 36
timeout 120 python bench/stream_k_probe.py --chained-only
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@gluon.jit
def _ring(x_desc, w_desc, STAGES: gl.constexpr):
    """STAGES slots of an activation tile and a weight tile each (shared memory)."""
    x_bufs = gl.allocate_shared_memory(
        x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout
    )
    w_bufs = gl.allocate_shared_memory(
        w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout
    )
    return x_bufs, w_bufs


@gluon.jit
def _barriers(STAGES: gl.constexpr):
    """One mbarrier per ring slot, each completed by one arrival (or a TMA's bytes)."""
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    return bars


@gluon.jit
def _accumulator(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    """A zero wgmma accumulator [BLOCK_M, BLOCK_N] and its row and column indices."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    return acc, rows, cols


@gluon.jit
def _share(units):
    """This program's equal, contiguous share [start, end) of a product's units."""
    pid = gl.program_id(0)
    n_programs = gl.num_programs(0)
    return pid * units // n_programs, (pid + 1) * units // n_programs


@gluon.jit
def _store_piece(out_ptr, acc, rows, cols, tile, k_steps, units, M, N, BLOCK_N: gl.constexpr):
    """This program's piece of a tile: stored in the tile's slot for it, counted from the
    program holding the tile's first unit (the owner of unit t is the last program starting at
    or before it)."""
    pid = gl.program_id(0)
    n_programs = gl.num_programs(0)
    piece = pid - ((tile * k_steps + 1) * n_programs - 1) // units
    c = tile * BLOCK_N + cols
    offs = (piece * M + rows[:, None]).to(gl.int64) * N + c[None, :]
    gl.store(out_ptr + offs, acc, mask=(rows < M)[:, None] & (c < N)[None, :])


@gluon.jit
def _issue(
    x_desc,
    w_desc,
    x_bufs,
    w_bufs,
    bars,
    u,
    u_end,
    slot,
    K_STEPS,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    TILED: gl.constexpr,
    LOAD_X: gl.constexpr = True,
):
    """TMA loads of unit u (its tile's weight rows and the activations at its k-step)."""
    pred = u < u_end
    tile = u // K_STEPS
    k = (u - tile * K_STEPS) * BLOCK_K
    bar = bars.index(slot)
    if LOAD_X:
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(x_desc, [0, k], bar, x_bufs.index(slot), pred)
    else:  # timing probe only: the weights alone stream (products of stale activations)
        mbarrier.expect(bar, w_desc.block_type.nbytes, pred=pred)
    if TILED:  # the weight stored tile by tile: each [BLOCK_N, BLOCK_K] block contiguous
        tma.async_copy_global_to_shared(w_desc, [u * BLOCK_N, 0], bar, w_bufs.index(slot), pred)
    else:
        tma.async_copy_global_to_shared(w_desc, [tile * BLOCK_N, k], bar, w_bufs.index(slot), pred)


@gluon.jit
def _stream_k_kernel(
    x_desc,
    w_desc,
    out_ptr,
    M,
    N,
    K_STEPS,
    UNITS,
    STAGES: gl.constexpr,
    TILED: gl.constexpr,
    num_warps: gl.constexpr,
    LOAD_X: gl.constexpr = True,
    MMA: gl.constexpr = True,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    u_start, u_end = _share(UNITS)

    x_bufs, w_bufs = _ring(x_desc, w_desc, STAGES)
    bars = _barriers(STAGES)
    for s in gl.static_range(STAGES - 1):
        _issue(
            x_desc,
            w_desc,
            x_bufs,
            w_bufs,
            bars,
            u_start + s,
            u_end,
            s,
            K_STEPS,
            BLOCK_N,
            BLOCK_K,
            TILED,
            LOAD_X,
        )

    acc, rows, cols = _accumulator(BLOCK_M, BLOCK_N, num_warps)
    use_acc = gl.to_tensor(False)
    for u in range(u_start, u_end):
        i = u - u_start
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        if MMA:
            acc = warpgroup_mma(
                x_bufs.index(slot),
                w_bufs.index(slot).permute((1, 0)),
                acc,
                use_acc=use_acc,
                is_async=True,
            )
        # The previous unit's product is done, so its slot takes the unit STAGES - 1 ahead.
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        _issue(
            x_desc,
            w_desc,
            x_bufs,
            w_bufs,
            bars,
            u + STAGES - 1,
            u_end,
            (i + STAGES - 1) % STAGES,
            K_STEPS,
            BLOCK_N,
            BLOCK_K,
            TILED,
            LOAD_X,
        )
        use_acc = gl.to_tensor(True)
        tile = u // K_STEPS
        k_step = u - tile * K_STEPS
        if (k_step == K_STEPS - 1) | (u == u_end - 1):
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _store_piece(out_ptr, acc, rows, cols, tile, K_STEPS, UNITS, M, N, BLOCK_N)
            use_acc = gl.to_tensor(False)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))


@gluon.jit
def _ws_loads(
    x_desc,
    w_desc,
    x_bufs,
    w_bufs,
    ready,
    empty,
    u_start,
    u_end,
    K_STEPS,
    STAGES: gl.constexpr,
    TILED: gl.constexpr,
):
    """Producer warp: TMA loads run ahead as soon as the consumer frees a slot."""
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    for u in range(u_start, u_end):
        i = u - u_start
        slot = i % STAGES
        # A fresh barrier passes a wait on parity 1: the first pass over the ring needs no free.
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        tile = u // K_STEPS
        k = (u - tile * K_STEPS) * BLOCK_K
        bar = ready.index(slot)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [0, k], bar, x_bufs.index(slot))
        if TILED:
            tma.async_copy_global_to_shared(w_desc, [u * BLOCK_N, 0], bar, w_bufs.index(slot))
        else:
            tma.async_copy_global_to_shared(w_desc, [tile * BLOCK_N, k], bar, w_bufs.index(slot))


@gluon.jit
def _ws_products(
    x_bufs,
    w_bufs,
    ready,
    empty,
    out_ptr,
    M,
    N,
    K_STEPS,
    UNITS,
    u_start,
    u_end,
    STAGES: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Consumer warpgroup: products in unit order; a finished piece of a tile is stored."""
    acc, rows, cols = _accumulator(BLOCK_M, BLOCK_N, num_warps)
    use_acc = gl.to_tensor(False)
    for u in range(u_start, u_end):
        i = u - u_start
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        acc = warpgroup_mma(
            x_bufs.index(slot),
            w_bufs.index(slot).permute((1, 0)),
            acc,
            use_acc=use_acc,
            is_async=True,
        )
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        use_acc = gl.to_tensor(True)
        tile = u // K_STEPS
        if (u - tile * K_STEPS == K_STEPS - 1) | (u == u_end - 1):
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _store_piece(out_ptr, acc, rows, cols, tile, K_STEPS, UNITS, M, N, BLOCK_N)
            use_acc = gl.to_tensor(False)


@gluon.jit
def _stream_k_ws_kernel(
    x_desc,
    w_desc,
    out_ptr,
    M,
    N,
    K_STEPS,
    UNITS,
    STAGES: gl.constexpr,
    TILED: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    u_start, u_end = _share(UNITS)
    x_bufs, w_bufs = _ring(x_desc, w_desc, STAGES)
    ready = _barriers(STAGES)
    empty = _barriers(STAGES)
    gl.warp_specialize(
        [
            (
                _ws_products,
                (
                    x_bufs,
                    w_bufs,
                    ready,
                    empty,
                    out_ptr,
                    M,
                    N,
                    K_STEPS,
                    UNITS,
                    u_start,
                    u_end,
                    STAGES,
                    BLOCK_M,
                    BLOCK_N,
                    num_warps,
                ),
            ),
            (
                _ws_loads,
                (
                    x_desc,
                    w_desc,
                    x_bufs,
                    w_bufs,
                    ready,
                    empty,
                    u_start,
                    u_end,
                    K_STEPS,
                    STAGES,
                    TILED,
                ),
            ),
        ],
        [1],
        [48],
    )


# --- two products in one persistent launch -------------------------------------------------
# Hypothesis for the next step (a persistent kernel per layer): a kernel boundary between two
# products costs a ramp (the first loads' latency) and a drain. In one launch, the second
# product's weights can stream into the ring before the grid barrier that its activations
# wait for (activations come from the first product in a real layer; here they are the
# probe's own input, loaded only after the barrier as if they did).


@gluon.jit
def _grid_barrier(sync_ptr):
    """All programs meet here (all are resident: one per SM). sync_ptr[0] counts arrivals and
    is reset by the last one, which then bumps the generation sync_ptr[1] the others wait on,
    so the same two words serve every launch and graph replay."""
    n_programs = gl.num_programs(0)
    generation = gl.atomic_add(sync_ptr + 1, 0)
    arrived = gl.atomic_add(sync_ptr, 1)
    if arrived == n_programs - 1:
        gl.atomic_xchg(sync_ptr, 0)
        gl.atomic_add(sync_ptr + 1, 1)
    else:
        while gl.atomic_add(sync_ptr + 1, 0) == generation:
            pass


@gluon.jit
def _unit_of(i, n_a, a_start, b_start, k_steps_a, k_steps_b):
    """The program's i-th unit: (is it the second product's, tile, k-step)."""
    second = i >= n_a
    u = gl.where(second, b_start + i - n_a, a_start + i)
    k_steps = gl.where(second, k_steps_b, k_steps_a)
    tile = u // k_steps
    return second, tile, u - tile * k_steps


@gluon.jit
def _issue_w(
    wa_desc,
    wb_desc,
    w_bufs,
    wbar,
    second,
    tile,
    k_step,
    slot,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
):
    bar = wbar.index(slot)
    mbarrier.expect(bar, wa_desc.block_type.nbytes)
    if second:
        tma.async_copy_global_to_shared(
            wb_desc, [tile * BLOCK_N, k_step * BLOCK_K], bar, w_bufs.index(slot)
        )
    else:
        tma.async_copy_global_to_shared(
            wa_desc, [tile * BLOCK_N, k_step * BLOCK_K], bar, w_bufs.index(slot)
        )


@gluon.jit
def _issue_x(xa_desc, xb_desc, x_bufs, xbar, second, k_step, slot, BLOCK_K: gl.constexpr):
    bar = xbar.index(slot)
    mbarrier.expect(bar, xa_desc.block_type.nbytes)
    if second:
        tma.async_copy_global_to_shared(xb_desc, [0, k_step * BLOCK_K], bar, x_bufs.index(slot))
    else:
        tma.async_copy_global_to_shared(xa_desc, [0, k_step * BLOCK_K], bar, x_bufs.index(slot))


@gluon.jit
def _issue_unit(
    xa_desc,
    wa_desc,
    xb_desc,
    wb_desc,
    x_bufs,
    w_bufs,
    xbar,
    wbar,
    j,
    n_a,
    n_all,
    a_start,
    b_start,
    k_steps_a,
    k_steps_b,
    STAGES: gl.constexpr,
    PREFETCH: gl.constexpr,
    after_barrier,
):
    """Loads of the program's unit j (if any): the second product's activations only after
    the barrier, its weights before it too when PREFETCH."""
    if j < n_all:
        BLOCK_N: gl.constexpr = wa_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = xa_desc.block_type.shape[1]
        second, tile, k_step = _unit_of(j, n_a, a_start, b_start, k_steps_a, k_steps_b)
        slot = j % STAGES
        if (not second) | after_barrier | PREFETCH:
            _issue_w(wa_desc, wb_desc, w_bufs, wbar, second, tile, k_step, slot, BLOCK_N, BLOCK_K)
        if (not second) | after_barrier:
            _issue_x(xa_desc, xb_desc, x_bufs, xbar, second, k_step, slot, BLOCK_K)


@gluon.jit
def _chained_kernel(
    xa_desc,
    wa_desc,
    out_a,
    xb_desc,
    wb_desc,
    out_b,
    sync_ptr,
    M,
    N_A,
    K_STEPS_A,
    UNITS_A,
    N_B,
    K_STEPS_B,
    UNITS_B,
    STAGES: gl.constexpr,
    PREFETCH: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Stream-K over product A's units, a grid barrier, then product B's, through one ring."""
    BLOCK_M: gl.constexpr = xa_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = wa_desc.block_type.shape[0]
    a_start, a_end = _share(UNITS_A)
    b_start, b_end = _share(UNITS_B)
    n_a = a_end - a_start
    n_all = n_a + b_end - b_start
    x_bufs, w_bufs = _ring(xa_desc, wa_desc, STAGES)
    xbar = _barriers(STAGES)
    wbar = _barriers(STAGES)
    for s in gl.static_range(STAGES - 1):
        _issue_unit(
            xa_desc,
            wa_desc,
            xb_desc,
            wb_desc,
            x_bufs,
            w_bufs,
            xbar,
            wbar,
            s,
            n_a,
            n_all,
            a_start,
            b_start,
            K_STEPS_A,
            K_STEPS_B,
            STAGES,
            PREFETCH,
            False,  # the second product's activations wait for the barrier
        )
    acc, rows, cols = _accumulator(BLOCK_M, BLOCK_N, num_warps)
    use_acc = gl.to_tensor(False)
    for i in range(0, n_all):
        if i == n_a:  # the first product is done here: wait for every program's
            _grid_barrier(sync_ptr)
            for s in gl.static_range(STAGES - 1):  # loads held back for the barrier
                j = i + s
                if j < n_all:
                    second, tile, k_step = _unit_of(j, n_a, a_start, b_start, K_STEPS_A, K_STEPS_B)
                    if not PREFETCH:
                        _issue_w(
                            wa_desc,
                            wb_desc,
                            w_bufs,
                            wbar,
                            second,
                            tile,
                            k_step,
                            j % STAGES,
                            BLOCK_N,
                            xa_desc.block_type.shape[1],
                        )
                    _issue_x(
                        xa_desc,
                        xb_desc,
                        x_bufs,
                        xbar,
                        second,
                        k_step,
                        j % STAGES,
                        xa_desc.block_type.shape[1],
                    )
        slot = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(wbar.index(slot), phase)
        mbarrier.wait(xbar.index(slot), phase)
        acc = warpgroup_mma(
            x_bufs.index(slot),
            w_bufs.index(slot).permute((1, 0)),
            acc,
            use_acc=use_acc,
            is_async=True,
        )
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        _issue_unit(
            xa_desc,
            wa_desc,
            xb_desc,
            wb_desc,
            x_bufs,
            w_bufs,
            xbar,
            wbar,
            i + STAGES - 1,
            n_a,
            n_all,
            a_start,
            b_start,
            K_STEPS_A,
            K_STEPS_B,
            STAGES,
            PREFETCH,
            i >= n_a,
        )
        use_acc = gl.to_tensor(True)
        second, tile, k_step = _unit_of(i, n_a, a_start, b_start, K_STEPS_A, K_STEPS_B)
        if second:
            if (k_step == K_STEPS_B - 1) | (i == n_all - 1):
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                _store_piece(out_b, acc, rows, cols, tile, K_STEPS_B, UNITS_B, M, N_B, BLOCK_N)
                use_acc = gl.to_tensor(False)
        elif (k_step == K_STEPS_A - 1) | (i == n_a - 1):
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _store_piece(out_a, acc, rows, cols, tile, K_STEPS_A, UNITS_A, M, N_A, BLOCK_N)
            use_acc = gl.to_tensor(False)
    if n_all == n_a:  # no unit of the second product: still meet the others
        _grid_barrier(sync_ptr)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(xbar.index(s))
        mbarrier.invalidate(wbar.index(s))


def chained(
    xa, wa, out_a, xb, wb, out_b, sync, programs: int, *, stages: int = 6, prefetch: bool = True
) -> None:
    """out_a pieces = xa @ wa.T, then out_b pieces = xb @ wb.T, in one launch (n64/k128)."""
    layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    descs = [TensorDescriptor.from_tensor(t, [64, 128], layout) for t in (xa, wa, xb, wb)]
    (n_a, k_a), (n_b, k_b) = wa.shape, wb.shape
    _chained_kernel[(programs,)](
        descs[0],
        descs[1],
        out_a,
        descs[2],
        descs[3],
        out_b,
        sync,
        xa.shape[0],
        n_a,
        triton.cdiv(k_a, 128),
        triton.cdiv(n_a, 64) * triton.cdiv(k_a, 128),
        n_b,
        triton.cdiv(k_b, 128),
        triton.cdiv(n_b, 64) * triton.cdiv(k_b, 128),
        STAGES=stages,
        PREFETCH=prefetch,
        num_warps=4,
    )


def max_pieces(units: int, k_steps: int, programs: int) -> int:
    """The most programs any tile is shared by."""
    owners: dict[int, set[int]] = {}
    for p in range(programs):
        for u in range(p * units // programs, (p + 1) * units // programs):
            owners.setdefault(u // k_steps, set()).add(p)
    return max(len(o) for o in owners.values())


def stream_k(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    programs: int,
    *,
    block_n: int = 64,
    block_k: int = 128,
    stages: int = 6,
    ws: bool = False,
    shape: tuple[int, int] | None = None,
    **probe,
) -> None:
    """shape: (N, K) of a weight given tiled (tile_weight), else w is [N, K]."""
    rows, k = x.shape
    n = w.shape[0] if shape is None else shape[0]
    block_m = 64
    x_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.bfloat16)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.bfloat16)
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k], x_layout)
    w_desc = TensorDescriptor.from_tensor(w, [block_n, block_k], w_layout)
    k_steps = triton.cdiv(k, block_k)
    units = triton.cdiv(n, block_n) * k_steps
    kernel = _stream_k_ws_kernel if ws else _stream_k_kernel
    kernel[(programs,)](
        x_desc,
        w_desc,
        out,
        rows,
        n,
        k_steps,
        units,
        STAGES=stages,
        TILED=shape is not None,
        num_warps=4,
        **probe,
    )


def tile_weight(w: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """[N, K] -> [N * K / block_k, block_k], tile (n, k) at rows (n * K/block_k + k) * block_n."""
    n, k = w.shape
    tiles = w.view(n // block_n, block_n, k // block_k, block_k).permute(0, 2, 1, 3)
    return tiles.contiguous().view(-1, block_k)


def _us_per_call(fn, repeat: int = 20) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e6


# (block_n, stages, programs per SM, warp-specialized, tiled weight, probe switches)
VARIANTS = (
    (64, 6, 1, False, False, {}),
    (64, 6, 1, True, False, {}),
    (128, 4, 1, False, False, {}),
    (128, 4, 1, True, False, {}),
    (64, 3, 2, False, False, {}),
    (64, 3, 2, True, False, {}),
    (64, 6, 1, False, True, {}),
    (128, 4, 1, False, True, {}),
    (32, 6, 1, False, True, {}),
    # Timing probes (wrong products): without activation loads, without the MMAs as well.
    (64, 6, 1, False, False, {"LOAD_X": False}),
    (64, 6, 1, False, False, {"MMA": False}),
    (64, 6, 1, False, False, {"LOAD_X": False, "MMA": False}),
)


def _stream_k_row(x, weights, n, k, sms, variant) -> dict:
    block_n, stages, per_sm, ws, tiled, probe = variant
    name = (
        f"gluon stream-k n{block_n} s{stages} x{per_sm}"
        + (" ws" if ws else "")
        + (" tiled" if tiled else "")
        + "".join(f" {key}={v}" for key, v in probe.items())
    )
    if tiled:
        weights, shape = [tile_weight(w, block_n, 128) for w in weights], (n, k)
    else:
        shape = None
    programs = sms * per_sm
    units = triton.cdiv(n, block_n) * triton.cdiv(k, 128)
    pieces = max_pieces(units, triton.cdiv(k, 128), programs)
    out = torch.zeros(pieces, x.shape[0], n, device="cuda", dtype=torch.float32)
    options = dict(block_n=block_n, stages=stages, ws=ws, shape=shape, **probe)
    try:
        stream_k(x, weights[0], out, programs, **options)
        torch.cuda.synchronize()
        summed = out.sum(0)
        us = _us_per_call(lambda: [stream_k(x, w, out, programs, **options) for w in weights])
    except Exception as exc:  # noqa: BLE001 - a probe: report and go on
        return {"variant": name, "error": str(exc)[:300]}
    return {"variant": name, "us": us, "pieces": pieces, "summed": summed}


def _sum_into(src: torch.Tensor, total: torch.Tensor) -> None:
    total.copy_(src.sum(dtype=torch.float32))


def _split_k_all(x: torch.Tensor, weights: list[torch.Tensor], sms: int) -> None:
    from inference.fastpath import kernels

    for w in weights:
        kernels.matmul(x, w, sms, tma=True)


def main() -> None:
    from inference.fastpath import kernels

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--chained-only", action="store_true", help="only the chained rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = {
        "qkv": (6144, 2560),
        "o_proj": (2560, 4096),
        "gate_up": (19456, 2560),
        "down": (2560, 9728),
    }
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    total = torch.empty((), device="cuda", dtype=torch.float32)
    read_us = _us_per_call(functools.partial(_sum_into, src, total), repeat=10)
    read = round(2 * src.numel() / read_us / 1e3, 1)
    print(json.dumps({"kind": "read (torch.sum of 2 GiB)", "gb_per_s": read}))
    del src, total
    for kind, (n, k) in ({} if args.chained_only else shapes).items():
        weights = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(args.layers)
        ]
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ weights[0].float().T
        us = _us_per_call(functools.partial(_split_k_all, x, weights, sms))
        rows = [
            {
                "variant": "triton split-k (tma, default)",
                "us": us,
                "summed": kernels.matmul(x, weights[0], sms, tma=True).sum(0),
            }
        ]
        rows += [_stream_k_row(x, weights, n, k, sms, v) for v in VARIANTS]
        for row in rows:
            if "us" in row:
                per = row.pop("us") / args.layers
                row["us_per_layer"] = round(per, 2)
                row["gb_per_s"] = round(n * k * 2 / per / 1e3, 1)
                row["max_diff_to_fp32"] = float((row.pop("summed") - ref).abs().max())
            print(json.dumps({"kind": kind, **row}), flush=True)
        del weights
    for row in _chained_rows(args.rows, args.layers, sms):
        print(json.dumps({"kind": "gate_up then down", **row}), flush=True)


def _chained_rows(rows: int, layers: int, sms: int) -> list[dict]:
    """gate_up then down for every layer: two launches each, or one launch with a barrier."""
    (n_a, k_a), (n_b, k_b) = (19456, 2560), (2560, 9728)
    w_a = [torch.randn(n_a, k_a, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    w_b = [torch.randn(n_b, k_b, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x_a = torch.randn(rows, k_a, device="cuda", dtype=torch.bfloat16)
    x_b = torch.randn(rows, k_b, device="cuda", dtype=torch.bfloat16)
    ref_a, ref_b = x_a.float() @ w_a[0].float().T, x_b.float() @ w_b[0].float().T
    units_a, units_b = (
        triton.cdiv(n, 64) * triton.cdiv(k, 128) for n, k in ((n_a, k_a), (n_b, k_b))
    )
    out_a = torch.zeros(max_pieces(units_a, triton.cdiv(k_a, 128), sms), rows, n_a, device="cuda")
    out_b = torch.zeros(max_pieces(units_b, triton.cdiv(k_b, 128), sms), rows, n_b, device="cuda")
    sync = torch.zeros(2, dtype=torch.int32, device="cuda")

    def run(prefetch: bool | None, layer_weights) -> None:
        """prefetch None: two stream-K launches per layer; else one chained launch."""
        for wa, wb in layer_weights:
            if prefetch is None:
                stream_k(x_a, wa, out_a, sms)
                stream_k(x_b, wb, out_b, sms)
            else:
                chained(x_a, wa, out_a, x_b, wb, out_b, sync, sms, prefetch=prefetch)

    variants = {
        "two stream-k launches": None,
        "one launch, barrier, then the second product's loads": False,
        "one launch, second product's weights prefetched across the barrier": True,
    }
    layer_weights = list(zip(w_a, w_b, strict=True))
    results = []
    for name, prefetch in variants.items():
        try:
            us = _us_per_call(functools.partial(run, prefetch, layer_weights), repeat=10)
            out_a.zero_()  # layer 0's pieces (the last replay left the last layer's)
            out_b.zero_()
            run(prefetch, layer_weights[:1])
            torch.cuda.synchronize()
            diff = max(
                float((out_a.sum(0) - ref_a).abs().max()),
                float((out_b.sum(0) - ref_b).abs().max()),
            )
            results.append(
                {"variant": name, "us_per_layer": round(us / layers, 2), "max_diff_to_fp32": diff}
            )
        except Exception as exc:  # noqa: BLE001 - a probe: report and go on
            results.append({"variant": name, "error": str(exc)[:300]})
    return results


if __name__ == "__main__":
    main()
