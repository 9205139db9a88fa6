"""Profile one fast-path step on the GPU: where the time goes, and the GEMM-only floor.

python bench/profile_fastpath.py --model-config qwen3-4b --n-tokens 3774
ncu --kernel-name regex:_attention_parts --launch-skip 72 --launch-count 1 \
    python bench/profile_fastpath.py --eager-steps 3     # eager steps only: a target for ncu
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kv_reuse_fast import build_model, hf_prefill  # noqa: E402
from inference.fastpath.model import PRODUCT_KINDS, PrefixKV  # noqa: E402
from inference.fastpath.runner import FastReuse, recorded_events  # noqa: E402


def _ms_per_call(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def _captured(run) -> torch.cuda.CUDAGraph:
    """run() once (compiles, cuBLAS choices), then captured as a CUDA graph."""
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def _host_ms(fn, repeat: int = 20) -> float:
    """Host time of one call, the GPU idle before it (so no queue pushes back on the host)."""
    total = 0.0
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    torch.cuda.synchronize()
    return total / repeat * 1e3


def gemm_floor_ms(fast: FastReuse, tokens: int) -> float:
    """The step's matrix products alone (all layers and the LM head), replayed as one graph."""
    dec = fast.decoder
    h = torch.randn(tokens, dec.hidden, device="cuda", dtype=dec.dtype)
    attn = torch.randn(tokens, dec.n_heads * dec.head_dim, device="cuda", dtype=dec.dtype)
    act = torch.randn(tokens, dec.intermediate, device="cuda", dtype=dec.dtype)

    def products():
        for w in dec.layers:
            F.linear(h, w.qkv)
            F.linear(attn, w.o_proj)
            F.linear(h, w.gate_up)
            F.linear(act, w.down)
        F.linear(h[-1:], dec.lm_head)

    return _ms_per_call(_captured(products).replay)


def matmul_table(fast: FastReuse, rows: int) -> list[dict]:
    """Each weight kind's product for all layers, one graph each: cuBLAS vs split-K configs."""
    from inference.fastpath import kernels

    dec = fast.decoder
    kinds = {
        "qkv": (dec.hidden, [w.qkv for w in dec.layers]),
        "o_proj": (dec.n_heads * dec.head_dim, [w.o_proj for w in dec.layers]),
        "gate_up": (dec.hidden, [w.gate_up for w in dec.layers]),
        "down": (dec.intermediate, [w.down for w in dec.layers]),
    }
    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _ms_per_call(functools.partial(dst.copy_, src), repeat=10)
    table = [{"kind": "copy", "variant": "2 GiB device copy",
              "gb_per_s": round(2 * src.numel() / copy_ms / 1e6, 1)}]
    del src, dst  # the products' timings must not share the card with 4 GiB of copies
    for kind, (k, weights) in kinds.items():
        x = torch.randn(rows, k, device="cuda", dtype=dec.dtype)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        variants = {"cublas": lambda w, x=x: F.linear(x, w),
                    "split_k default": lambda w, x=x: kernels.matmul(x, w, dec.n_sms)}
        # Wider column tiles re-read the activations from L2 less often (48 rows of x per
        # 64 weight rows at n64), yet measured slower for every kind on an H200; stages are
        # capped by shared memory inside matmul().
        # Triton's warp specialization (a producer warp issuing the copies) measured slower
        # for every kind on an H200 (gate_up 36.2 us a layer against 30.9), so it is not swept.
        # Few stages let two blocks share an SM (two pipelines in flight, their waits and
        # barriers overlapped) where one block of six stages fills its shared memory.
        # H200: gate_up 29.1 us a layer at k64 s4 (three blocks an SM: all 304 resident at
        # once) against 30.9-31.7 at k128 s6 (one block an SM: 2.3 waves), yet in the whole
        # step (PDL, L2 prefetch) it measured no faster (graph 3.43 ms either way): not kept.
        configs = [(64, 128, 1.0, 6), (64, 64, 1.0, 4), (64, 64, 2.0, 4), (64, 64, 2.5, 4),
                   (64, 64, 3.0, 4), (64, 64, 2.0, 3), (64, 64, 3.0, 3), (64, 64, 4.0, 3),
                   (64, 128, 2.0, 2), (64, 128, 3.0, 2), (64, 128, 2.0, 3)]
        for block_n, block_k, waves, stages in configs:
            name = f"tma n{block_n} k{block_k} w{waves:g} s{stages}"
            variants[name] = lambda w, x=x, c=(block_n, block_k, waves, stages): (
                kernels.matmul(x, w, dec.n_sms, tma=True, block_n=c[0], block_k=c[1],
                               waves=c[2], stages=c[3]))
        for name, fn in variants.items():
            try:
                def run(fn=fn, weights=weights):
                    for w in weights:
                        fn(w)
                ms = _ms_per_call(_captured(run).replay, repeat=10)
            except Exception as exc:  # a config that does not fit (shared memory)
                table.append({"kind": kind, "variant": name, "error": str(exc)[:120]})
                continue
            table.append({"kind": kind, "variant": name, "rows": rows,
                          "us_per_layer": round(ms * 1e3 / len(weights), 2),
                          "gb_per_s": round(nbytes / ms / 1e6, 1)})
    return table


