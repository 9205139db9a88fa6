"""kvmarket's KV engine: a plain Python library (no Django) for token-exact KV-cache reuse.

Precompute a document's KV once, store it (GPU / host / disk / S3 tiers), continue generation
from it, and verify that reuse matches prefilling from scratch.
"""

from . import errors
from .artifact import ENGINE_VERSION, FORMAT_VERSION, KVArtifact, content_key, read_artifact
from .engine import (
    SAMPLING_DEFAULTS,
    Generation,
    PrecomputeResult,
    Timings,
    Usage,
    VerificationReport,
    cold_generate,
    document_prefix_ids,
    freeze_startup_heap,
    generate,
    generate_batch,
    generate_stream,
    inspect_artifact,
    precompute,
    precompute_ids,
    read_verification,
    verify,
    warm_up,
)
from .errors import (
    ArtifactCorrupted,
    ArtifactNotFound,
    ArtifactTruncated,
    DocumentTooLong,
    InvalidRequest,
    KVError,
    ModelMismatch,
    PrecomputeCancelled,
    UnsupportedArchitecture,
    UnsupportedVersion,
)
from .models import BUILTIN_MODEL_ID, LoadedModel, get_model, load_model, wrap_model
from .store import KVStore, S3Config

__all__ = [
    "BUILTIN_MODEL_ID",
    "SAMPLING_DEFAULTS",
    "ENGINE_VERSION",
    "FORMAT_VERSION",
    "ArtifactCorrupted",
    "ArtifactNotFound",
    "ArtifactTruncated",
    "DocumentTooLong",
    "Generation",
    "InvalidRequest",
    "KVArtifact",
    "KVError",
    "KVStore",
    "LoadedModel",
    "ModelMismatch",
    "PrecomputeCancelled",
    "PrecomputeResult",
    "S3Config",
    "Timings",
    "UnsupportedArchitecture",
    "UnsupportedVersion",
    "Usage",
    "VerificationReport",
    "cold_generate",
    "content_key",
    "document_prefix_ids",
    "errors",
    "freeze_startup_heap",
    "generate",
    "generate_batch",
    "generate_stream",
    "get_model",
    "inspect_artifact",
    "load_model",
    "precompute",
    "precompute_ids",
    "read_artifact",
    "read_verification",
    "verify",
    "warm_up",
    "wrap_model",
]
