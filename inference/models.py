"""Model registry: load a causal LM with its tokenizer, fingerprint it, refuse unsupported ones."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidRequest, UnsupportedArchitecture

BUILTIN_MODEL_ID = "kvmarket/tiny-qwen3"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "tiny-qwen3"
# Short names accepted wherever a model reference is (CLI, bench).
ALIASES = {"builtin": BUILTIN_MODEL_ID, "tiny-qwen3": BUILTIN_MODEL_ID}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
CANONICAL_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Families whose decoder layers all keep a plain, growing K/V cache.
SUPPORTED_MODEL_TYPES = {
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "llama",
    "mistral",
    "mixtral",
    "granite",
    "olmo",
    "olmo2",
    "phi3",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class LoadedModel:
    """A model ready for prefill/decode, with the identities that KV artifacts are bound to."""

    model: Any
    tokenizer: Any
    model_id: str
    fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    device: str
    max_context: int
    n_layers: int
    n_kv_heads: int = 0
    head_dim: int = 0
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def n_params(self, *, exclude_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.model.parameters())
        if exclude_embeddings:
            total -= self.model.get_input_embeddings().weight.numel()
        return total


def resolve_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        if dtype not in CANONICAL_DTYPE:
            raise InvalidRequest(f"unsupported dtype {dtype}")
        return CANONICAL_DTYPE[dtype], dtype
    if dtype not in DTYPES:
        raise InvalidRequest(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    torch_dtype = DTYPES[dtype]
    return CANONICAL_DTYPE[torch_dtype], torch_dtype


def _hash_files(paths: list[Path], extra: bytes = b"") -> str:
    digest = hashlib.sha256(extra)
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


_FILE_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_FILE_HASH_LOCK = threading.Lock()


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and the weight files (cached per path, size and mtime)."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"] + [
        p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    ]
    files = [p for p in files if p.exists()]
    stat_key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files))
    cache_key = (repr(stat_key), 0, 0)
    with _FILE_HASH_LOCK:
        if cache_key in _FILE_HASH_CACHE:
            return _FILE_HASH_CACHE[cache_key]
    value = _hash_files(files, b"kvmarket-model-v1\0")
    with _FILE_HASH_LOCK:
        _FILE_HASH_CACHE[cache_key] = value
    return value


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 over the tokenizer files present in the folder."""
    tokenizer_dir = Path(tokenizer_dir)
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    return _hash_files(files, b"kvmarket-tokenizer-v1\0")


def config_fingerprint(config: Any, salt: str = "") -> str:
    """Fingerprint for a model built in memory from its config (bench, random weights)."""
    payload = json.dumps(config.to_dict(), sort_keys=True, default=str) + salt
    return hashlib.sha256(b"kvmarket-config-v1\0" + payload.encode()).hexdigest()


def check_architecture(config: Any) -> None:
    """Refuse models whose cache is not one plain growing K/V tensor pair per layer."""
    text_config = config
    if hasattr(config, "get_text_config"):
        text_config = config.get_text_config(decoder=True)
    model_type = getattr(text_config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(f"encoder-decoder model {model_type!r} is not supported")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"model type {model_type!r} is not supported; supported: "
            + ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        )
    layer_types = getattr(text_config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise UnsupportedArchitecture(f"layer types {odd} are not plain full attention")
    uses_window = getattr(text_config, "use_sliding_window", True)
    if getattr(text_config, "sliding_window", None) and uses_window:
        raise UnsupportedArchitecture("sliding-window attention is not supported")


def _resolve_ref(model_ref: str) -> tuple[str, Path]:
    model_ref = ALIASES.get(model_ref, model_ref)
    if model_ref == BUILTIN_MODEL_ID:
        return model_ref, BUILTIN_DIR
    path = Path(model_ref).expanduser()
    if path.is_dir():
        return str(path.resolve()), path.resolve()
    # A hub id: use the local snapshot (downloading only where the hub is reachable).
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        model_ref,
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
    )
    return model_ref, Path(local)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(x) for x in source)
    if tokenizer is not None:
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
                ids.add(tid)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def wrap_model(
    model: Any,
    tokenizer: Any = None,
    *,
    model_id: str,
    fingerprint: str | None = None,
    tokenizer_fingerprint: str = "none",
    device: str | None = None,
) -> LoadedModel:
    """Wrap an in-memory model (e.g. random weights built from a config) as a LoadedModel."""
    config = model.config
    check_architecture(config)
    model.eval()
    text_config = config.get_text_config(decoder=True)
    dtype_name = CANONICAL_DTYPE[next(model.parameters()).dtype]
    n_heads = text_config.num_attention_heads
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        fingerprint=fingerprint or config_fingerprint(config),
        tokenizer_fingerprint=tokenizer_fingerprint,
        dtype=dtype_name,
        device=device or str(next(model.parameters()).device),
        max_context=int(text_config.max_position_embeddings),
        n_layers=int(text_config.num_hidden_layers),
        n_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or n_heads),
        head_dim=int(
            getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
        ),
        eos_token_ids=_eos_ids(model, tokenizer),
    )


def load_model(model_ref: str, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM by hub id or local path; ``BUILTIN_MODEL_ID`` is the in-repo model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype_name, torch_dtype = resolve_dtype(dtype)
    model_id, model_dir = _resolve_ref(model_ref)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_architecture(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, local_files_only=True
    ).to(device)
    model.eval()
    model.requires_grad_(False)
    return wrap_model(
        model,
        tokenizer,
        model_id=model_id,
        fingerprint=model_fingerprint(model_dir),
        tokenizer_fingerprint=tokenizer_fingerprint(model_dir),
        device=device,
    )


_MODEL_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_MODEL_LOCK = threading.Lock()


def get_model(model_ref: str, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Process-wide cache of load_model results, keyed by (reference, dtype, device)."""
    key = (ALIASES.get(model_ref, model_ref), resolve_dtype(dtype)[0], device)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load_model(model_ref, dtype=dtype, device=device)
        return _MODEL_CACHE[key]