def attention_table(fast: FastReuse, prefix: PrefixKV, tokens: int) -> list[dict]:
    """The attention of one layer, all layers' prefixes in turn, one graph per config."""
    from inference.fastpath import kernels
    from inference.fastpath.model import PrefixTable, SuffixState

    dec = fast.decoder
    prefix_table = PrefixTable.of(prefix, len(prefix.layers), torch.device("cuda"), dec.dtype)
    q = torch.randn(tokens, dec.n_heads * dec.head_dim, device="cuda", dtype=dec.dtype)
    state = SuffixState(dec, batch=1, capacity=64, device=torch.device("cuda"))
    n_valid = torch.full((1,), tokens, dtype=torch.long, device="cuda")
    configs = [{}]
    # 256 rows hold a KV head's 4 query heads x 48 tokens in one block, so each prefix K/V tile
    # is loaded once instead of once per 64-row block (8 warps, 1 block per SM); on an H200 it
    # measured slower than 64-row blocks (22.6 us a layer against 16.5).
    for block_m in (64, 128, 256):
        for stages in (2, 3):
            for waves in (1.0, 2.0):
                configs.append(dict(block_m=block_m, block_n=64, stages=stages, waves=waves,
                                    warps=4 if block_m == 64 else 8))
    # One 256-row block per KV head and split over 16 warps (a warpgroup per 64 rows, 128
    # registers a thread, no spills): each K/V tile crosses L2 once, not once per 64 rows.
    for block_n in (32, 64):
        for waves in (0.5, 1.0, 2.0):
            configs.append(dict(block_m=256, block_n=block_n, stages=3, waves=waves, warps=16))
    table, default_out = [], None
    for config in configs:
        def run(config=config):
            for i in range(len(prefix.layers)):
                out = kernels.attention(q, prefix_table, state.keys[i], state.values[i],
                                        layer=i, start=state.lengths, n_valid=n_valid,
                                        seq_len=tokens, n_heads=dec.n_heads, scale=dec.scale,
                                        n_sms=dec.n_sms, **config)
            return out
        try:
            out = run().float()
            ms = _ms_per_call(_captured(run).replay, repeat=10)
        except Exception as exc:  # a config that does not fit
            table.append({**config, "error": str(exc)[:100]})
            continue
        default_out = out if default_out is None else default_out
        table.append({**config, "us_per_layer": round(ms * 1e3 / len(prefix.layers), 2),
                      "max_diff_to_default": (out - default_out).abs().max().item()})
    return table


