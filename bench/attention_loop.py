"""The attention kernel alone (one layer's launch, 36 times in a CUDA graph) for a batch of
suffixes against one prefix: the prefix loop to each split's end at run time against the loop
to the class's split length under a mask. Prints JSON.

python bench/attention_loop.py --n-tokens 3774 --batches 1,128,512
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference.fastpath import kernels  # noqa: E402
from inference.fastpath.model import PrefixKV, PrefixTable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-tokens", type=int, default=3774)
    parser.add_argument("--batches", default="1,128,512")
    parser.add_argument("--suffix", type=int, default=48)
    args = parser.parse_args()
    cuda, dtype = torch.device("cuda"), torch.bfloat16
    n_heads, n_kv, d, layers = 32, 8, 128, 36
    keys = torch.randn(n_kv, args.n_tokens, d, device=cuda, dtype=dtype)
    values = torch.randn(n_kv, args.n_tokens, d, device=cuda, dtype=dtype)
    table = PrefixTable.of(PrefixKV([(keys, values)]), 1, cuda, dtype)
    sms = torch.cuda.get_device_properties(cuda).multi_processor_count
    for batch in [int(b) for b in args.batches.split(",")]:
        q = torch.randn(batch * args.suffix, n_heads * d, device=cuda, dtype=dtype)
        suffix_keys = torch.zeros(batch, n_kv, 64, d, device=cuda, dtype=dtype)
        start = torch.zeros(batch, dtype=torch.long, device=cuda)
        n_valid = torch.full((batch,), args.suffix, dtype=torch.long, device=cuda)
        row = {"batch": batch}
        outs = {}
        for runtime_loop in (True, False):
            def run(runtime_loop=runtime_loop, q=q, cache=suffix_keys, start=start, n=n_valid):
                for _ in range(layers):
                    out = kernels.attention(
                        q, table, cache, cache, layer=0, start=start,
                        n_valid=n, seq_len=args.suffix, n_heads=n_heads,
                        scale=d**-0.5, n_sms=sms, runtime_loop=runtime_loop)
                return out
            outs[runtime_loop] = run()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - begin) / 10 / layers * 1e3
            row["runtime_loop_us" if runtime_loop else "static_loop_us"] = round(ms * 1e3, 2)
        row["bitwise_equal"] = bool(torch.equal(outs[True], outs[False]))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
