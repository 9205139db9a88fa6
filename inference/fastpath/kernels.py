"""Fused Triton kernels for the fast path's suffix step.

Why: after CUDA graphs remove launch gaps, a reuse step is the weight-bound GEMMs plus ~50
small elementwise kernels per layer (norms, rope, copies, the attention merge), each a few
microseconds, and a prefix attention that puts too few thread blocks on the chip when a single
request has 48 tokens. Here each layer's non-GEMM work is six kernels:

* add_rms_norm: residual add and RMSNorm in one pass;
* qk_norm_rope_store: Qwen3's per-head q/k norm, rotary embedding, and the suffix KV write;
* attention: one launch for the shared prefix split into KV chunks (flash-decoding) and each
  row's own suffix (causal, per-row lengths), and one kernel that merges the partial results by
  log-sum-exp and writes them in the layout the output projection reads;
* silu_mul: the MLP activation.

Each kernel rounds where transformers rounds (e.g. RMSNorm casts before its weight multiply,
rope rounds each product), so bf16 results stay as close to the plain model as the order of
floating point sums allows. The same functions run on CPU under TRITON_INTERPRET=1 (float32)
in the tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4 (programmatic dependent launch on Hopper and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: the kernels run without PDL
    gdc_launch_dependents = gdc_wait = None

if TYPE_CHECKING:
    from inference.fastpath.model import PrefixTable

LOG2E = 1.4426950408889634

# Sizes that change from request to request (rows, prefix length, suffix length) are marked
# do_not_specialize: Triton would otherwise compile a variant per divisibility class of each,
# and a worker's first request on a new document length would wait for the compiler. They are
# used in masks and in offsets multiplied by aligned strides, so the hints buy nothing here.


# --- programmatic dependent launch ------------------------------------------------------------
# A reuse step is ~300 kernels in a row, most of them a few microseconds long, between weight
# products that need the whole memory bandwidth. Launched with PDL, a kernel starts while the one
# before it still runs: it first signals that its own successor may start (so the chain of
# launches runs ahead of the work), prefetches or loads what no earlier kernel of the step
# writes (weights, rope tables, the prefix table, the lengths: only a step's last kernel
# advances them) while the previous kernel runs, then waits for its predecessor to finish and
# flush (griddepcontrol.wait) before it touches anything else. Memory is therefore idle less
# often: the next layer's weights stream in while norms and attention run.
# The wait is transitive (each kernel waits for the one before, which waited for its own), and a
# kernel writes nothing before its wait, so results are bitwise those of plain launches.


def tma_available(device: torch.device) -> bool:
    """Tensor-memory-accelerator loads (the products' TMA variant) need Hopper or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_available(device: torch.device) -> bool:
    """PDL needs Hopper or later and a Triton that exposes griddepcontrol."""
    return (
        device.type == "cuda"
        and gdc_wait is not None
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def _launch(pdl: bool) -> dict:
    """Launch options: the interpreter (CPU tests) knows nothing of PDL, so it gets none."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _start_dependents(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _wait_for_previous(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def _prefetch_l2(ptrs, nbytes):
    """Ask the copy engine of the SM to bring nbytes at each pointer into L2 (no registers,
    no wait). nbytes must be a multiple of 16 and the pointers 16-byte aligned; 0 skips."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r",
        [ptrs, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _start_after_previous_streaming_weights(
    w_ptr, rn, N, K, k0, K_PER_SPLIT: tl.constexpr, PDL: tl.constexpr, PREFETCH_K: tl.constexpr,
    PREFETCH_PROGRAMS: tl.constexpr,
):
    """A product block's start under PDL: signal the next kernel, send the first PREFETCH_K
    columns of this block's weight rows (from k0) to L2, then wait for the previous kernel.
    PREFETCH_PROGRAMS: only the first that many blocks prefetch (0: every block)."""
    _start_dependents(PDL)
    if PDL and PREFETCH_K > 0:
        if PREFETCH_PROGRAMS == 0:
            _prefetch_first_columns(w_ptr, rn, N, K, k0, K_PER_SPLIT, PREFETCH_K)
        elif tl.program_id(0) + tl.program_id(1) * tl.num_programs(0) < PREFETCH_PROGRAMS:
            _prefetch_first_columns(w_ptr, rn, N, K, k0, K_PER_SPLIT, PREFETCH_K)
    _wait_for_previous(PDL)


@triton.jit
def _prefetch_first_columns(
    w_ptr, rn, N, K, k0, K_PER_SPLIT: tl.constexpr, PREFETCH_K: tl.constexpr
):
    """Send the first PREFETCH_K columns (from k0) of the weight rows rn to L2."""
    n_k = tl.minimum(tl.minimum(PREFETCH_K, K_PER_SPLIT), K - k0)
    nbytes = tl.where(rn < N, n_k * w_ptr.dtype.element_ty.primitive_bitwidth // 8, 0)
    _prefetch_l2(w_ptr + rn.to(tl.int64) * K + k0, nbytes.to(tl.int32))


def _precision(dtype: torch.dtype) -> str | None:
    # float32 models (tests, CPU interpreter) must not silently drop to tf32.
    return "ieee" if dtype == torch.float32 else None


# --- matrix products with few rows --------------------------------------------------------
# A reuse step multiplies ~48 rows by every weight matrix: pure weight streaming. Thread blocks
# own a column tile and a slice of K (split-K) so that every SM streams weights; each slice
# writes float32 partial sums [splits, rows, N], and the kernel that consumes the product
# (norm, rope, activation) adds the slices and rounds once, as a GEMM rounds its output.
# Products without split (cuBLAS, bigger batches) are passed as [1, rows, N].


@triton.jit
def _store_product(
    out_ptr, act_ptr, acc, rm, rn, M, N, split, pid_n,
    BLOCK_M: tl.constexpr, SILU_GROUP: tl.constexpr,
):
    """A product block's result: its float32 partial sum in slice `split` of out [splits, M, N],
    or, with SILU_GROUP (a gate/up product in one split whose tile holds SILU_GROUP gate
    columns then their SILU_GROUP up columns), silu(gate) * up in act [M, N / 2], rounded
    exactly as silu_mul rounds (the output, then silu, then the product)."""
    if SILU_GROUP:
        dtype = act_ptr.dtype.element_ty
        halves = tl.permute(tl.reshape(acc.to(dtype), [BLOCK_M, 2, SILU_GROUP]), [0, 2, 1])
        gate, up = tl.split(halves)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype)
        cols = pid_n * SILU_GROUP + tl.arange(0, SILU_GROUP)
        inter = N // 2
        tl.store(
            act_ptr + rm[:, None].to(tl.int64) * inter + cols[None, :],
            act.to(tl.float32) * up.to(tl.float32),
            mask=(rm < M)[:, None] & (cols < inter)[None, :],
        )
    else:
        out = out_ptr + (split * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(out, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _matmul_partials_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    act_ptr,
    M,
    N,
    K,
    K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH_K: tl.constexpr,
    PREFETCH_PROGRAMS: tl.constexpr,
    SILU_GROUP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k0 = split * K_PER_SPLIT
    _start_after_previous_streaming_weights(
        w_ptr, rn, N, K, k0, K_PER_SPLIT, PDL, PREFETCH_K, PREFETCH_PROGRAMS
    )
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k = k0 + kk + rk
        k_ok = k < K
        a = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :])
        b = tl.load(
            w_ptr + rn[None, :].to(tl.int64) * K + k[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    _store_product(out_ptr, act_ptr, acc, rm, rn, M, N, split, pid_n, BLOCK_M, SILU_GROUP)


@triton.jit(do_not_specialize=["M"])
def _matmul_tma_kernel(
    x_desc,
    w_desc,
    w_ptr,
    out_ptr,
    act_ptr,
    M,
    N,
    K,
    K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH_K: tl.constexpr,
    PREFETCH_PROGRAMS: tl.constexpr,
    SILU_GROUP: tl.constexpr,
):
    """_matmul_partials_kernel with tiles brought in by the tensor memory accelerator (Hopper):
    one instruction per tile instead of per-thread address arithmetic, rows and columns past
    the matrix zero-filled by the copy engine."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = split * K_PER_SPLIT
    _start_after_previous_streaming_weights(
        w_ptr, rn, N, K, k0, K_PER_SPLIT, PDL, PREFETCH_K, PREFETCH_PROGRAMS
    )
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        a = x_desc.load([0, k0 + kk])
        b = w_desc.load([pid_n * BLOCK_N, k0 + kk])
        acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
    _store_product(out_ptr, act_ptr, acc, rm, rn, M, N, split, pid_n, BLOCK_M, SILU_GROUP)


# Products of at most this many rows are decode-sized: they get more, shallower split-K blocks,
# pointer loads and plain launches (TMA and PDL gained nothing for them).
DECODE_ROWS = 16


def matmul_plan(
    n: int, k: int, n_sms: int, *, block_n: int = 64, waves: float = 2.0, block_k: int = 128
) -> tuple[int, int]:
    """(splits, K per split) so about `waves` blocks per SM stream the weight matrix."""
    k_blocks = triton.cdiv(k, block_k)
    tiles = triton.cdiv(n, block_n)
    splits = max(1, min(round(waves * n_sms / tiles), k_blocks // 2 or 1))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def use_split_k(rows: int, n: int, n_sms: int) -> bool:
    """Where split-K beats one cuBLAS product: decode-sized products, and products whose column
    tiles alone leave SMs idle."""
    return rows <= DECODE_ROWS or (rows <= 64 and triton.cdiv(n, 64) < 2 * n_sms)


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    n_sms: int,
    *,
    block_n: int = 64,
    waves: float | None = None,
    stages: int | None = None,
    pdl: bool = False,
    prefetch_k: int = 0,
    prefetch_programs: int = 0,
    tma: bool = False,
    block_k: int = 128,
    silu_group: int = 0,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T for small M, as float32 partial sums [splits, M, N].
    pdl: launch with programmatic dependent launch, prefetching the first prefetch_k columns of
    the block's weight rows into L2 while the previous kernel finishes (prefetch_programs: only
    the first that many blocks, e.g. those of the first wave; 0: every block).
    silu_group: weight is a gate/up matrix interleaved in groups of silu_group rows
    (interleave_gate_up); returns silu(gate) * up [M, N / 2] in x's dtype instead, computed by
    the product's own blocks when it runs in one split with tiles of both halves of a group
    (no partial sums written and read back, no activation kernel), else by silu_mul."""
    rows, k = x.shape
    n = weight.shape[0]
    block_m = max(16, triton.next_power_of_2(rows))
    if waves is None:  # more blocks for decode-sized products, which are latency-bound
        waves = 2.0 if rows <= DECODE_ROWS else 1.0
    if stages is None:
        stages = 3 if rows <= DECODE_ROWS else (6 if tma else 5)
    # As many pipeline stages as fit in shared memory (float32 tests need fewer).
    stage_bytes = (block_m + block_n) * block_k * x.element_size()
    stages = max(2, min(stages, (200 << 10) // stage_bytes))
    splits, k_per_split = matmul_plan(n, k, n_sms, block_n=block_n, waves=waves, block_k=block_k)
    fused_silu = silu_group and splits == 1 and block_n == 2 * silu_group
    out = torch.empty(
        (0 if fused_silu else splits, rows, n), dtype=torch.float32, device=x.device
    )
    act = torch.empty((rows, n // 2) if fused_silu else (0,), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), splits)
    sizes_and_options = dict(
        K_PER_SPLIT=k_per_split,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION=_precision(x.dtype),
        PDL=pdl,
        PREFETCH_K=prefetch_k,
        PREFETCH_PROGRAMS=prefetch_programs,
        SILU_GROUP=silu_group if fused_silu else 0,
        num_warps=4,
        num_stages=stages,
        **_launch(pdl),
    )
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
        _matmul_tma_kernel[grid](
            x_desc, w_desc, weight, out, act, rows, n, k, **sizes_and_options
        )
    else:
        _matmul_partials_kernel[grid](x, weight, out, act, rows, n, k, **sizes_and_options)
    if fused_silu:
        return act
    if silu_group:
        return silu_mul(out, x.dtype, group=silu_group, pdl=pdl)
    return out


@triton.jit
def _sum_parts(ptr, offsets, mask, part_stride, PARTS: tl.constexpr, dtype: tl.constexpr):
    """Sum PARTS partial products at ptr + offsets and round to the model dtype."""
    total = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(1, PARTS):
        total += tl.load(ptr + p * part_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    return total.to(dtype)


# --- RMSNorm with the residual add -----------------------------------------------------------
@triton.jit(do_not_specialize=["n_rows", "seq_len"])
def _add_rms_norm_kernel(
    x_ptr,
    delta_ptr,
    w_ptr,
    out_ptr,
    ids_ptr,
    embed_ptr,
    n_valid_ptr,
    lengths_ptr,
    n_rows,
    n_cols,
    seq_len,
    eps,
    HAS_DELTA: tl.constexpr,
    PARTS: tl.constexpr,
    EMBED: tl.constexpr,
    LAST_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row per program: x (+= delta) then rms_norm(x) * w. EMBED: x is first gathered
    from the embedding (row ids_ptr[row]) and stored. LAST_ROWS: program b takes the last
    valid row of batch row b (b * seq_len + n_valid[b] - 1) into out[b], leaves x as it was
    (the step's last norm: nothing reads the residual after it), and ends the step by adding
    n_valid[b] to lengths[b]."""
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    _start_dependents(PDL)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: read while the previous runs
    _wait_for_previous(PDL)
    if LAST_ROWS:
        n_valid = tl.load(n_valid_ptr + pid)
        row = pid.to(tl.int64) * seq_len + n_valid - 1
        tl.store(lengths_ptr + pid, tl.load(lengths_ptr + pid) + n_valid)
    if EMBED:
        token = tl.load(ids_ptr + row).to(tl.int64)
        x = tl.load(embed_ptr + token * n_cols + cols, mask=mask, other=0.0)
        tl.store(x_ptr + row * n_cols + cols, x, mask=mask)
    else:
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # x += delta, rounded to the model dtype as transformers' residual add is
        d = _sum_parts(
            delta_ptr, row * n_cols + cols, mask, n_rows * n_cols, PARTS, x_ptr.dtype.element_ty
        )
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if not LAST_ROWS:
            tl.store(x_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    h = (xf * inv).to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + pid.to(tl.int64) * n_cols + cols, (w.to(tl.float32) * h.to(tl.float32)),
             mask=mask)


def _rms_norm_launch(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    pdl: bool,
    *,
    ids: torch.Tensor | None = None,
    embed: torch.Tensor | None = None,
    n_valid: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    seq_len: int = 1,
) -> None:
    rows, n_cols = x.shape
    _add_rms_norm_kernel[(out.shape[0],)](
        x,
        x if delta is None else delta,
        weight,
        out,
        x if ids is None else ids,
        x if embed is None else embed,
        x if n_valid is None else n_valid,
        x if lengths is None else lengths,
        rows,
        n_cols,
        seq_len,
        eps,
        HAS_DELTA=delta is not None,
        PARTS=1 if delta is None else delta.shape[0],
        EMBED=ids is not None,
        LAST_ROWS=n_valid is not None,
        BLOCK=triton.next_power_of_2(n_cols),
        PDL=pdl,
        num_warps=8 if n_cols >= 2048 else 4,
        **_launch(pdl),
    )


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """x += delta (in place, when given; delta is [parts, rows, hidden], summed first);
    returns rms_norm(x) * weight. x is [rows, hidden]."""
    out = torch.empty_like(x)
    _rms_norm_launch(x, delta, weight, out, eps, pdl)
    return out


def embed_rms_norm(
    ids: torch.Tensor, embed: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's start in one kernel: x = embed[ids] (ids [rows]) and rms_norm(x) * weight."""
    x = torch.empty((ids.shape[0], embed.shape[1]), dtype=embed.dtype, device=embed.device)
    out = torch.empty_like(x)
    _rms_norm_launch(x, None, weight, out, eps, pdl, ids=ids, embed=embed)
    return x, out


def last_rows_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    n_valid: torch.Tensor,
    seq_len: int,
    lengths: torch.Tensor,
    pdl: bool = False,
) -> torch.Tensor:
    """A step's end in one kernel: for each batch row b of x [B * seq_len, hidden], its last
    valid token's rms_norm(x + delta) * weight as out [B, hidden] (all the LM head reads),
    and lengths[b] += n_valid[b]. x is left as it was."""
    out = torch.empty((n_valid.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    _rms_norm_launch(
        x, delta, weight, out, eps, pdl, n_valid=n_valid, lengths=lengths, seq_len=seq_len
    )
    return out


# --- q/k norm, rope, KV write ----------------------------------------------------------------
@triton.jit(do_not_specialize=["S", "n_tokens", "capacity", "n_positions"])
def _qk_norm_rope_store_kernel(
    qkv_ptr,
    norm_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    start_ptr,
    n_prefix_ptr,
    n_positions,
    eps,
    S,
    n_tokens,
    capacity,
    cache_b,
    cache_h,
    cache_n,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HAS_NORM: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    _start_dependents(PDL)
    t = tl.program_id(0).to(tl.int64)  # token row: batch row b = t // S, position s = t % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    half = tl.arange(0, D // 2)
    n_all: tl.constexpr = HQ + 2 * HKV
    in_range = heads < n_all
    is_qk = heads < HQ + HKV
    dtype = q_ptr.dtype.element_ty
    # Read while the previous kernel runs: the norm weights, and the rope rows of the token's
    # absolute position (after the prefix), which pick its row of the tables (padding past the
    # model's positions reads the last row; it is masked out of every attention). The lengths
    # and the prefix's length are safe to read before the wait: no kernel of a step writes
    # them before its last one, which advances the lengths.
    if HAS_NORM:
        w_rows = tl.where(is_qk, heads, 0)[:, None] * D + half[None, :]
        w1 = tl.load(norm_ptr + w_rows, mask=is_qk[:, None], other=1.0).to(tl.float32)
        w2 = tl.load(norm_ptr + w_rows + D // 2, mask=is_qk[:, None], other=1.0).to(tl.float32)
    b = t // S
    pos = tl.load(start_ptr + b) + t % S  # in the row's suffix buffer
    row = tl.minimum(pos + tl.load(n_prefix_ptr), n_positions - 1) * D
    c1 = tl.load(cos_ptr + row + half).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + row + D // 2 + half).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + row + half).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + row + D // 2 + half).to(tl.float32)[None, :]
    _wait_for_previous(PDL)
    offsets = t * (n_all * D) + heads[:, None] * D + half[None, :]
    part_stride = n_tokens * n_all * D
    x1 = _sum_parts(qkv_ptr, offsets, in_range[:, None], part_stride, PARTS, dtype)
    x2 = _sum_parts(qkv_ptr, offsets + D // 2, in_range[:, None], part_stride, PARTS, dtype)
    if HAS_NORM:  # per-head RMSNorm with its own weight, rounded like transformers' RMSNorm
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        var = (tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / D
        inv = tl.rsqrt(var + eps)
        n1 = (w1 * (f1 * inv[:, None]).to(dtype).to(tl.float32)).to(dtype)
        n2 = (w2 * (f2 * inv[:, None]).to(dtype).to(tl.float32)).to(dtype)
        x1 = tl.where(is_qk[:, None], n1, x1)
        x2 = tl.where(is_qk[:, None], n2, x2)
    # rope: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]; each product rounded.
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = ((f1 * c1).to(dtype).to(tl.float32) + (-f2 * s1).to(dtype).to(tl.float32)).to(dtype)
    r2 = ((f2 * c2).to(dtype).to(tl.float32) + (f1 * s2).to(dtype).to(tl.float32)).to(dtype)
    r1 = tl.where(is_qk[:, None], r1, x1)
    r2 = tl.where(is_qk[:, None], r2, x2)

    is_q = heads < HQ
    q_off = t * (HQ * D) + heads[:, None] * D + half[None, :]
    tl.store(q_ptr + q_off, r1, mask=is_q[:, None])
    tl.store(q_ptr + q_off + D // 2, r2, mask=is_q[:, None])
    # k and v of this token go to its row's suffix buffer at start[b] + s (never past capacity:
    # only padding can reach there, and padding is masked out of every attention).
    kv_head = tl.where(is_qk, heads - HQ, heads - HQ - HKV)
    kv_off = b * cache_b + kv_head[:, None] * cache_h + pos * cache_n + half[None, :]
    store_k = (is_qk & (heads >= HQ) & (pos < capacity))[:, None]
    store_v = (in_range & ~is_qk & (pos < capacity))[:, None]
    tl.store(k_cache_ptr + kv_off, r1, mask=store_k)
    tl.store(k_cache_ptr + kv_off + D // 2, r2, mask=store_k)
    tl.store(v_cache_ptr + kv_off, r1, mask=store_v)
    tl.store(v_cache_ptr + kv_off + D // 2, r2, mask=store_v)


def qk_norm_rope_store(
    qkv: torch.Tensor,
    norm: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: torch.Tensor,
    n_prefix: torch.Tensor,
    seq_len: int,
    n_heads: int,
    n_kv_heads: int,
    eps: float,
    pdl: bool = False,
) -> torch.Tensor:
    """qkv [parts, B*S, (Hq + 2 Hkv) * D] (partial products, summed first) -> q [B*S, Hq * D]
    (normed, rotated); k and v are written to keys/values [B, Hkv, C, D] at each row's
    start + s. cos, sin: [positions, D], the tables of every position; token s of row b is at
    n_prefix + start[b] + s (n_prefix: a one-element device tensor, the prefix's length)."""
    parts, rows = qkv.shape[:2]
    d = keys.shape[-1]
    q = torch.empty((rows, n_heads * d), dtype=keys.dtype, device=qkv.device)
    block_h = 16
    _qk_norm_rope_store_kernel[(rows, triton.cdiv(n_heads + 2 * n_kv_heads, block_h))](
        qkv,
        qkv if norm is None else norm,
        cos,
        sin,
        q,
        keys,
        values,
        start,
        n_prefix,
        cos.shape[0],
        eps,
        seq_len,
        rows,
        keys.shape[2],
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        HQ=n_heads,
        HKV=n_kv_heads,
        D=d,
        HAS_NORM=norm is not None,
        PARTS=parts,
        BLOCK_H=block_h,
        PDL=pdl,
        num_warps=4,
        **_launch(pdl),
    )
    return q


# --- attention ------------------------------------------------------------------------------
# Query rows are laid out (token, group member): row r = t * G + g is query head kv_head * G + g
# of token t, so one kv head's rows are a strided view of q and K/V are never repeated.


@triton.jit
def _attend_block(
    q, k_ptrs, v_ptrs, load_ok, visible, acc, m_i, l_i, qk_scale,
    D: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """One key block of online-softmax attention (flash attention's inner step) for both
    segments: keys K^T [D, BLOCK_N] at k_ptrs and values [BLOCK_N, D] at v_ptrs, loaded where
    load_ok; scores kept where visible. Without MASKED (a whole key block every query sees)
    neither mask is applied: on a GPU the prefix loop is bound by issued instructions, and the
    masks' compares and selects were a share of them. Either way a visible score gives the same
    bits: scores are scaled inside one fused multiply-add with the running maximum. Returns the
    updated (acc, running max in base 2, running sum)."""
    if MASKED:
        k = tl.load(k_ptrs, mask=load_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, k, input_precision=PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    # The maximum of the scaled scores (scaling by a positive number commutes with max).
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet
    else:
        m_new_safe = m_new
    p = tl.math.exp2(tl.fma(s, qk_scale, -m_new_safe[:, None]))
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=load_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _store_partial(out_ptr, lse_ptr, idx, acc, m_i, l_i, row_ok, D: tl.constexpr):
    """A segment's normalised output and log-sum-exp (base 2, scaled) for the merge."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    dd = tl.arange(0, D)
    tl.store(out_ptr + idx[:, None] * D + dd[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(lse_ptr + idx, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _prefix_part(
    q_ptr, anchor_ptr, table_ptr, n_prefix_ptr, out_ptr, lse_ptr, pid_m, kv_head, split, n_kv,
    n_splits, R, layer, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLIT_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, PDL: tl.constexpr, RUNTIME_LOOP: tl.constexpr,
):
    """Query rows against one split of the prefix. The prefix is read through its table
    (addresses, strides and length as device data, see model.PrefixTable), so a captured graph
    serves any prefix of its class.

    The splits share the prefix's actual length evenly (in whole key blocks), not its class's
    capacity: every split has work, and the longest loop is as short as the split count allows
    (3774 tokens in 10 splits: 6 key blocks each, where splits of the 4096-token class would
    give 8). SPLIT_LEN, the class's split length, bounds it. With RUNTIME_LOOP (compiled
    kernels) the loop runs to the split's end; Triton's interpreter (CPU tests) cannot loop to
    a loaded value, so there the loop runs to SPLIT_LEN under a mask."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    dd = tl.arange(0, D)
    t = (rows // G).to(tl.int64)

    # The prefix's K/V are reached from the anchor (a pointer argument, so known to be 16-byte
    # aligned) by element offsets read from the table. Values read from memory carry no
    # alignment facts, and without them every K/V load would go element by element: the
    # hints (checked by PrefixTable.bind) give back 16-byte vector loads.
    entry = table_ptr + layer * 6
    k_base = anchor_ptr + tl.multiple_of(tl.load(entry), 8)
    v_base = anchor_ptr + tl.multiple_of(tl.load(entry + 1), 8)
    k_base += kv_head * tl.multiple_of(tl.load(entry + 2), 8)
    v_base += kv_head * tl.multiple_of(tl.load(entry + 4), 8)
    k_n = tl.multiple_of(tl.load(entry + 3), 8)
    v_n = tl.multiple_of(tl.load(entry + 5), 8)
    n_prefix = tl.load(n_prefix_ptr)
    split_len = tl.cdiv(tl.cdiv(n_prefix, n_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_prefix)
    _wait_for_previous(PDL)
    q_off = t * (HQ * D) + (kv_head * G + rows % G) * D
    q = tl.load(q_ptr + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Key block pointers advance by a constant (recomputing them from each block's columns
    # was 64-bit arithmetic for every vector load); whole blocks go unmasked, a partial last
    # block masked.
    cols = lo + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + cols[None, :].to(tl.int64) * k_n + dd[:, None]
    v_ptrs = v_base + cols[:, None].to(tl.int64) * v_n + dd[None, :]
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    if RUNTIME_LOOP:
        for _ in range(lo, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                q, k_ptrs, v_ptrs, cols, cols, acc, m_i, l_i, qk_scale, D, PRECISION, False
            )
            k_ptrs += BLOCK_N * k_n
            v_ptrs += BLOCK_N * v_n
        if full_end < hi:
            col_ok = full_end + tl.arange(0, BLOCK_N) < hi
            acc, m_i, l_i = _attend_block(
                q, k_ptrs, v_ptrs, col_ok, col_ok[None, :], acc, m_i, l_i, qk_scale, D,
                PRECISION, True,
            )
    elif (lo < hi) | (not SKIP_EMPTY):  # splits past the prefix's end skip their loop
        for offset in range(0, SPLIT_LEN, BLOCK_N):
            if lo + offset < full_end:
                acc, m_i, l_i = _attend_block(
                    q, k_ptrs, v_ptrs, cols, cols, acc, m_i, l_i, qk_scale, D, PRECISION, False
                )
            else:
                col_ok = lo + offset + tl.arange(0, BLOCK_N) < hi
                acc, m_i, l_i = _attend_block(
                    q, k_ptrs, v_ptrs, col_ok, col_ok[None, :], acc, m_i, l_i, qk_scale, D,
                    PRECISION, True,
                )
            k_ptrs += BLOCK_N * k_n
            v_ptrs += BLOCK_N * v_n
    part = (split * n_kv + kv_head).to(tl.int64) * R + rows
    _store_partial(out_ptr, lse_ptr, part, acc, m_i, l_i, row_ok, D)


@triton.jit
def _suffix_part(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, start_ptr, n_valid_ptr, pid_m, kv_head, b, n_kv,
    part, R, S, capacity, cache_b, cache_h, cache_n, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, CAPACITY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    RUNTIME_LOOP: tl.constexpr,
):
    """Each batch row's queries against its own suffix buffer: key j is visible to the query
    at position p when j <= p and j < start + n_valid (padding after a row stays invisible).
    With RUNTIME_LOOP the key loop runs to the last visible key; the interpreter runs it to
    CAPACITY (the buffer's capacity as a compile-time bound) with a runtime skip."""
    _wait_for_previous(PDL)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (s, g) within the row
    row_ok = local < S * G
    s_pos = local // G
    t = (b * S + s_pos).to(tl.int64)
    dd = tl.arange(0, D)
    q_off = t * (HQ * D) + (kv_head * G + local % G) * D
    q = tl.load(q_ptr + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)
    start = tl.load(start_ptr + b)
    end = start + tl.load(n_valid_ptr + b)
    q_pos = start + s_pos
    last = tl.minimum((pid_m + 1) * BLOCK_M, S * G) - 1  # the block's last row: keys up to it
    hi = tl.minimum(tl.minimum(end, start + last // G + 1), capacity)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    base = b.to(tl.int64) * cache_b + kv_head.to(tl.int64) * cache_h
    first_cols = tl.arange(0, BLOCK_N)
    k_ptrs = k_ptr + base + first_cols[None, :] * cache_n + dd[:, None]
    v_ptrs = v_ptr + base + first_cols[:, None] * cache_n + dd[None, :]
    if RUNTIME_LOOP:
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            visible = (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < end)
            acc, m_i, l_i = _attend_block(
                q, k_ptrs, v_ptrs, cols < hi, visible, acc, m_i, l_i, qk_scale, D, PRECISION,
                True,
            )
            k_ptrs += BLOCK_N * cache_n
            v_ptrs += BLOCK_N * cache_n
    else:  # a static bound with a runtime skip: the interpreter cannot loop to loaded values
        for start_n in range(0, CAPACITY, BLOCK_N):
            if start_n < hi:
                cols = start_n + tl.arange(0, BLOCK_N)
                visible = (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < end)
                acc, m_i, l_i = _attend_block(
                    q, k_ptrs, v_ptrs, cols < hi, visible, acc, m_i, l_i, qk_scale, D,
                    PRECISION, True,
                )
            k_ptrs += BLOCK_N * cache_n
            v_ptrs += BLOCK_N * cache_n
    rows = b * S * G + local
    idx = (part * n_kv + kv_head).to(tl.int64) * R + rows
    _store_partial(out_ptr, lse_ptr, idx, acc, m_i, l_i, row_ok, D)


@triton.jit(do_not_specialize=["n_splits", "R", "S", "layer", "capacity"])
def _attention_parts_kernel(
    q_ptr,
    anchor_ptr,
    table_ptr,
    n_prefix_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    start_ptr,
    n_valid_ptr,
    n_splits,
    R,
    S,
    layer,
    capacity,
    cache_b,
    cache_h,
    cache_n,
    qk_scale,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    SPLIT_LEN: tl.constexpr,
    PREFIX_BLOCK_M: tl.constexpr,
    PREFIX_BLOCK_N: tl.constexpr,
    CAPACITY: tl.constexpr,
    SUFFIX_BLOCK_M: tl.constexpr,
    SUFFIX_BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
    PDL: tl.constexpr,
    RUNTIME_LOOP: tl.constexpr,
):
    """Both segments' partial attention in one launch: programs along axis 2 below n_splits
    take a split of the prefix, the others one batch row's suffix (its part comes last). One
    launch, so the suffix no longer waits for the prefix (or the prefix for the suffix)."""
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    z = tl.program_id(2)
    n_kv = tl.num_programs(1)
    _start_dependents(PDL)
    if z < n_splits:
        if pid_m * PREFIX_BLOCK_M < R:
            _prefix_part(
                q_ptr, anchor_ptr, table_ptr, n_prefix_ptr, out_ptr, lse_ptr, pid_m, kv_head, z,
                n_kv, n_splits, R, layer, qk_scale, HQ, G, D, SPLIT_LEN, PREFIX_BLOCK_M,
                PREFIX_BLOCK_N, PRECISION, SKIP_EMPTY, PDL, RUNTIME_LOOP,
            )
    else:
        if pid_m * SUFFIX_BLOCK_M < S * G:
            _suffix_part(
                q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, start_ptr, n_valid_ptr, pid_m, kv_head,
                z - n_splits, n_kv, n_splits, R, S, capacity, cache_b, cache_h, cache_n,
                qk_scale, HQ, G, D, CAPACITY, SUFFIX_BLOCK_M, SUFFIX_BLOCK_N, PRECISION, PDL,
                RUNTIME_LOOP,
            )


MAX_PARTS = 33  # prefix splits (at most 32) + the suffix: the most the unrolled merge loads


@triton.jit(do_not_specialize=["R"])
def _merge_kernel(
    parts_ptr,
    lse_ptr,
    out_ptr,
    R,
    N_PARTS: tl.constexpr,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PDL: tl.constexpr,
):
    """out = sum_p 2^(lse_p - m) * out_p / sum_p 2^(lse_p - m), written as [tokens, Hq * D].

    One pass with a running maximum (as flash attention does over key blocks). The loop over
    the parts is unrolled (their number is fixed by the launch shape, as the splits are), so
    every part's loads are issued at once: one memory round trip instead of one per part."""
    _start_dependents(PDL)
    _wait_for_previous(PDL)
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    n_kv = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    dd = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for p in tl.static_range(N_PARTS):
        idx = (p * n_kv + kv_head).to(tl.int64) * R + rows
        lse = tl.load(lse_ptr + idx, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # only empty parts so far
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        o = tl.load(
            parts_ptr + idx[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0
        ).to(tl.float32)
        acc = acc * alpha[:, None] + w[:, None] * o
        total = total * alpha + w
        m = m_new
    t = (rows // G).to(tl.int64)
    o_off = t * (HQ * D) + (kv_head * G + rows % G) * D
    tl.store(out_ptr + o_off[:, None] + dd[None, :], acc / total[:, None], mask=row_ok[:, None])


def prefix_splits(
    n_prefix: int,
    rows: int,
    n_kv_heads: int,
    n_sms: int,
    *,
    waves: float = 2.0,
    block_m: int | None = None,
) -> tuple[int, int]:
    """(number of splits, keys per split at most) of a prefix of n_prefix tokens (a length
    class's capacity) so the prefix attention puts about two blocks on every SM (at most 32
    splits). A block is latency-bound (few blocks fit on an SM, limited by registers and shared
    memory), so its time follows its number of key blocks; the kernel
    divides the actual prefix among the splits, so that number is the smallest the split
    count allows.

    Keys per split, a multiple of 64, is a compile-time constant of the kernel (the bound of
    the interpreter's loop): every length class has one.
    """
    if n_prefix == 0:
        return 0, 0
    blocks = triton.cdiv(rows, block_m or _block_m(rows, n_kv_heads)) * n_kv_heads
    want = min(32, max(1, triton.cdiv(int(waves * n_sms), blocks)))
    split_len = max(64, triton.cdiv(triton.cdiv(n_prefix, want), 64) * 64)
    return triton.cdiv(n_prefix, split_len), split_len


def _block_m(rows: int, n_kv_heads: int) -> int:
    """Query rows per block of the prefix attention: few for decode steps, 128 for batches."""
    if rows * n_kv_heads >= 128 * 512:
        return 128
    return min(64, max(16, triton.next_power_of_2(rows)))


def attention(
    q: torch.Tensor,
    prefix: PrefixTable | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    layer: int,
    start: torch.Tensor,
    n_valid: torch.Tensor,
    seq_len: int,
    n_heads: int,
    scale: float,
    n_sms: int,
    wait: torch.cuda.Event | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    warps: int | None = None,
    stages: int = 3,
    waves: float = 2.0,
    skip_empty: bool = True,
    pdl: bool = False,
    runtime_loop: bool | None = None,
    part_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention of q [B*S, Hq*D] over the shared prefix (layer `layer` of the table's K/V,
    [Hkv, N, D] each) then each row's own suffix buffer (keys/values [B, Hkv, C, D]); returns
    [B*S, Hq*D] in q's dtype. The number of prefix splits follows its table's capacity (its
    length class), so the launch is the same for every prefix of the class; the kernel shares
    the actual length among them. block_m ... skip_empty: the prefix part's configuration.
    pdl: programmatic dependent launch. runtime_loop:
    loop to each split's end (default on CUDA; see _prefix_part). Both segments' parts come
    from one launch, then one kernel merges them. part_dtype: of the parts' outputs."""
    tokens = q.shape[0]
    batch, n_kv, _, d = keys.shape
    assert keys.stride(-1) == 1
    group = n_heads // n_kv
    rows = tokens * group
    n_prefix = 0 if prefix is None else prefix.capacity
    block_m = block_m or _block_m(rows, n_kv)
    n_splits, split_len = prefix_splits(n_prefix, rows, n_kv, n_sms, waves=waves, block_m=block_m)
    # Parts in float32 by default: bf16 parts (as vLLM's split-KV decode keeps them) halve the
    # merge's reads, yet made the attention with its merge slower.
    parts = torch.empty((n_splits + 1, n_kv, rows, d), dtype=part_dtype, device=q.device)
    lse = torch.empty((n_splits + 1, n_kv, rows), dtype=torch.float32, device=q.device)
    qk_scale = scale * LOG2E
    precision = _precision(q.dtype)
    warps = warps or (8 if block_m == 128 else 4)
    parts_pdl = pdl
    if n_splits and wait is not None:  # the prefix is still being copied in, layer by layer
        torch.cuda.current_stream().wait_event(wait)
        # The launch must wait for the copy: with PDL it would start once the previous kernel
        # signals, and its griddepcontrol.wait covers that kernel, not the copy. The kernel is
        # still compiled with its griddepcontrol instructions (PDL=pdl; without the launch
        # attribute they return at once), so hot and layer-waiting steps share one compiled
        # variant: a worker's warm-up compiles each once.
        parts_pdl = False
    suffix_block_m, suffix_block_n = 64, 32
    m_blocks = max(triton.cdiv(rows, block_m) if n_splits else 0,
                   triton.cdiv(seq_len * group, suffix_block_m))
    runtime_loop = q.is_cuda if runtime_loop is None else runtime_loop
    # Compiled kernels loop to runtime bounds: the split and suffix capacity are arguments, not
    # compile-time constants, so one compiled variant serves every length class and suffix
    # capacity (with them as constants, a worker's warm-up compiled 150 variants of this kernel,
    # most of its start-up time). The interpreter's static loops need them.
    split_len_bound = block_n if runtime_loop else max(split_len, block_n)
    capacity_bound = suffix_block_n if runtime_loop else keys.shape[2]
    _attention_parts_kernel[(m_blocks, n_kv, n_splits + batch)](
        q,
        prefix.anchor if n_splits else q,
        prefix.entries if n_splits else start,
        prefix.n_tokens if n_splits else start,
        keys,
        values,
        parts,
        lse,
        start,
        n_valid,
        n_splits,
        rows,
        seq_len,
        layer,
        keys.shape[2],
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        qk_scale,
        HQ=n_heads,
        G=group,
        D=d,
        SPLIT_LEN=split_len_bound,  # without a prefix: never run, but compiled
        PREFIX_BLOCK_M=block_m,
        PREFIX_BLOCK_N=block_n,
        CAPACITY=capacity_bound,
        SUFFIX_BLOCK_M=suffix_block_m,
        SUFFIX_BLOCK_N=suffix_block_n,
        PRECISION=precision,
        SKIP_EMPTY=skip_empty,
        PDL=pdl,
        RUNTIME_LOOP=runtime_loop,
        num_warps=warps,
        num_stages=stages,
        **_launch(parts_pdl),
    )
    out = torch.empty_like(q)
    _merge_kernel[(triton.cdiv(rows, 16), n_kv)](
        parts,
        lse,
        out,
        rows,
        N_PARTS=n_splits + 1,
        HQ=n_heads,
        G=group,
        D=d,
        BLOCK_M=16,
        PDL=pdl,
        **_launch(pdl),
    )
    return out


# --- greedy tokens ---------------------------------------------------------------------------
# A request's first token (and every greedy decode token) is the argmax of one row of logits.
# torch.argmax reduces a 151936-wide row in one block after the step's graph,
# and .item() then copies from device to pageable memory. These two kernels run inside the graph
# instead: chunks of the row in parallel, then one program a row over the chunks' maxima, which
# writes the token straight into pinned host memory.
GREEDY_CHUNK = 4096


@triton.jit(do_not_specialize=["V", "n_chunks"])
def _chunk_max_kernel(logits_ptr, values_ptr, index_ptr, V, n_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * V + cols, mask=cols < V, other=float("-inf"))
    # The first of equal maxima, as torch.argmax picks (columns past V are -inf and last).
    best, at = tl.max(x.to(tl.float32), axis=0, return_indices=True,
                      return_indices_tie_break_left=True)
    tl.store(values_ptr + row * n_chunks + chunk, best)
    tl.store(index_ptr + row * n_chunks + chunk, chunk * BLOCK + at)


@triton.jit(do_not_specialize=["n_chunks"])
def _argmax_of_chunks_kernel(values_ptr, index_ptr, out_ptr, n_chunks, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS)
    best = tl.load(values_ptr + row * n_chunks + c, mask=c < n_chunks, other=float("-inf"))
    _, first = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(index_ptr + row * n_chunks + first).to(tl.int64))


def greedy_tokens(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The argmax of each row of logits [B, V] (the first column among equal maxima, as
    torch.argmax), as int64 [B]. Rows holding NaN are not defined (torch picks the NaN).
    out: where to write them, e.g. pinned host memory, which the kernel writes directly (a copy
    node after it would sit on the step's critical path)."""
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1
    n_chunks = triton.cdiv(vocab, GREEDY_CHUNK)
    values = torch.empty((batch, n_chunks), dtype=torch.float32, device=logits.device)
    index = torch.empty((batch, n_chunks), dtype=torch.int32, device=logits.device)
    if out is None:
        out = torch.empty(batch, dtype=torch.long, device=logits.device)
    assert out.shape == (batch,) and out.dtype == torch.long
    _chunk_max_kernel[(batch, n_chunks)](
        logits, values, index, vocab, n_chunks, BLOCK=GREEDY_CHUNK, num_warps=4
    )
    _argmax_of_chunks_kernel[(batch,)](
        values, index, out, n_chunks, CHUNKS=max(16, triton.next_power_of_2(n_chunks)),
        num_warps=1,
    )
    return out


# --- MLP activation -------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_kernel(
    x_ptr, out_ptr, n_rows, inter, group, PARTS: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    _start_dependents(PDL)
    _wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    stride = n_rows * 2 * inter
    gate_col = (cols // group) * 2 * group + cols % group  # its up column is group further
    gate = _sum_parts(x_ptr, t * 2 * inter + gate_col, mask, stride, PARTS, dtype)
    up = _sum_parts(x_ptr, t * 2 * inter + gate_col + group, mask, stride, PARTS, dtype)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)  # silu, rounded as F.silu rounds
    tl.store(out_ptr + t * inter + cols, act.to(tl.float32) * up.to(tl.float32), mask=mask)


def silu_mul(
    gate_up: torch.Tensor, dtype: torch.dtype, *, group: int | None = None, pdl: bool = False
) -> torch.Tensor:
    """[parts, rows, 2I] (partial products, summed first) -> silu(gate) * up, [rows, I] in
    dtype. Columns alternate between `group` gate columns and their `group` up columns
    (interleave_gate_up); the default, I, is all gate columns then all up columns."""
    parts, rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, out, rows, inter, group or inter, PARTS=parts, BLOCK=block, PDL=pdl,
        **_launch(pdl),
    )
    return out


# Gate and up rows of a kernels decoder's MLP weight alternate in groups of this many, so that
# one 64-column tile of the product holds both halves of 32 outputs (matmul(silu_group=...)).
SILU_GROUP = 32


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor, group: int) -> torch.Tensor:
    """[I, H] gate and up weights -> [2I, H]: `group` gate rows, then the same outputs' up
    rows, and so on (I must be a multiple of group)."""
    inter, hidden = gate.shape
    if inter % group:
        raise ValueError(f"{inter} gate rows do not split into groups of {group}")
    pairs = torch.stack([gate.view(-1, group, hidden), up.view(-1, group, hidden)], dim=1)
    return pairs.reshape(2 * inter, hidden)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the CPU interpreter: a few splits, so the split logic is exercised


