"""Train the built-in tiny Qwen3 model (``kvmarket/tiny-qwen3``) on CPU.

Why a trained model: an untrained model repeats one token forever, which makes every exactness
comparison pass trivially. This model is small (about 4M parameters, ~16 MB of float32
safetensors) but its greedy continuation depends on the context.

Corpus (available on every Debian machine with Python):
  * the license texts in /usr/share/common-licenses/ (deduplicated by content);
  * the docstrings of the running interpreter's standard library, extracted with ``ast``
    (no module is imported).
Training mixes plain language-model windows with ChatML samples whose system turn is a
passage, user turn a question and assistant turn a quote or continuation of the passage, so
chat use produces text copied from the cached document.

Usage (seeded, deterministic on a given machine):
    python -m inference.builtin.train --steps 900 --out inference/builtin/tiny-qwen3
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
VOCAB_SIZE = 4096
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


def license_texts() -> list[str]:
    seen: set[str] = set()
    texts = []
    root = Path("/usr/share/common-licenses")
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            texts.append(text)
    return texts


def stdlib_docstrings(limit_chars: int = 6_000_000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
                    total += len(doc)
        if total > limit_chars:
            break
    return docs


def build_corpus() -> list[str]:
    return license_texts() + stdlib_docstrings()


def paragraphs(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if 120 <= len(para) <= 1200:
                out.append(para)
    return out


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


QUESTIONS = [
    "Quote the passage.",
    "What does the text say?",
    "Repeat the first sentence.",
    "Continue the text.",
    "Summarize the passage in its own words.",
    "Which sentence mentions {w}?",
    "What does it say about {w}?",
    "Quote the part about {w}.",
]


def chat_sample(para: str, rng: random.Random) -> str:
    words = [w.strip(".,;:()") for w in para.split() if len(w) > 4]
    word = rng.choice(words) if words else "the text"
    question = rng.choice(QUESTIONS).format(w=word)
    sentences = [s.strip() for s in para.replace("? ", ". ").split(". ") if s.strip()]
    if "first" in question or not sentences:
        answer = sentences[0] if sentences else para[:200]
    elif word in para and "{w}" not in question:
        answer = para[: rng.randint(80, 300)]
    else:
        hits = [s for s in sentences if word in s] or sentences
        answer = rng.choice(hits)
    if not answer.endswith("."):
        answer += "."
    return (
        f"<|im_start|>system\n{para}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "tiny-qwen3"))
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-from", help="continue training a saved model (keeps its tokenizer)")
    args = parser.parse_args(argv)

    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    t0 = time.time()

    texts = build_corpus()
    paras = paragraphs(texts)
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts))} chars, {len(paras)} paragraphs")
    if args.init_from:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        raw_tok = tokenizer.backend_tokenizer
    else:
        raw_tok = train_tokenizer(texts)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=raw_tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>"],
            model_max_length=4096,
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    eot = raw_tok.token_to_id("<|endoftext|>")

    # Plain LM stream: every text, separated by <|endoftext|>.
    stream: list[int] = []
    for text in texts:
        stream.extend(raw_tok.encode(text).ids)
        stream.append(eot)
    stream_t = torch.tensor(stream, dtype=torch.long)
    print(f"lm stream: {len(stream)} tokens")

    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=eot,
        eos_token_id=raw_tok.token_to_id("<|im_end|>"),
        pad_token_id=eot,
    )
    previous: dict = {}
    if args.init_from:
        model = Qwen3ForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        previous = json.loads((Path(args.init_from) / "training.json").read_text())
        previous.pop("log", None)
    else:
        model = Qwen3ForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    def batch() -> torch.Tensor:
        rows = []
        for i in range(args.batch):
            if i % 2 == 0:  # half chat samples, packed to seq length
                ids: list[int] = []
                while len(ids) < args.seq + 1:
                    ids.extend(raw_tok.encode(chat_sample(rng.choice(paras), rng)).ids)
                    ids.append(eot)
                rows.append(torch.tensor(ids[: args.seq + 1]))
            else:
                start = rng.randrange(0, len(stream) - args.seq - 1)
                rows.append(stream_t[start : start + args.seq + 1])
        return torch.stack(rows)

    log = []
    ema = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        data = batch()
        out = model(input_ids=data[:, :-1], labels=data[:, :-1].clone())
        # labels are shifted inside the model; pass inputs as labels.
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.time() - t0
            print(f"step {step} loss {loss.item():.3f} ema {ema:.3f} t {elapsed:.0f}s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4), "ema": round(ema, 4)})

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Keep the chat template inside tokenizer_config.json (older loaders read it there).
    cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    info = {
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "params": n_params,
        "corpus_texts": len(texts),
        "corpus_chars": sum(map(len, texts)),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "final_loss_ema": round(ema or 0.0, 4),
        "continued_from": previous or None,
        "seconds": round(time.time() - t0, 1),
        "log": log,
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "log"}))


if __name__ == "__main__":
    main()
