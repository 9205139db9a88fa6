"""Profile one fast-path step (eager and graph) on the GPU: where the time goes, as a table.

python bench/profile_fastpath.py --model-config qwen3-4b --n-tokens 3774
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kv_reuse_fast import build_model, hf_prefill  # noqa: E402
from inference.fastpath.model import PrefixKV, SuffixState, _attention_with_lse  # noqa: E402
from inference.fastpath.runner import FastReuse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    # Flash LSE agrees with the math path?
    q = torch.randn(1, 8, 192, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
    o1, l1 = _attention_with_lse(q, k, v, 128**-0.5)
    s = (q.float() @ k.float().transpose(-1, -2)) * 128**-0.5
    l2 = torch.logsumexp(s, -1)
    o2 = torch.softmax(s, -1) @ v.float()
    print(
        "flash lse diff",
        (l1 - l2).abs().max().item(),
        "out diff",
        (o1.float() - o2).abs().max().item(),
    )
    model = build_model(args.model_config, "cuda", torch.bfloat16, layers=args.layers)
    fast = FastReuse(model, capacity=128)
    doc = torch.randint(0, 1000, (1, args.n_tokens), device="cuda")
    _, cache = hf_prefill(model, doc)
    prefix = PrefixKV([(c.keys[0].contiguous(), c.values[0].contiguous()) for c in cache.layers])
    suffix = list(range(100, 148))
    state = SuffixState(fast.decoder, batch=1, capacity=128, device=torch.device("cuda"))
    ids = torch.tensor([suffix], device="cuda")
    for label, fn in (
        (
            "eager",
            lambda: (
                state.reset(),
                fast.decoder.forward(ids, prefix=prefix, state=state, fresh=True),
            ),
        ),
        ("graph", lambda: fast.first_logits(prefix, [suffix] * args.batch)),
    ):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        print(label, "ms", (time.perf_counter() - t) / 10 * 1e3)
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
