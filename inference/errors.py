"""Errors raised by the KV engine. Each has a stable ``code`` that callers map to API errors."""

from __future__ import annotations


class KVError(Exception):
    """Base class of every error the engine raises on purpose."""

    code = "kv_error"

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.details = details

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, **self.details}


class ArtifactCorrupted(KVError):
    """The KV artifact's bytes do not match its recorded hash (or its header is unreadable)."""

    code = "artifact_corrupted"


class ArtifactTruncated(KVError):
    """The KV artifact file is shorter than its header says."""

    code = "artifact_truncated"


class ModelMismatch(KVError):
    """The KV artifact was computed by a different model, tokenizer or dtype."""

    code = "model_mismatch"


class UnsupportedVersion(KVError):
    """The KV artifact uses a format version this engine cannot read."""

    code = "unsupported_version"


class DocumentTooLong(KVError):
    """The document does not fit in the model's context window."""

    code = "document_too_long"


class UnsupportedArchitecture(KVError):
    """The model has no plain per-layer K/V cache (sliding window, hybrid or recurrent layers)."""

    code = "unsupported_architecture"


class PrecomputeCancelled(KVError):
    """The precompute was cancelled before it finished; nothing was written."""

    code = "precompute_cancelled"


class ArtifactNotFound(KVError):
    """No KV artifact with this key exists in any tier of the store."""

    code = "artifact_not_found"


class ModelNotFound(KVError):
    """The model reference names no local folder, GGUF file, installed package file or cached
    Hugging Face snapshot (the hub is not reached from here)."""

    code = "model_not_found"


class UnsupportedQuantization(KVError):
    """The GGUF file holds tensors in a quantisation type that cannot be dequantised here."""

    code = "unsupported_quantization"


class InvalidRequest(KVError):
    """The generation request is malformed."""

    code = "invalid_request"


__all__ = [
    "KVError",
    "ArtifactCorrupted",
    "ArtifactTruncated",
    "ModelMismatch",
    "UnsupportedVersion",
    "DocumentTooLong",
    "UnsupportedArchitecture",
    "PrecomputeCancelled",
    "ArtifactNotFound",
    "InvalidRequest",
    "ModelNotFound",
    "UnsupportedQuantization",
]
