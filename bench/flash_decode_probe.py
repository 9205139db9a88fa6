"""Probe: the prefix attention as a Hopper flash-decoding kernel in Gluon, against the Triton one.

Why: the prefix attention and its merge take 0.57 ms of the H200's 3.40 ms first step
(profile_fastpath --ablate) where its reads need about 0.1 ms. The Triton kernel puts 64 query
rows in a block, so each K/V tile crosses L2 three times for the 192 rows of a KV head (4 query
heads x 48 tokens), and Triton cannot make a 192-row tile (shapes are powers of two; 256-row
blocks measured slower, profile_fastpath --attention). Here one CTA takes a KV head and a split
of the prefix with all 192 rows, FA3-style: a producer warp streams K and V tiles through a TMA
ring that three consumer warpgroups (64 rows each, their own online softmax) share; a slot is
freed when all three have used it. Each writes its rows' partial output and log-sum-exp (base
2) where kernels._merge_kernel reads them, so the merge is the production one.

Each K/V tile crosses L2 once. Written and compile-checked for sm_90a without a GPU (Triton 3.6,
ptxas: 128 registers, no spills; 115/148/180 KB of shared memory at 2/3/4 stages), not yet run:
it first checks its parts against float32 torch. Run it under `timeout`: a wrong barrier
phase hangs.

python bench/flash_decode_probe.py          # H100/H200: JSON lines, us per layer of 36
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stream_k_probe import _us_per_call  # noqa: E402

CONSUMERS = gl.constexpr(3)  # warpgroups of 64 query rows: a KV head's 4 query heads x 48 tokens


@gluon.jit
def _barriers(n: gl.constexpr, count: gl.constexpr):
    """n mbarriers, each completed by `count` arrivals (or one arrival plus a TMA's bytes)."""
    bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(n):
        mbarrier.init(bars.index(i), count=count)
    return bars


@gluon.jit
def _kv_loads(k_desc, v_desc, k_bufs, v_bufs, ready, empty, row0, n_blocks,
              STAGES: gl.constexpr):
    """Producer warp: K and V tiles of the split into the ring, as soon as a slot is free."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    for i in range(n_blocks):
        slot = i % STAGES
        # A fresh barrier passes a wait on parity 1: the first pass over the ring needs no free.
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + i * BLOCK_N, 0], bar, k_bufs.index(slot))
        tma.async_copy_global_to_shared(v_desc, [row0 + i * BLOCK_N, 0], bar, v_bufs.index(slot))


@gluon.jit
def _attend(q_ptr, q_smem, k_bufs, v_bufs, ready, empty, out_ptr, lse_ptr, kv_head, n_kv, part,
            lo, hi, n_blocks, R, qk_scale, WHICH: gl.constexpr, HQ: gl.constexpr,
            G: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Consumer warpgroup WHICH: query rows [64 * WHICH, 64 * WHICH + 64) of the KV head against
    the split's keys [lo, hi), online softmax; writes the rows' partial output and lse."""
    BLOCK_N: gl.constexpr = k_bufs.type.shape[1]
    D: gl.constexpr = k_bufs.type.shape[2]
    BLOCK_M: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

    # This warpgroup's query rows (row r = token * G + member), loaded once into shared memory.
    rows = WHICH * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, load_layout))
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, load_layout))
    q_off = (rows // G).to(gl.int64) * (HQ * D) + (kv_head * G + rows % G) * D
    q = gl.load(q_ptr + q_off[:, None] + dd[None, :], mask=(rows < R)[:, None], other=0.0)
    q_smem.store(q)
    fence_async_shared()

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for i in range(n_blocks):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        # Keys past the split (the next head's, or zeros past the tensor) stay invisible.
        s = gl.where((lo + i * BLOCK_N + cols < hi)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(gl.fma(s, qk_scale, -m_new[:, None]))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p_op, v_bufs.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(slot))
        m_i = m_new

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    o_rows = WHICH * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    idx = (part * n_kv + kv_head).to(gl.int64) * R + o_rows
    gl.store(out_ptr + idx[:, None] * D + o_cols[None, :], out, mask=(o_rows < R)[:, None])
    s_rows = WHICH * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse_idx = (part * n_kv + kv_head).to(gl.int64) * R + s_rows
    gl.store(lse_ptr + lse_idx, m_i + gl.log2(l_safe), mask=s_rows < R)


@gluon.jit
def _flash_decode_kernel(q_ptr, k_desc, v_desc, out_ptr, lse_ptr, n_prefix, split_len, R,
                         qk_scale, HQ: gl.constexpr, G: gl.constexpr, STAGES: gl.constexpr,
                         num_warps: gl.constexpr):
    """Grid (KV heads, splits). Prefix parts only (the suffix part is left out of the probe)."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    kv_head = gl.program_id(0)
    split = gl.program_id(1)
    lo = split * split_len
    hi = gl.minimum(lo + split_len, n_prefix)
    n_blocks = gl.cdiv(hi - lo, BLOCK_N)
    row0 = kv_head * n_prefix + lo  # K/V viewed as [KV heads * tokens, D]

    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, D], gl.bfloat16)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, 64, D], q_layout)
    ready = _barriers(STAGES, 1)
    empty = _barriers(STAGES, CONSUMERS)
    n_kv = gl.num_programs(0)
    gl.warp_specialize(
        [
            (_attend, (q_ptr, q_smem.index(0), k_bufs, v_bufs, ready, empty, out_ptr, lse_ptr,
                       kv_head, n_kv, split, lo, hi, n_blocks, R, qk_scale, 0, HQ, G, STAGES,
                       4)),
            (_attend, (q_ptr, q_smem.index(1), k_bufs, v_bufs, ready, empty, out_ptr, lse_ptr,
                       kv_head, n_kv, split, lo, hi, n_blocks, R, qk_scale, 1, HQ, G, STAGES,
                       4)),
            (_attend, (q_ptr, q_smem.index(2), k_bufs, v_bufs, ready, empty, out_ptr, lse_ptr,
                       kv_head, n_kv, split, lo, hi, n_blocks, R, qk_scale, 2, HQ, G, STAGES,
                       4)),
            (_kv_loads, (k_desc, v_desc, k_bufs, v_bufs, ready, empty, row0, n_blocks,
                         STAGES)),
        ],
        [4, 4, 1],
        [152, 152, 24],
    )


def flash_decode_parts(q, keys, values, n_splits: int, *, scale: float, stages: int = 4,
                       block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix parts of q [tokens, Hq * D] over keys/values [Hkv, N, D]: (out [splits, Hkv, R,
    D] float32, lse [splits, Hkv, R] base 2), as kernels.attention lays its parts out."""
    n_kv, n_prefix, d = keys.shape
    hq = q.shape[1] // d
    group = hq // n_kv
    rows = q.shape[0] * group
    assert rows <= 64 * CONSUMERS.value, "one CTA holds 192 query rows of a KV head"
    split_len = triton.cdiv(triton.cdiv(n_prefix, n_splits), block_n) * block_n
    n_splits = triton.cdiv(n_prefix, split_len)
    layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.bfloat16)
    k_desc = TensorDescriptor.from_tensor(keys.view(-1, d), [block_n, d], layout)
    v_desc = TensorDescriptor.from_tensor(values.view(-1, d), [block_n, d], layout)
    out = torch.empty((n_splits, n_kv, rows, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((n_splits, n_kv, rows), dtype=torch.float32, device=q.device)
    _flash_decode_kernel[(n_kv, n_splits)](
        q, k_desc, v_desc, out, lse, n_prefix, split_len, rows, scale * 1.4426950408889634,
        HQ=hq, G=group, STAGES=stages, num_warps=4,
    )
    return out, lse


def reference_parts(q, keys, values, n_splits: int, *, scale: float, block_n: int = 64):
    """The same parts in float32 torch."""
    n_kv, n_prefix, d = keys.shape
    hq = q.shape[1] // d
    group = hq // n_kv
    split_len = triton.cdiv(triton.cdiv(n_prefix, n_splits), block_n) * block_n
    # rows r = token * G + member for each KV head: [Hkv, R, D]
    qh = q.float().view(q.shape[0], n_kv, group, d).permute(1, 0, 2, 3).reshape(n_kv, -1, d)
    outs, lses = [], []
    for lo in range(0, n_prefix, split_len):
        k = keys[:, lo : lo + split_len].float()
        v = values[:, lo : lo + split_len].float()
        s = qh @ k.transpose(1, 2) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.softmax(s, dim=-1) @ v)
        lses.append(lse * 1.4426950408889634)
    return torch.stack(outs), torch.stack(lses)


def main() -> None:
    from inference.fastpath import kernels
    from inference.fastpath.model import PrefixKV, PrefixTable

    parser = argparse.ArgumentParser()
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--layers", type=int, default=36)
    args = parser.parse_args()
    torch.manual_seed(0)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    n_kv, hq, d = 8, 32, 128  # Qwen3-4B
    scale = d**-0.5
    layers = [(torch.randn(n_kv, args.n_tokens, d, device=cuda, dtype=bf16),
               torch.randn(n_kv, args.n_tokens, d, device=cuda, dtype=bf16))
              for _ in range(args.layers)]
    q = torch.randn(args.suffix, hq * d, device=cuda, dtype=bf16)
    n_sms = torch.cuda.get_device_properties(cuda).multi_processor_count

    # Correctness first, on one layer, against float32 torch.
    for n_splits in (8, 16):
        out, lse = flash_decode_parts(q, *layers[0], n_splits, scale=scale)
        torch.cuda.synchronize()
        ref_out, ref_lse = reference_parts(q, *layers[0], n_splits, scale=scale)
        print(json.dumps({"check": "parts vs float32 torch", "splits": n_splits,
                          "max_out_diff": (out - ref_out).abs().max().item(),
                          "max_lse_diff": (lse - ref_lse).abs().max().item()}), flush=True)

    # The production attention (prefix parts, suffix part, merge), 36 layers in one graph.
    table = PrefixTable.of(PrefixKV(layers), len(layers), cuda, bf16)
    cache = torch.zeros(1, n_kv, 64, d, device=cuda, dtype=bf16)
    start = torch.zeros(1, dtype=torch.long, device=cuda)
    n_valid = torch.full((1,), args.suffix, dtype=torch.long, device=cuda)

    def triton_attention():
        for i in range(len(layers)):
            kernels.attention(q, table, cache, cache, layer=i, start=start, n_valid=n_valid,
                              seq_len=args.suffix, n_heads=hq, scale=scale, n_sms=n_sms)

    print(json.dumps({"variant": "triton attention (prefix + suffix parts, merge)",
                      "us_per_layer": round(_us_per_call(triton_attention) / len(layers), 2)}),
          flush=True)
    rows = args.suffix * hq // n_kv
    for n_splits in (8, 11, 16):
        for stages in (2, 3, 4):
            def gluon_parts(n_splits=n_splits, stages=stages):
                for keys, values in layers:
                    flash_decode_parts(q, keys, values, n_splits, scale=scale, stages=stages)

            def gluon_with_merge(n_splits=n_splits, stages=stages):
                for keys, values in layers:
                    out, lse = flash_decode_parts(q, keys, values, n_splits, scale=scale,
                                                  stages=stages)
                    merged = torch.empty_like(q)
                    kernels._merge_kernel[(triton.cdiv(rows, 16), n_kv)](
                        out, lse, merged, rows, N_PARTS=out.shape[0], HQ=hq, G=hq // n_kv,
                        D=d, BLOCK_M=16, PDL=False)

            try:
                parts_us = _us_per_call(gluon_parts) / len(layers)
                merged_us = _us_per_call(gluon_with_merge) / len(layers)
            except Exception as exc:  # a config that does not fit
                print(json.dumps({"splits": n_splits, "stages": stages,
                                  "error": str(exc)[:200]}), flush=True)
                continue
            print(json.dumps({"variant": "gluon flash-decoding parts", "splits": n_splits,
                              "stages": stages, "us_per_layer": round(parts_us, 2),
                              "with_merge_us_per_layer": round(merged_us, 2)}), flush=True)


if __name__ == "__main__":
    main()
