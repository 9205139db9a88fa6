"""KV artifacts: content-addressed safetensors files holding one document's K/V cache.

Layout: tensors ``layers.{i}.keys`` / ``layers.{i}.values`` of shape [kv_heads, seq, head_dim] in
the model's dtype, ``token_ids`` (int64, [seq]); the safetensors metadata holds
``format`` / ``format_version`` and a JSON ``manifest`` plus its sha256, so a flipped byte
anywhere (payload or manifest) is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ArtifactCorrupted, ArtifactTruncated, ModelMismatch, UnsupportedVersion

if TYPE_CHECKING:
    from .fastpath.transfer import PinnedArena
    from .models import LoadedModel

FORMAT = "kvmarket-kv"
FORMAT_VERSION = "1"
ENGINE_VERSION = "kvmarket-inference/0.1.0"
SUFFIX = ".safetensors"


def content_key(
    model_fingerprint: str, tokenizer_fingerprint: str, dtype: str, token_ids: list[int]
) -> str:
    """The content address: sha256 over (model, tokenizer, dtype, token ids)."""
    digest = hashlib.sha256(b"kvmarket-kv-key-v1\0")
    for part in (model_fingerprint, tokenizer_fingerprint, dtype):
        digest.update(part.encode() + b"\0")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of one tensor's raw bytes: checked per tensor, in parallel, by the fast reader."""
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{str(tensor.dtype)}:{list(tensor.shape)}\0".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


@dataclass
class KVArtifact:
    """One document's K/V cache. Its tensors are shared between requests and never mutated."""

    key: str
    manifest: dict[str, Any]
    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    nbytes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {
            "token_ids": torch.tensor(self.token_ids, dtype=torch.int64)
        }
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            out[f"layers.{i}.keys"] = k
            out[f"layers.{i}.values"] = v
        return out

    def to(self, device: str | torch.device, *, pin: bool = False) -> KVArtifact:
        """A copy on another device (pinned host memory when ``pin`` and CUDA are available)."""

        pin = pin and torch.device(device).type == "cpu" and torch.cuda.is_available()
        host = self.extras.get("host_prefix")
        if host is not None and pin and host.buffer.is_pinned():
            return self  # already in pinned host memory, in one buffer
        if host is not None and torch.device(device).type == "cuda":
            # Large copies of the contiguous buffer, one per layer on a side stream, each with
            # an event: the fast path starts computing on the first layers while the later
            # ones are still in flight. Every other reader calls wait_ready() first.
            landing = host.to_device(torch.device(device), overlap=True)
            buffer = landing.buffer
            return KVArtifact(
                key=self.key, manifest=self.manifest, token_ids=self.token_ids,
                keys=[buffer[i, 0] for i in range(buffer.shape[0])],
                values=[buffer[i, 1] for i in range(buffer.shape[0])],
                nbytes=self.nbytes,
                extras={"layer_ready": landing.ready},
            )

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin:  # allocate pinned and copy once (pin_memory() would copy twice)
                return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t)
            return t.to(device, copy=True)

        return KVArtifact(
            key=self.key,
            manifest=self.manifest,
            token_ids=self.token_ids,
            keys=[move(k) for k in self.keys],
            values=[move(v) for v in self.values],
            nbytes=self.nbytes,
        )

    def landing(self) -> list[torch.cuda.Event] | None:
        """The per-layer events of a copy to the GPU still in flight, else None. Once the copy
        has landed its events are dropped: later requests make no CUDA call for them (before,
        every hot request queried the last event and queued two stream waits on it)."""
        events = self.extras.get("layer_ready")
        if events and events[-1].query():  # the last layer is in: every layer is
            self.extras.pop("layer_ready", None)
            return None
        return events or None

    def wait_ready(self) -> None:
        """Order the current CUDA stream after a copy to the GPU still in flight (a wait on
        the GPU, not on the host). Free when there is none or it has landed."""
        events = self.landing()
        if events:
            torch.cuda.current_stream(self.device).wait_event(events[-1])

    def check_model(self, loaded: LoadedModel) -> None:
        check_manifest(self.manifest, loaded)


def tensor_nbytes(keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in (*keys, *values))


def build_manifest(
    *,
    key: str,
    loaded: LoadedModel,
    token_ids: list[int],
    payload_hash: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "model_id": loaded.model_id,
        "model_fingerprint": loaded.fingerprint,
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "dtype": loaded.dtype,
        "n_layers": loaded.n_layers,
        "n_kv_heads": loaded.n_kv_heads,
        "head_dim": loaded.head_dim,
        "n_tokens": len(token_ids),
        "payload_sha256": payload_hash,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine_version": ENGINE_VERSION,
        **(extra or {}),
    }


def check_manifest(manifest: dict[str, Any], loaded: LoadedModel) -> None:
    """Refuse an artifact that another model, tokenizer or dtype produced."""
    checks = [
        ("model_fingerprint", loaded.fingerprint),
        ("tokenizer_fingerprint", loaded.tokenizer_fingerprint),
        ("dtype", loaded.dtype),
        ("n_layers", loaded.n_layers),
    ]
    for name, expected in checks:
        if manifest.get(name) != expected:
            raise ModelMismatch(
                f"artifact {name} is {manifest.get(name)!r}, the loaded model "
                f"{loaded.model_id!r} has {expected!r}",
                field=name,
            )