def launch_table(fast: FastReuse, prefix: PrefixKV, suffixes: list[list[int]]) -> list[dict]:
    """The whole first step, one graph per launch variant: plain launches, then programmatic
    dependent launch with more or less prefetching into L2 (each product's first columns).
    Each variant's logits are compared bitwise with plain launches' (PDL and prefetches change
    when kernels start and what sits in L2, never what they compute)."""
    dec = fast.decoder
    # The default comes back between the others: a drift within the process (seen after large
    # prefetches) would otherwise pass for a variant's cost.
    def every_kind(columns: int) -> dict[str, tuple[int, bool]]:
        return {kind: (columns, False) for kind in dec.prefetch}

    variants = [{"pdl": False}, {"pdl": True, "prefetch": every_kind(0)},
                {"pdl": True, "prefetch": every_kind(512)},
                {"pdl": True, "prefetch": dec.prefetch},
                {"pdl": True, "prefetch": every_kind(256)},
                {"pdl": True, "prefetch": every_kind(512)}]
    saved = {key: getattr(dec, key) for key in ("pdl", "prefetch")}
    table, plain = [], None
    for variant in variants:
        for key, value in variant.items():
            setattr(dec, key, value)
        fast._slots.clear()  # fresh captures with this variant's launches
        try:
            logits = fast.first_logits(prefix, suffixes).float()
            ms = _ms_per_call(lambda: fast.first_logits(prefix, suffixes), repeat=30)
        except Exception as exc:  # e.g. a Triton without PDL
            table.append({**variant, "error": str(exc)[:200]})
            continue
        plain = logits if plain is None else plain
        table.append({**variant, "graph_ms": round(ms, 4),
                      "bitwise_equal_to_plain": bool(torch.equal(logits, plain)),
                      "max_logit_diff_to_plain": (logits - plain).abs().max().item(),
                      "same_argmax": bool(torch.equal(logits.argmax(-1), plain.argmax(-1)))})
    for key, value in saved.items():
        setattr(dec, key, value)
    fast._slots.clear()
    return table


def ablation_table(fast: FastReuse, prefix: PrefixKV, suffixes: list[list[int]]) -> list[dict]:
    """The whole first step's graph with one kind of work left out (its output buffer handed
    on unwritten, so shapes and the rest of the chain stay): what that work adds to the
    step's critical path, PDL overlaps included. Timings only; the logits are garbage."""
    from inference.fastpath import kernels
    from inference.fastpath.model import FastDecoder

    product = FastDecoder._product
    outputs: dict[tuple, torch.Tensor] = {}

    def skipping_product(skipped):
        def run(self, x, weight, bias=None, *, silu=False, kind):
            real = functools.partial(product, self, x, weight, bias, silu=silu, kind=kind)
            if kind != skipped:
                return real()
            key = (kind, tuple(x.shape))
            if key not in outputs:  # the real product once, outside any capture: its shape
                outputs[key] = torch.zeros_like(real())
            return outputs[key]
        return run

    real = {name: getattr(kernels, name) for name in ("add_rms_norm", "qk_norm_rope_store",
                                                       "attention")}
    buffers: dict[str, torch.Tensor] = {}

    def skipping(name):
        def run(*args, **options):
            if name not in buffers:
                buffers[name] = torch.zeros_like(real[name](*args, **options))
            return buffers[name]
        return run

    variants = [("whole step", None, None)]
    variants += [(f"without {k}", None, k) for k in PRODUCT_KINDS]
    variants += [(f"without {n}", n, None) for n in real]
    variants.append(("whole step", None, None))  # again: drift within the process
    table = []
    for label, kernel, kind in variants:
        if kernel:
            setattr(kernels, kernel, skipping(kernel))
        if kind:
            FastDecoder._product = skipping_product(kind)
        fast._slots.clear()
        try:
            fast.first_logits(prefix, suffixes)
            ms = _ms_per_call(lambda: fast.first_logits(prefix, suffixes), repeat=30)
            table.append({"variant": label, "graph_ms": round(ms, 4)})
        finally:
            for name, fn in real.items():
                setattr(kernels, name, fn)
            FastDecoder._product = product
            buffers.clear()
            outputs.clear()
    fast._slots.clear()
    return table


