"""A model's tokenizer and context length without its weights (for checks before any GPU work).

A web process checks that a submitted document fits the model's context before queueing its
precompute; it must not load the weights for that. ``get_token_counter`` reuses the tokenizer of
a model this process already loaded (a worker), otherwise loads only the tokenizer and config
(for a GGUF model: from its converted folder when a worker on this machine made one, else from
the GGUF file's metadata, without dequantising anything).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelNotFound
from .models import (
    _MODEL_CACHE,
    ALIASES,
    converted_gguf_folder,
    default_model_cache_dir,
    gguf_path,
    resolve_model,
)
from .random_models import MODEL_CONFIGS, random_model_name, tokenizer_dir


@dataclass(frozen=True)
class TokenCounter:
    """Enough of a model to tokenise a document as the engine will: its tokenizer (with the
    chat template) and its context length. Duck-types LoadedModel for document_prefix_ids."""

    model_id: str
    tokenizer: Any
    max_context: int

    def document_tokens(self, text: str) -> int:
        """How many tokens the document takes as the cached prefix (the system turn)."""
        from .engine import document_prefix_ids

        return len(document_prefix_ids(self, text))  # type: ignore[arg-type]


_COUNTERS: dict[str, TokenCounter] = {}
_LOCK = threading.Lock()


def get_token_counter(model_ref: str, *, cache_dir: str | Path | None = None) -> TokenCounter:
    """The tokenizer and context length of ``model_ref`` (cached per process); ``cache_dir`` is
    the model cache where GGUF conversions are looked for."""
    ref = ALIASES.get(model_ref, model_ref)
    with _LOCK:
        counter = _COUNTERS.get(ref)
        if counter is None:
            counter = _from_loaded(ref) or _load(ref, cache_dir)
            _COUNTERS[ref] = counter
        return counter


def _from_loaded(ref: str) -> TokenCounter | None:
    for key, loaded in list(_MODEL_CACHE.items()):
        if key[0] == ref and loaded.tokenizer is not None:
            return TokenCounter(loaded.model_id, loaded.tokenizer, loaded.max_context)
    return None


def _load(ref: str, cache_dir: str | Path | None) -> TokenCounter:
    from transformers import AutoConfig, AutoTokenizer

    random_name = random_model_name(ref)
    if random_name is not None:
        folder = tokenizer_dir(random_name)
        if folder is None:
            raise ModelNotFound(f"model {ref!r} has no tokenizer installed here", ref=ref)
        context = int(MODEL_CONFIGS[random_name]["max_position_embeddings"])
        return TokenCounter(ref, AutoTokenizer.from_pretrained(folder, local_files_only=True),
                            context)
    source = gguf_path(ref)
    if source is not None:
        root = Path(cache_dir) if cache_dir is not None else default_model_cache_dir()
        model_dir = converted_gguf_folder(source, root)
        if model_dir is None:  # not converted here: the same tokenizer, read from the file
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            return TokenCounter(ref, tokenizer, _gguf_context_length(source))
        model_id = ref
    else:
        found = resolve_model(ref, cache_dir=cache_dir)
        model_id, model_dir = found.model_id, found.folder
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    text_config = config.get_text_config(decoder=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return TokenCounter(model_id, tokenizer, int(text_config.max_position_embeddings))


def _gguf_context_length(source: Path) -> int:
    """``<architecture>.context_length`` from the GGUF header (transformers' config maps it to
    max_position_embeddings)."""
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = reader.get_field("general.architecture").contents()
    return int(reader.get_field(f"{architecture}.context_length").contents())