def write_artifact(path: str | Path, artifact: KVArtifact) -> int:
    """Write atomically (temp file in the same folder, fsync, os.replace); returns bytes written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().to("cpu").contiguous() for name, t in artifact.tensors().items()
    }
    # Per-tensor hashes let a reader verify with many threads; the manifest (and so these
    # hashes) is itself covered by manifest_sha256.
    manifest = dict(artifact.manifest)
    if manifest.get("tensor_sha256", {}) == {}:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = pool.map(tensor_sha256, tensors.values())  # hashlib releases the GIL
            manifest["tensor_sha256"] = dict(zip(tensors, digests, strict=True))
    manifest_json = json.dumps(manifest, sort_keys=True)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "manifest": manifest_json,
        "manifest_sha256": hashlib.sha256(manifest_json.encode()).hexdigest(),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header; returns (header, expected file size). Checks the length."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ArtifactTruncated(f"{path.name}: {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > 100 << 20:
            raise ArtifactCorrupted(f"{path.name}: implausible header length {header_len}")
        raw = fh.read(header_len)
    if len(raw) < header_len:
        raise ArtifactTruncated(f"{path.name}: header cut short ({size} bytes on disk)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactCorrupted(f"{path.name}: unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise ArtifactCorrupted(f"{path.name}: header is not an object")
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ArtifactCorrupted(f"{path.name}: malformed tensor table") from exc
    expected = 8 + header_len + data_end
    if size < expected:
        raise ArtifactTruncated(
            f"{path.name}: {size} bytes on disk, header describes {expected}",
            expected_bytes=expected,
            actual_bytes=size,
        )
    if size > expected:
        raise ArtifactCorrupted(f"{path.name}: {size - expected} unexpected trailing bytes")
    return header, expected


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check the manifest only (cheap: no tensor data is read)."""
    header, _ = read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ArtifactCorrupted(f"{Path(path).name}: not a kvmarket KV artifact")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"artifact format version {meta.get('format_version')!r}; this engine reads "
            f"version {FORMAT_VERSION}",
            version=meta.get("format_version"),
        )
    manifest_json = meta.get("manifest", "")
    if hashlib.sha256(manifest_json.encode()).hexdigest() != meta.get("manifest_sha256"):
        raise ArtifactCorrupted(f"{Path(path).name}: manifest does not match its hash")
    return json.loads(manifest_json)


def _read_verified_per_tensor(
    path: Path, manifest: dict[str, Any], arena: PinnedArena | None = None
) -> KVArtifact:
    """Parallel preads straight into one (pinned, with CUDA) host buffer, each tensor's hash
    checked in the reading threads: many cores instead of one sha256 stream."""
    from .fastpath.transfer import read_artifact_into_host

    hashes = manifest["tensor_sha256"]
    header, _ = read_header(path)
    n_layers = int(manifest["n_layers"])
    expected = {"token_ids"} | {f"layers.{i}.{kind}" for i in range(n_layers)
                                for kind in ("keys", "values")}
    if set(header) - {"__metadata__"} != expected or set(hashes) != expected:
        raise ArtifactCorrupted(f"{path.name}: tensor table does not match the manifest")
    # One reader per core up to 16: each thread also hashes what it reads, which is CPU-bound.
    host = read_artifact_into_host(path, threads=min(16, os.cpu_count() or 1),
                                   tensor_sha256=hashes, arena=arena)
    start, end = header["token_ids"]["data_offsets"]
    with path.open("rb") as fh:
        fh.seek(8 + struct.unpack("<Q", fh.read(8))[0] + start)
        raw = fh.read(end - start)
    if hashlib.sha256(raw).hexdigest() != hashes["token_ids"]:
        raise ArtifactCorrupted(f"{path.name}: tensor token_ids does not match its hash")
    token_ids = list(struct.unpack(f"<{len(raw) // 8}q", raw))
    layers = host.layers().layers
    return KVArtifact(
        key=manifest["key"],
        manifest=manifest,
        token_ids=token_ids,
        keys=[k for k, _ in layers],
        values=[v for _, v in layers],
        nbytes=host.nbytes,
        extras={"host_prefix": host},
    )


def read_artifact(
    path: str | Path,
    loaded: LoadedModel | None = None,
    *,
    device: str | None = None,
    arena: PinnedArena | None = None,
) -> KVArtifact:
    """Read, verify the payload hash and (given ``loaded``) that the manifest matches the model.
    arena: already pinned host memory to read into (artifacts with per-tensor hashes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if loaded is not None:
        check_manifest(manifest, loaded)
    if manifest.get("tensor_sha256"):
        art = _read_verified_per_tensor(path, manifest, arena)
        return art if device in (None, "cpu") else art.to(device)
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ArtifactCorrupted(f"{path.name}: {exc}") from exc
    if payload_sha256(tensors) != manifest.get("payload_sha256"):
        raise ArtifactCorrupted(f"{path.name}: tensor payload does not match its sha256")
    n_layers = int(manifest["n_layers"])
    try:
        keys = [tensors[f"layers.{i}.keys"] for i in range(n_layers)]
        values = [tensors[f"layers.{i}.values"] for i in range(n_layers)]
        token_ids = tensors["token_ids"].tolist()
    except KeyError as exc:
        raise ArtifactCorrupted(f"{path.name}: missing tensor {exc}") from exc
    if device is not None and device != "cpu":
        keys = [k.to(device) for k in keys]
        values = [v.to(device) for v in values]
    return KVArtifact(
        key=manifest["key"],
        manifest=manifest,
        token_ids=token_ids,
        keys=keys,
        values=values,
        nbytes=tensor_nbytes(keys, values),
    )
