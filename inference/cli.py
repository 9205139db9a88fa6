"""Command line: ``python -m inference {precompute,generate,verify,inspect,bench}``; prints JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import InvalidRequest, KVError

DEFAULT_STORE = os.environ.get("KVMARKET_KV_ROOT", "var/kv")


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin",
                   help="'builtin', 'smollm2-135m', a local folder, a .gguf file, "
                        "pkg:<package>/<file>.gguf or a Hugging Face id in the local cache")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", default=DEFAULT_STORE, help="KV store root folder")
    p.add_argument("--model-cache", default=None,
                   help="folder of converted GGUF models (default $KVMARKET_MODEL_CACHE or "
                        "~/.cache/kvmarket/models)")


def _store(args: argparse.Namespace) -> Any:
    from .store import KVStore

    return KVStore(args.store)


def _loaded(args: argparse.Namespace) -> Any:
    from .models import get_model

    return get_model(args.model, dtype=args.dtype, device=args.device,
                     cache_dir=args.model_cache)


def cmd_precompute(args: argparse.Namespace) -> Any:
    from .engine import precompute, verify

    if (args.text is None) == (args.text_file is None):
        raise InvalidRequest("pass exactly one of --text or --text-file")
    text = args.text if args.text is not None else Path(args.text_file).read_text()
    loaded, store = _loaded(args), _store(args)

    def progress(done: int, total: int) -> None:
        if args.progress:
            print(f"prefill {done}/{total}", file=sys.stderr)

    result = precompute(loaded, text, store=store, progress=progress, chunk_size=args.chunk_size)
    out = result.to_dict()
    if args.verify:
        out["verification"] = verify(loaded, store, result.key).to_dict()
    return out


def cmd_generate(args: argparse.Namespace) -> Any:
    from .engine import Generation, generate_stream

    if (args.prompt is None) == (args.message is None):
        raise InvalidRequest("pass exactly one of --prompt or --message")
    messages = [{"role": "user", "content": args.message}] if args.message is not None else None
    stream = generate_stream(
        _loaded(args), _store(args), args.key, messages=messages, prompt=args.prompt,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, stop=args.stop or None,
    )
    final = None
    for item in stream:
        if isinstance(item, Generation):
            final = item
        elif args.stream:
            print(item, end="", file=sys.stderr, flush=True)
    if args.stream:
        print(file=sys.stderr)
    assert final is not None
    return final.to_dict()


def cmd_verify(args: argparse.Namespace) -> Any:
    from .engine import verify

    report = verify(_loaded(args), _store(args), args.key, suffixes=args.suffix or None,
                    steps=args.steps)
    return report.to_dict()


def cmd_inspect(args: argparse.Namespace) -> Any:
    from .artifact import read_manifest
    from .engine import inspect_artifact

    if args.path:
        path = Path(args.path)
        return {"path": str(path), "bytes": path.stat().st_size, "manifest": read_manifest(path)}
    if not args.key:
        from .store import KVStore

        store = KVStore(args.store)
        return {"root": str(store.root), "keys": store.keys(), "stats": store.stats()}
    return inspect_artifact(_store(args), args.key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("precompute", help="prefill a document and store its KV artifact")
    _model_args(p)
    p.add_argument("--text")
    p.add_argument("--text-file")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--verify", action="store_true", help="also run and store verification")
    p.add_argument("--progress", action="store_true", help="print progress to stderr")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("generate", help="continue from a stored KV artifact")
    _model_args(p)
    p.add_argument("--key", required=True)
    p.add_argument("--prompt", help="raw text appended to the cached tokens")
    p.add_argument("--message", help="a user chat message after the cached system turn")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append")
    p.add_argument("--stream", action="store_true", help="stream text deltas to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("verify", help="check reuse against two-step and one-shot prefill")
    _model_args(p)
    p.add_argument("--key", required=True)
    p.add_argument("--suffix", action="append", help="a user question (repeatable)")
    p.add_argument("--steps", type=int, default=24)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="show an artifact's manifest (or list the store)")
    p.add_argument("--store", default=DEFAULT_STORE)
    p.add_argument("--key")
    p.add_argument("--path", help="an artifact file anywhere")
    p.set_defaults(func=cmd_inspect)

    sub.add_parser("bench", help="cold prefill vs reuse per tier (see bench/kv_reuse.py)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        _print(args.func(args))
    except KVError as exc:
        print(json.dumps({"error": exc.to_dict()}, default=str), file=sys.stderr)
        return 2
    return 0
