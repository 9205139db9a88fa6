"""How long a GPU worker's warm-up (inference.engine.warm_up) takes: with an empty Triton cache
(a fresh machine), then in a new process with the cache the first run left on disk (a worker
restart with the cache on a volume, as docker/compose.yml keeps it). Also counts the kernel
variants compiled, by kernel. Prints JSON.

python bench/warm_up_time.py --model-config qwen3-4b
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _variants(cache_dir: str) -> dict[str, int]:
    """Compiled kernels in a Triton cache, by name (one cubin per compiled variant)."""
    names = collections.Counter(p.stem for p in Path(cache_dir).rglob("*.cubin"))
    return dict(sorted(names.items(), key=lambda item: -item[1]))


def _warm_up_seconds(model_config: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from inference import engine
    from inference.bench import build_random_model

    loaded = build_random_model(model_config, dtype="bfloat16", device="cuda")
    start = time.perf_counter()
    report = engine.warm_up(loaded)
    return {"wall_s": round(time.perf_counter() - start, 1), **report}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-4b")
    parser.add_argument("--child", action="store_true", help="one warm-up in this process")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_warm_up_seconds(args.model_config)))
        return
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    env = {**os.environ, "TRITON_CACHE_DIR": cache}
    command = [sys.executable, __file__, "--model-config", args.model_config, "--child"]
    runs = {}
    for name in ("empty_cache", "warm_cache"):
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        if name == "empty_cache":
            runs["variants"] = _variants(cache)
            runs["variants_total"] = sum(runs["variants"].values())
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
