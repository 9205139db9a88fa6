"""One reuse step run eagerly (no CUDA graph), a few times: a target for kernel profilers.

ncu --kernel-name regex:_attention_parts --launch-skip 72 --launch-count 1 \
    python bench/one_step.py --model-config qwen3-4b --n-tokens 3774
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kv_reuse_fast import build_model, hf_prefill  # noqa: E402
from inference.fastpath.model import PrefixKV  # noqa: E402
from inference.fastpath.runner import FastReuse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    model = build_model(args.model_config, "cuda", torch.bfloat16)
    doc = torch.randint(0, 1000, (1, args.n_tokens), device="cuda")
    _, cache = hf_prefill(model, doc)
    prefix = PrefixKV([(c.keys[0].contiguous(), c.values[0].contiguous()) for c in cache.layers])
    del cache
    fast = FastReuse(model, capacity=128, use_graphs=False)
    suffix = [list(range(100, 100 + args.suffix))]
    for _ in range(args.steps):
        fast.first_logits(prefix, suffix)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
