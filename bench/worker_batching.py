"""Completions end to end through a real Celery GPU worker: requests/s with and without the
worker's batching window (COMPLETION_BATCH_WINDOW_MS), C agents at once on one hot document.

Prints JSON. Needs no server: the worker uses the filesystem broker and a file result backend.
On the GPU machine (Qwen3-4B architecture, random weights, bf16; the built-in tokenizer's ids
are valid for its vocabulary):
    python bench/worker_batching.py --model-config qwen3-4b --device cuda \
        --n-tokens 3774 --concurrency 1,8,32,64 --window-ms 0,5
CPU smoke run:  python bench/worker_batching.py --model-config qwen3-test --device cpu \
        --n-tokens 200 --concurrency 1,4 --window-ms 0,20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SLUG = "bench"
TEXT = (REPO / "marketplace" / "demo" / "moby_dick_loomings.txt").read_text()


def prepare_model(name: str, device: str, out: Path) -> None:
    """Save a random-weight model of the named architecture with the built-in tokenizer (its
    vocabulary is widened to the tokenizer's where smaller, for the CPU stand-in)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from inference.bench import MODEL_CONFIGS

    config = dict(MODEL_CONFIGS[name])
    config["vocab_size"] = max(config["vocab_size"], 4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**config))
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "inference" / "builtin" / "tiny-qwen3" / file, out / file)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def environment(tmp: Path, model_dir: Path, device: str, window_ms: float) -> dict[str, str]:
    dtype = "bfloat16" if device == "cuda" else "float32"
    models = {
        SLUG: {
            "ref": str(model_dir),
            "dtype": dtype,
            "device": device,
            "input_price_usd_per_mtok": "0.10",
            "output_price_usd_per_mtok": "0.40",
        }
    }
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "kvmarket.settings",
        "KVMARKET_ENV_FILE": "",
        "KVMARKET_VAR_DIR": str(tmp / "var"),
        "KVMARKET_MODELS": json.dumps(models),
        "CELERY_BROKER_URL": "filesystem://",
        "CELERY_RESULT_BACKEND": f"file://{tmp / 'results'}",
        "COMPLETION_BATCH_WINDOW_MS": str(window_ms),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default="qwen3-test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-tokens", type=int, default=200)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--window-ms", default="0,20")
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvm-worker-bench-"))
    (tmp / "results").mkdir()
    model_dir = tmp / "model"
    prepare_model(args.model_config, args.device, model_dir)
    report = {
        "benchmark": "worker_batching",
        "model_config": args.model_config,
        "device": args.device,
        "n_tokens": args.n_tokens,
        "runs": [],
    }
    key = None
    for window in [float(w) for w in args.window_ms.split(",")]:
        env = environment(tmp, model_dir, args.device, window)
        os.environ.update(env)
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "kvmarket",
                "worker",
                "--pool",
                "threads",
                "-c",
                str(args.threads),
                "--prefetch-multiplier",
                "4",
                "-Q",
                f"gpu.{SLUG}",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "WARNING",
            ],
            cwd=REPO,
            env=env,
        )
        try:
            import django

            django.setup()
            import inference
            from marketplace import engine
            from marketplace.tasks import run_completion

            if key is None:  # precompute here; the worker reads the artifact from disk
                loaded = engine.get_loaded(SLUG)
                text = TEXT
                while len(inference.document_prefix_ids(loaded, text)) < args.n_tokens:
                    text += "\n\n" + TEXT
                ids = inference.document_prefix_ids(loaded, text)
                report["n_tokens"] = len(ids)
                key = engine.precompute(slug=SLUG, text=text)["key"]

            def burst(n: int, key: str = key) -> float:
                start = time.perf_counter()
                pending = [
                    run_completion.apply_async(
                        kwargs=dict(
                            load_id=i,
                            model_slug=SLUG,
                            artifact_key=key,
                            prompt=f" Question {i}: what happens next?",
                            max_tokens=1,
                        ),
                        queue=f"gpu.{SLUG}",
                    )
                    for i in range(n)
                ]
                for result in pending:
                    out = result.get(timeout=600, interval=0.002)
                    assert out["ok"], out
                return time.perf_counter() - start

            burst(1)  # the worker loads the model and the artifact, captures graphs
            for c in [int(x) for x in args.concurrency.split(",")]:
                burst(c)  # warm-up for this batch size
                seconds = statistics.median(burst(c) for _ in range(args.repeat))
                report["runs"].append(
                    {
                        "window_ms": window,
                        "concurrency": c,
                        "seconds": round(seconds, 4),
                        "requests_per_s": round(c / seconds, 1),
                    }
                )
                print(json.dumps(report["runs"][-1]), file=sys.stderr, flush=True)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