def step_variants(name: str, dec) -> list[tuple]:
    """Whole-step variants: (label, kernel patched, the weight kinds it applies to or None for
    every call, options).

    "products": other split-K configs per weight kind. Fewer stages or k-steps of 64 put 2-3
    blocks on an SM: gate_up's 304 tiles then all start at once (one block an SM is 2.3 waves),
    qkv's 96 tiles get split-K partners. Other tile widths: 32 doubles the blocks (and the
    activation reads from L2 per weight byte), 128 halves them; gate_up off 64 loses its fused
    activation (silu_mul runs).
    "gate_up": gate/up's k-step and stages with its prefetch.
    "prefetch": what a product asks for in L2 before its PDL wait: more or fewer first weight
    columns per kind, or only from the blocks of the first wave (those that start before the
    kernel ahead of them ends). (The prefix's K/V from the attention before its wait measured
    +0.10 ms on an H200: bench/results/profile_fastpath-prefetch-3774-qwen3-4b-h200.txt.)
    """
    kinds = PRODUCT_KINDS
    if name == "products":
        return [
            (kind, "matmul", (kind,), options)
            for kind in ("gate_up", "qkv", "down", "o_proj")
            for options in ({"block_k": 64, "stages": 4}, {"block_k": 128, "stages": 3},
                            {"block_k": 64, "stages": 6}, {"waves": 2.0},
                            {"waves": 2.0, "block_k": 128, "stages": 3},
                            {"waves": 3.0, "block_k": 64, "stages": 4},
                            {"block_n": 32}, {"block_n": 32, "stages": 4},
                            {"block_n": 128, "stages": 3}, {"block_n": 128, "stages": 4})
        ]
    first_wave = {"prefetch_programs": dec.n_sms}

    def per_kind(**changes: tuple[int, bool]) -> dict:
        """The decoder's prefetch settings with some kinds changed."""
        return {"prefetch": {**dec.prefetch, **changes}}

    if name == "gate_up":  # its tiles and prefetch together (they interact through occupancy)
        tiles = {"128 x6": {"block_k": 128, "stages": 6}, "64 x4": {"block_k": 64, "stages": 4},
                 "64 x6": {"block_k": 64, "stages": 6}, "64 x3": {"block_k": 64, "stages": 3}}
        return [
            (f"gate_up k-steps {tile}, prefetch {columns}{' first wave' if first else ''}",
             "decoder", None, {"product_options": {"gate_up": options},
                               **per_kind(gate_up=(columns, first))})
            for tile, options in tiles.items()
            for columns, first in ((384, True), (384, False), (256, False), (768, False),
                                   (0, False))
            if tile == "64 x4" or (columns, first) == (384, True)
        ]
    assert name == "prefetch", name

    every_kind_512 = ("512 columns, every kind", "decoder", None,
                      {"prefetch": dict.fromkeys(kinds, (512, False))})
    return [
        every_kind_512,
        ("gate_up", "matmul", ("gate_up",), {"prefetch_k": 0}),
        ("gate_up", "matmul", ("gate_up",), {"prefetch_k": 256, **first_wave}),
        ("gate_up", "matmul", ("gate_up",), {"prefetch_k": 512, **first_wave}),
        ("down 128", "decoder", None, per_kind(down=(128, False))),
        ("down 128, qkv 256", "decoder", None, per_kind(down=(128, False), qkv=(256, False))),
        ("o_proj", "matmul", ("o_proj",), {"prefetch_k": 0}),
        ("o_proj", "matmul", ("o_proj",), {"prefetch_k": 128}),
        ("qkv", "matmul", ("qkv",), {"prefetch_k": 384}),
        every_kind_512,
    ]


def step_variant_table(
    fast: FastReuse, prefix: PrefixKV, suffixes: list[list[int]], variants: list[tuple]
) -> list[dict]:
    """The whole first step with one kernel's calls (one weight kind's products, or every
    attention) in another config: whether a config that is faster alone also shortens the
    step (PDL, L2 prefetch and the kernels around it included). The default runs first, in the
    middle and last: a drift within the process would otherwise pass for a variant's cost."""
    from inference.fastpath import kernels

    dec = fast.decoder
    kinds = {tuple(w.shape): name for name, w in (
        ("qkv", dec.layers[0].qkv), ("o_proj", dec.layers[0].o_proj),
        ("gate_up", dec.layers[0].gate_up), ("down", dec.layers[0].down))}
    default = ("default", None, None, {})
    half = len(variants) // 2
    table, reference = [], None
    for label, name, kind, options in [default, *variants[:half], default, *variants[half:],
                                       default]:
        if name == "decoder":  # options are the decoder's own settings
            saved = {key: getattr(dec, key) for key in options}
            for key, value in options.items():
                setattr(dec, key, value)
            name = None
        else:
            saved = {}
        real = getattr(kernels, name) if name else None

        def configured(*args, real=real, kind=kind, options=options, **kw):
            weight = args[1] if len(args) > 1 else None
            if kind is None or (weight is not None and kinds.get(tuple(weight.shape)) in kind):
                kw.update(options)
            return real(*args, **kw)

        if name:
            setattr(kernels, name, configured)
        fast._slots.clear()
        try:
            logits = fast.first_logits(prefix, suffixes).float()
            ms = _ms_per_call(lambda: fast.first_logits(prefix, suffixes), repeat=30)
        except Exception as exc:  # a config that does not fit
            table.append({"kind": label, **options, "error": str(exc)[:100]})
            continue
        finally:
            if name:
                setattr(kernels, name, real)
            for key, value in saved.items():
                setattr(dec, key, value)
        reference = logits if reference is None else reference
        table.append({"kind": label, **options, "graph_ms": round(ms, 4),
                      "max_logit_diff": (logits - reference).abs().max().item()})
    fast._slots.clear()
    return table


