"""Tiered KV store: GPU memory (hot), host memory (warm, pinned under CUDA), disk, optional S3.

Memory tiers are LRU by bytes under a budget and count hits/misses. Disk is the source of truth
and makes the store survive restarts: an artifact is found again by its key's path.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .artifact import SUFFIX, KVArtifact, check_manifest, read_artifact, write_artifact
from .errors import ArtifactNotFound, InvalidRequest
from .fastpath.transfer import PinnedArena

if TYPE_CHECKING:
    from .models import LoadedModel

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
VERIFY_SUFFIX = ".verify.json"


@dataclass
class S3Config:
    """S3-compatible object storage used as the coldest tier (needs boto3)."""

    bucket: str
    prefix: str = "kv/"
    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
        )

    def object_key(self, key: str) -> str:
        return f"{self.prefix}{key}{SUFFIX}"


def _ready_on_gpu(art: KVArtifact, loaded: LoadedModel) -> KVArtifact:
    """A GPU-tier artifact, checked against the model, the stream ordered after its copy to
    the GPU where another request's is still landing."""
    check_manifest(art.manifest, loaded)
    art.wait_ready()
    return art


class _MemoryTier:
    def __init__(self, name: str, budget: int) -> None:
        self.name = name
        self.budget = budget
        self.items: OrderedDict[str, KVArtifact] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> KVArtifact | None:
        art = self.items.get(key)
        if art is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return art

    def put(self, art: KVArtifact) -> bool:
        if art.nbytes > self.budget:
            return False
        if art.key in self.items:
            self.items.move_to_end(art.key)
            return True
        self.make_room(art.nbytes)
        self.items[art.key] = art
        self.bytes += art.nbytes
        return True

    def make_room(self, nbytes: int) -> None:
        """Evict the least recently used items until nbytes more fit in the budget."""
        while self.items and self.bytes + nbytes > self.budget:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1

    def discard(self, key: str) -> None:
        art = self.items.pop(key, None)
        if art is not None:
            self.bytes -= art.nbytes

    def stats(self) -> dict[str, int]:
        return {
            "bytes": self.bytes,
            "items": len(self.items),
            "budget_bytes": self.budget,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


class KVStore:
    """Where KV artifacts live. Thread-safe; loads of one key are not duplicated."""

    def __init__(
        self,
        root: str | Path,
        *,
        gpu_bytes: int = 0,
        host_bytes: int = 512 << 20,
        pinned_bytes: int | None = None,
        s3: S3Config | None = None,
    ) -> None:
        """pinned_bytes: host memory, pinned once, that reads from disk land in (default: the
        host tier's budget when CUDA is present, else none). Without it a document's first
        read pins its own buffer, which costs more than the read. It is pinned by
        pin_host_memory() (a GPU worker's start) or else by the first read from disk, never
        at construction: a process that only serves files must not open a CUDA context."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.gpu = _MemoryTier("gpu", gpu_bytes if torch.cuda.is_available() else 0)
        self.host = _MemoryTier("host", host_bytes)
        if pinned_bytes is None:
            pinned_bytes = host_bytes if torch.cuda.is_available() else 0
        self.pinned_bytes = pinned_bytes
        self._arena: PinnedArena | None = None
        self.s3 = s3
        self._s3_client: Any = None
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._counters = {"disk_hits": 0, "disk_misses": 0, "s3_hits": 0, "s3_misses": 0}

    # -- pinned host memory ----------------------------------------------------------------
    @property
    def arena(self) -> PinnedArena | None:
        """The pinned arena, once pinned (None before, and in stores without one)."""
        return self._arena

    def pin_host_memory(self) -> PinnedArena | None:
        """Pin the arena now (seconds per ten GiB) if the store has one; idempotent."""
        if self._arena is None and self.pinned_bytes > 0:
            with self._lock:
                if self._arena is None:
                    self._arena = PinnedArena(self.pinned_bytes)
        return self._arena

    # -- paths ---------------------------------------------------------------------------
    @staticmethod
    def check_key(key: str) -> str:
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise InvalidRequest(f"not a KV artifact key: {key!r}")
        return key

    def path(self, key: str) -> Path:
        self.check_key(key)
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def verification_path(self, key: str) -> Path:
        self.check_key(key)
        return self.root / key[:2] / f"{key}{VERIFY_SUFFIX}"

    def contains(self, key: str) -> bool:
        """True when the artifact is on disk (or in S3, when configured)."""
        if self.path(key).is_file():
            return True
        return self._s3_exists(key)

    def keys(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"??/*{SUFFIX}"))

    # -- writes --------------------------------------------------------------------------
    def put(
        self,
        artifact: KVArtifact,
        loaded: LoadedModel | None = None,
        *,
        device_artifact: KVArtifact | None = None,
    ) -> int:
        """Write to disk (and S3); warm the memory tiers. Returns the file size.

        ``artifact`` should be on the host; ``device_artifact`` (same content, on the GPU) lets
        the GPU tier keep the tensors precompute already produced instead of copying back.
        """
        if artifact.device.type != "cpu":
            device_artifact = device_artifact or artifact
            artifact = artifact.to("cpu", pin=True)
        path = self.path(artifact.key)
        size = write_artifact(path, artifact)
        if self.s3 is not None:
            self._client().upload_file(str(path), self.s3.bucket, self.s3.object_key(artifact.key))
        with self._lock:
            self.host.put(artifact)
            if loaded is not None and loaded.device.startswith("cuda") and self.gpu.budget:
                self.gpu.put(device_artifact or artifact.to(loaded.device))
        return size

    def delete(self, key: str) -> None:
        with self._lock:
            self.gpu.discard(key)
            self.host.discard(key)
        self.path(key).unlink(missing_ok=True)
        self.verification_path(key).unlink(missing_ok=True)
        if self.s3 is not None:
            self._client().delete_object(Bucket=self.s3.bucket, Key=self.s3.object_key(key))

    # -- reads ---------------------------------------------------------------------------
    def load(self, key: str, loaded: LoadedModel) -> KVArtifact:
        """The artifact for ``key``, checked against ``loaded``, from its fastest tier."""
        return self.load_with_tier(key, loaded)[0]

    def load_with_tier(
        self, key: str, loaded: LoadedModel, *, overlap: bool = False
    ) -> tuple[KVArtifact, str]:
        """The artifact and the tier it came from. A copy to the GPU may still be in flight
        only with overlap=True: the caller then waits per layer (artifact.extras
        ["layer_ready"]) or calls wait_ready(); every other caller gets it ready."""
        self.check_key(key)
        on_gpu = loaded.device.startswith("cuda") and self.gpu.budget > 0
        if on_gpu:  # a hot artifact: no read to serialise, so no per-key lock
            with self._lock:
                art = self.gpu.get(key)
            if art is not None:
                return _ready_on_gpu(art, loaded), "gpu"
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                # Another request may have brought it in while this one waited for the key
                # (its miss is counted once, above).
                art = self.gpu.get(key) if on_gpu and key in self.gpu.items else None
                host_art = None if art is not None else self.host.get(key)
            if art is not None:
                return _ready_on_gpu(art, loaded), "gpu"
            tier = "host"
            if host_art is not None:
                check_manifest(host_art.manifest, loaded)
            else:
                incoming = self._file_bytes(key)
                # Evictions before the read free arena blocks for it (an artifact the tier
                # cannot keep anyway evicts nothing).
                if self.pin_host_memory() is not None and incoming <= self.host.budget:
                    with self._lock:
                        self.host.make_room(incoming)
                host_art, tier = self._load_cold(key, loaded)
                if torch.cuda.is_available():
                    host_art = host_art.to("cpu", pin=True)
                with self._lock:
                    self.host.put(host_art)
            if on_gpu:
                gpu_art = host_art.to(loaded.device)
                if not overlap:
                    gpu_art.wait_ready()
                with self._lock:
                    self.gpu.put(gpu_art)
                return gpu_art, tier
            return host_art, tier

    def _file_bytes(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return 0

    def _load_cold(self, key: str, loaded: LoadedModel) -> tuple[KVArtifact, str]:
        path = self.path(key)
        if path.is_file():
            self._counters["disk_hits"] += 1
            return read_artifact(path, loaded, arena=self._arena), "disk"
        self._counters["disk_misses"] += 1
        if self.s3 is not None and self._s3_download(key, path):
            self._counters["s3_hits"] += 1
            return read_artifact(path, loaded, arena=self._arena), "s3"
        if self.s3 is not None:
            self._counters["s3_misses"] += 1
        raise ArtifactNotFound(f"no KV artifact with key {key}", key=key)

    def evict_memory(self, tiers: tuple[str, ...] = ("gpu", "host")) -> None:
        """Drop in-memory copies (disk and S3 stay): used by benches and tests."""
        with self._lock:
            for tier in (self.gpu, self.host):
                if tier.name in tiers:
                    for key in list(tier.items):
                        tier.discard(key)

    def memory_keys(self) -> list[str]:
        """Keys held in GPU or pinned host memory (hot: served without a disk read)."""
        with self._lock:
            return list(dict.fromkeys([*self.gpu.items, *self.host.items]))

    def stats(self) -> dict[str, Any]:
        files = list(self.root.glob(f"??/*{SUFFIX}"))
        with self._lock:
            out: dict[str, Any] = {"gpu": self.gpu.stats(), "host": self.host.stats()}
        out["disk"] = {
            "bytes": sum(p.stat().st_size for p in files if p.exists()),
            "items": len(files),
            "hits": self._counters["disk_hits"],
            "misses": self._counters["disk_misses"],
        }
        if self.s3 is not None:
            out["s3"] = {"hits": self._counters["s3_hits"], "misses": self._counters["s3_misses"]}
        if self._arena is not None:
            arena = self._arena
            out["pinned_arena"] = {"bytes": arena.nbytes, "free_bytes": arena.free_bytes}
        return out

    # -- S3 ------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self._s3_client is None:
            assert self.s3 is not None
            self._s3_client = self.s3.client()
        return self._s3_client

    def _s3_exists(self, key: str) -> bool:
        if self.s3 is None:
            return False
        try:
            self._client().head_object(Bucket=self.s3.bucket, Key=self.s3.object_key(key))
            return True
        except Exception:  # botocore ClientError (404) or a connection error: treat as absent
            return False

    def _s3_download(self, key: str, path: Path) -> bool:
        assert self.s3 is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            self._client().download_file(self.s3.bucket, self.s3.object_key(key), tmp)
            os.replace(tmp, path)
            return True
        except Exception:  # missing object or transport error: the caller reports not found
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
