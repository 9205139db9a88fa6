"""Host time of each piece of a hot first step (the GPU idle before each), in ms (medians).

python bench/first_step_host.py --model-config qwen3-4b --n-tokens 3774
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kv_reuse_fast import build_model  # noqa: E402
from inference.fastpath.model import PrefixKV  # noqa: E402
from inference.fastpath.runner import FastReuse, _packed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--suffix", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    model = build_model(args.model_config, "cuda", torch.bfloat16)
    fast = FastReuse(model, capacity=128)
    dec = fast.decoder
    shape = (dec.n_kv_heads, args.n_tokens, dec.head_dim)
    prefix = PrefixKV([
        tuple(torch.randn(shape, device="cuda", dtype=dec.dtype) for _ in range(2))
        for _ in dec.layers
    ])
    suffixes = [list(range(1, args.suffix + 1))]
    width = -(-args.suffix // 16) * 16
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    with torch.inference_mode():
        for _ in range(3):
            fast.first_logits(prefix, suffixes)
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            slot = timed("slot", lambda: fast._slot(prefix, 1, fast.slot_capacity(args.suffix)))
            g = timed("graph_lookup", lambda s=slot: fast._graph(s, width, fresh=True))
            timed("inputs_read_sync", g.inputs_read.synchronize)
            timed("pack_inputs", lambda g=g: g.host_inputs.numpy().__setitem__(
                slice(None), _packed(suffixes, width)))
            timed("replay", g.graph.replay)
            timed("clone_logits", g.logits.clone)
            torch.cuda.synchronize()
            timed("first_logits", lambda: fast.first_logits(prefix, suffixes))
            torch.cuda.synchronize()
            timed("first_step", lambda: fast._first_step(prefix, suffixes))
            torch.cuda.synchronize()
    report = {name: round(statistics.median(v), 4) for name, v in times.items()}
    print(json.dumps({"device": torch.cuda.get_device_name(), **report}))


if __name__ == "__main__":
    main()