def _step_events(fast: FastReuse, prefix: PrefixKV, suffixes: list[list[int]]) -> list:
    """The GPU activities of one replay of the first step under the profiler, by start."""
    fast.first_logits(prefix, suffixes)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fast.first_logits(prefix, suffixes)
        torch.cuda.synchronize()
    return sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)


def critical_path(fast: FastReuse, prefix: PrefixKV, suffixes: list[list[int]]) -> list[dict]:
    """Where one first step's time goes with PDL's overlaps: every kernel waits for the one
    before it, so the time from the previous activity's end to a kernel's own end is what it
    adds to the step. Summed per kind (products by their place in the layer, a norm by the
    product that follows it)."""
    events = _step_events(fast, prefix, suffixes)
    products = iter(PRODUCT_KINDS * len(fast.decoder.layers))
    names = [e.name for e in events]
    kinds = [next(products) if name.startswith("_matmul") else name[:40] for name in names]
    for i, name in enumerate(names):
        if "rms_norm" in name:
            after = next((k for k in kinds[i + 1:] if k in PRODUCT_KINDS), "lm head")
            kinds[i] = f"norm before {after}"
    totals: dict[str, list[float]] = {}
    last_end = events[0].time_range.start
    for kind, event in sorted(zip(kinds, events, strict=True), key=lambda p: p[1].time_range.end):
        entry = totals.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.end - last_end  # idle time before it included
        last_end = event.time_range.end
    layers = len(fast.decoder.layers)
    return [{"kind": kind, "count": count, "us": round(us, 1),
             "us_per_layer": round(us / layers, 2)}
            for kind, (count, us) in sorted(totals.items(), key=lambda item: -item[1][1])]


def trace_ends(fast: FastReuse, prefix: PrefixKV, suffixes: list[list[int]]) -> list[dict]:
    """One replay of the first step under the profiler: its first and last GPU activities with
    start and end (us from the first one's start), to see what the step spends before its first
    weight product and after its last layer."""
    events = _step_events(fast, prefix, suffixes)
    t0 = events[0].time_range.start
    return [{"at": i, "name": e.name[:60], "start_us": round(e.time_range.start - t0, 2),
             "end_us": round(e.time_range.end - t0, 2)}
            for i, e in enumerate(events) if i < 10 or i >= len(events) - 10]


