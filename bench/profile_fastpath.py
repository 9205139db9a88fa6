"""Profile one fast-path step on the GPU: where the time goes, and the GEMM-only floor.

python bench/profile_fastpath.py --model-config qwen3-4b --n-tokens 3774
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kv_reuse_fast import build_model, hf_prefill  # noqa: E402
from inference.fastpath.model import PrefixKV  # noqa: E402
from inference.fastpath.runner import FastReuse  # noqa: E402


def _ms_per_call(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


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

    products()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        products()
    return _ms_per_call(graph.replay)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = build_model(args.model_config, "cuda", torch.bfloat16)
    doc = torch.randint(0, 1000, (1, args.n_tokens), device="cuda")
    _, cache = hf_prefill(model, doc)
    prefix = PrefixKV([(c.keys[0].contiguous(), c.values[0].contiguous()) for c in cache.layers])
    del cache
    suffixes = [list(range(100 + i, 100 + i + args.suffix)) for i in range(args.batch)]
    report = {"device": torch.cuda.get_device_name(), "n_tokens": args.n_tokens,
              "batch": args.batch, "suffix": args.suffix}
    runners = {"kernels": FastReuse(model, capacity=128),
               "torch_ops": FastReuse(model, capacity=128, kernels=False)}
    for label, fast in runners.items():
        report[f"{label}_graph_ms"] = _ms_per_call(lambda f=fast: f.first_logits(prefix, suffixes))
    report["gemm_floor_ms"] = gemm_floor_ms(runners["kernels"], args.batch * args.suffix)
    print(json.dumps(report), flush=True)
    fast = runners["kernels"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fast.first_logits(prefix, suffixes)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