def kernel_table(fast: FastReuse, prefix: PrefixKV, tokens: int) -> list[dict]:
    """Each of a layer's non-product kernels alone, plain launches, 36 in a row in one graph
    (as many as layers): what each costs when nothing overlaps it."""
    from inference.fastpath import kernels
    from inference.fastpath.model import PrefixTable, SuffixState

    dec = fast.decoder
    cuda = torch.device("cuda")
    table = PrefixTable.of(prefix, len(prefix.layers), cuda, dec.dtype)
    state = SuffixState(dec, batch=1, capacity=64, device=cuda)
    n_valid = torch.full((1,), tokens, dtype=torch.long, device=cuda)
    x = torch.randn(tokens, dec.hidden, device=cuda, dtype=dec.dtype)
    delta = torch.randn(3, tokens, dec.hidden, device=cuda)
    width = (dec.n_heads + 2 * dec.n_kv_heads) * dec.head_dim
    qkv = torch.randn(1, tokens, width, device=cuda)
    q = torch.randn(tokens, dec.n_heads * dec.head_dim, device=cuda, dtype=dec.dtype)
    gate_up = torch.randn(1, tokens, 2 * dec.intermediate, device=cuda)
    cos, sin = dec.rope_table
    w = dec.layers[0]
    n_layers = len(dec.layers)

    def attention(i: int, no_prefix: bool = False, **options) -> torch.Tensor:
        return kernels.attention(
            q, None if no_prefix else table, state.keys[i], state.values[i], layer=i,
            start=state.lengths, n_valid=n_valid, seq_len=tokens, n_heads=dec.n_heads,
            scale=dec.scale, n_sms=dec.n_sms, **options)

    def flash_prefix(i: int) -> torch.Tensor:
        keys, values = prefix.layers[i]
        return dec._prefix_attention(q.view(1, tokens, dec.n_heads, dec.head_dim), keys, values)

    runs = {
        "add_rms_norm (3 parts)": lambda i: kernels.add_rms_norm(x, delta, w.input_norm, dec.eps),
        "qk_norm_rope_store": lambda i: kernels.qk_norm_rope_store(
            qkv, w.qk_norm, cos, sin, keys=state.keys[i], values=state.values[i],
            start=state.lengths, n_prefix=table.n_tokens, seq_len=tokens, n_heads=dec.n_heads,
            n_kv_heads=dec.n_kv_heads, eps=dec.eps),
        "attention parts + merge": attention,
        "attention, bf16 parts": lambda i: attention(i, part_dtype=torch.bfloat16),
        "attention, suffix only (+ merge)": lambda i: attention(i, no_prefix=True),
        "attention, 1 wave": lambda i: attention(i, waves=1.0),
        "attention, 4 waves": lambda i: attention(i, waves=4.0),
        "attention, 3 waves": lambda i: attention(i, waves=3.0),
        "attention, key blocks of 128": lambda i: attention(i, block_n=128),
        "attention, key blocks of 128, 2 stages": lambda i: attention(i, block_n=128, stages=2),
        "attention, 2 stages": lambda i: attention(i, stages=2),
        "torch flash attention, prefix only (reference)": lambda i: flash_prefix(i),
        "silu_mul": lambda i: kernels.silu_mul(gate_up, dec.dtype),
        "empty (torch zero_ of 1 element)": lambda i: n_valid[:0].zero_(),
    }
    # The compiled loop to each split's end against the interpreter's masked loop to the
    # class's split length: the same blocks in the same order, so the same bits.
    rows = [{"attention_runtime_loop_bitwise_equal_to_static_loop": bool(torch.equal(
        attention(0), attention(0, runtime_loop=False)))}]
    for name, fn in runs.items():
        def run(fn=fn):
            for i in range(n_layers):
                fn(i)
        graph = _captured(run)
        ms = _ms_per_call(graph.replay, repeat=20)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        each = {e.key[:40]: round(e.self_device_time_total / max(1, e.count), 2)
                for e in prof.key_averages() if e.self_device_time_total > 0}
        rows.append({"kernel": name, "us_per_layer": round(ms * 1e3 / n_layers, 2),
                     "us_per_kernel": each})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--matmul", action="store_true", help="time split-K configs")
    parser.add_argument("--attention", action="store_true", help="time attention configs")
    parser.add_argument("--launch", action="store_true", help="time PDL and prefetch variants")
    parser.add_argument("--kernels", action="store_true", help="time each non-product kernel")
    parser.add_argument("--step-variants", choices=("gate_up", "prefetch", "products"),
                        help="time the whole step with one kernel in other configs, in turn")
    parser.add_argument("--trace", action="store_true",
                        help="the first and last GPU activities of one first step")
    parser.add_argument("--critical-path", action="store_true",
                        help="what each kind of kernel adds to one first step, overlaps counted")
    parser.add_argument("--ablate", action="store_true",
                        help="time the step without each kind of work in turn")
    parser.add_argument("--eager-steps", type=int, default=0,
                        help="only run this many first steps eagerly (no graph), for ncu")
    args = parser.parse_args()
    model = build_model(args.model_config, "cuda", torch.bfloat16)
    doc = torch.randint(0, 1000, (1, args.n_tokens), device="cuda")
    _, cache = hf_prefill(model, doc)
    prefix = PrefixKV([(c.keys[0].contiguous(), c.values[0].contiguous()) for c in cache.layers])
    del cache
    suffixes = [list(range(100 + i, 100 + i + args.suffix)) for i in range(args.batch)]
    if args.eager_steps:
        eager = FastReuse(model, capacity=128, use_graphs=False)
        for _ in range(args.eager_steps):
            eager.first_logits(prefix, suffixes)
        torch.cuda.synchronize()
        return
    report = {"device": torch.cuda.get_device_name(), "n_tokens": args.n_tokens,
              "batch": args.batch, "suffix": args.suffix}
    fast = FastReuse(model, capacity=128)
    report["pdl"] = fast.decoder.pdl
    tables = [  # (asked for, its rows), printed as they come
        (args.kernels, lambda: kernel_table(fast, prefix, args.batch * args.suffix)),
        (args.step_variants, lambda: step_variant_table(
            fast, prefix, suffixes, step_variants(args.step_variants, fast.decoder))),
        (args.trace, lambda: trace_ends(fast, prefix, suffixes)),
        (args.critical_path, lambda: critical_path(fast, prefix, suffixes)),
        (args.ablate, lambda: ablation_table(fast, prefix, suffixes)),
        (args.launch, lambda: launch_table(fast, prefix, suffixes)),
    ]
    for wanted, rows in tables:
        if wanted:
            for line in rows():
                print(json.dumps(line), flush=True)
    reference = FastReuse(model, capacity=128, kernels=False)
    first = fast.first_logits(prefix, suffixes)
    report["kernels_vs_torch_ops_max_logit_diff"] = (
        (first.float() - reference.first_logits(prefix, suffixes).float()).abs().max().item()
    )
    report["kernels_graph_ms"] = _ms_per_call(lambda: fast.first_logits(prefix, suffixes))
    report["kernels_graph_latency_ms"] = _ms_per_call(
        lambda: (fast.first_logits(prefix, suffixes), torch.cuda.synchronize())
    )
    # Where latency exceeds throughput: the host's time per request (not overlapped when one
    # request waits for its answer), and the replay alone.
    # The first-step graph a prefix still being copied in gets: each layer waits for an event.
    landed = recorded_events(len(fast.decoder.layers))
    with torch.inference_mode():
        report["kernels_graph_layer_waits_ms"] = _ms_per_call(
            lambda: fast._first_step(prefix, suffixes, layer_ready=landed)
        )
    graph = next(iter(fast._slots.values())).graphs[(-(-args.suffix // 16) * 16, True, False)]
    report["replay_only_latency_ms"] = _ms_per_call(
        lambda: (graph.graph.replay(), torch.cuda.synchronize())
    )
    report["first_logits_host_ms"] = _host_ms(lambda: fast.first_logits(prefix, suffixes))
    report["replay_host_ms"] = _host_ms(graph.graph.replay)
    fast.decoder.skinny_rows = 0
    fast._slots.clear()  # recapture: the products are part of the graphs
    report["kernels_cublas_graph_ms"] = _ms_per_call(lambda: fast.first_logits(prefix, suffixes))
    fast.decoder.skinny_rows = 64
    fast._slots.clear()
    report["torch_ops_graph_ms"] = _ms_per_call(lambda: reference.first_logits(prefix, suffixes))
    report["gemm_floor_ms"] = gemm_floor_ms(fast, args.batch * args.suffix)

    def decode_steps(runner, steps=8):
        runner.greedy(prefix, suffixes, steps)

    for label, runner in (("kernels", fast), ("torch_ops", reference)):
        one = _ms_per_call(lambda r=runner: decode_steps(r, 1), repeat=5)
        nine = _ms_per_call(lambda r=runner: decode_steps(r, 9), repeat=5)
        report[f"{label}_decode_step_ms"] = (nine - one) / 8
    print(json.dumps(report), flush=True)
    for label, steps in (("first step", 1), ("first step + 2 decode steps", 3)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode_steps(fast, steps)
            torch.cuda.synchronize()
        print(label)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    if args.attention:
        table = attention_table(fast, prefix, args.batch * args.suffix)
        for line in sorted(table, key=lambda r: r.get("us_per_layer", 1e9))[:12]:
            print(json.dumps(line))
        print("default", json.dumps(table[0]))
    if args.matmul:
        table = matmul_table(fast, args.batch * args.suffix)
        for kind in ("copy", "qkv", "o_proj", "gate_up", "down"):
            lines = [line for line in table if line["kind"] == kind]
            ranked = sorted(lines, key=lambda r: r.get("us_per_layer", 1e9))
            for line in [r for r in lines if r["variant"] in ("cublas", "split_k default")]:
                print(json.dumps(line))
            for line in ranked:
                print(json.dumps(line))
            errors = [r for r in lines if "error" in r]
            if errors:
                print(json.dumps(errors[0]), len(errors), "errors")


if __name__ == "__main__":
    main()
