"""Moving a prefix KV between tiers fast: disk -> pinned host memory -> GPU memory.

* One contiguous pinned buffer per artifact, laid out [layers, 2 (k, v), kv_heads, tokens,
  head_dim], so host-to-GPU is a few large DMA copies at full PCIe speed.
* Files are read straight into that pinned buffer by parallel pread calls (they release the
  GIL), tensor by tensor in layer order, and each layer's hash is checked in the same threads.
* Each layer is copied on a side stream as soon as it is in host memory, with an event per
  layer: the forward waits for layer i's event just before layer i's attention, so the copy of
  later layers overlaps the compute of earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.errors import ArtifactCorrupted
from inference.fastpath.model import PrefixKV

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_PIECE = 16 << 20  # bytes per pread call: big enough for throughput, small enough to spread


@dataclass
class DevicePrefix:
    prefix: PrefixKV
    ready: list[torch.cuda.Event] | None  # per layer; None when already complete
    buffer: torch.Tensor


class HostPrefix:
    """A prefix KV in one (pinned when CUDA is present) host buffer."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer  # [L, 2, H, T, D]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @classmethod
    def empty(
        cls, n_layers: int, kv_heads: int, n_tokens: int, head_dim: int, dtype: torch.dtype
    ) -> HostPrefix:
        shape = (n_layers, 2, kv_heads, n_tokens, head_dim)
        return cls(torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available()))

    @classmethod
    def from_layers(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> HostPrefix:
        h, t, d = layers[0][0].shape
        host = cls.empty(len(layers), h, t, d, layers[0][0].dtype)
        for i, (k, v) in enumerate(layers):
            host.buffer[i, 0].copy_(k)
            host.buffer[i, 1].copy_(v)
        return host

    def layers(self) -> PrefixKV:
        return PrefixKV(
            [(self.buffer[i, 0], self.buffer[i, 1]) for i in range(self.buffer.shape[0])]
        )

    def to_device(
        self, device: torch.device, *, out: torch.Tensor | None = None, overlap: bool = True
    ) -> DevicePrefix:
        """Copy to the GPU; with overlap, return per-layer events instead of waiting."""
        target = out if out is not None else torch.empty_like(self.buffer, device=device)
        if not overlap:
            target.copy_(self.buffer, non_blocking=True)
            return DevicePrefix(_views(target), None, target)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        events = []
        with torch.cuda.stream(stream):
            for i in range(self.buffer.shape[0]):
                target[i].copy_(self.buffer[i], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                events.append(event)
        target.record_stream(stream)  # freed early, its memory still waits for the copies
        return DevicePrefix(_views(target), events, target)


def _views(buffer: torch.Tensor) -> PrefixKV:
    return PrefixKV([(buffer[i, 0], buffer[i, 1]) for i in range(buffer.shape[0])])


@dataclass
class _Layout:
    header: dict
    base: int
    n_layers: int
    shape: tuple[int, int, int]  # kv_heads, tokens, head_dim
    dtype: torch.dtype


def _layout(path: Path) -> _Layout:
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    first = header["layers.0.keys"]
    return _Layout(
        header=header,
        base=8 + header_len,
        n_layers=sum(1 for name in header if name.endswith(".keys")),
        shape=tuple(first["shape"]),
        dtype=_DTYPES[first["dtype"]],
    )


def read_artifact_into_host(
    path: str | Path,
    *,
    threads: int = 8,
    tensor_sha256: dict[str, str] | None = None,
    on_layer: Callable[[int, HostPrefix], None] | None = None,
    into: HostPrefix | None = None,
) -> HostPrefix:
    """Read an artifact's K/V tensors into one pinned buffer with parallel preads.

    tensor_sha256 (name -> hex), when given, is checked per tensor in the reading threads, so
    verification runs at the speed of many cores instead of one sha256 stream.
    on_layer(i, host) is called in this thread, in layer order, once layer i is in host memory.
    into: a host buffer of the right shape to reuse (its GPU graphs stay valid).
    """
    path = Path(path)
    layout = _layout(path)
    host = into or HostPrefix.empty(layout.n_layers, *layout.shape, layout.dtype)
    if tuple(host.buffer.shape) != (layout.n_layers, 2, *layout.shape):
        raise ValueError("the host buffer does not match the artifact's shape")
    flat = host.buffer.view(torch.uint8).view(layout.n_layers, 2, -1).numpy()
    fd = os.open(path, os.O_RDONLY)

    def read_tensor(name: str, layer: int, kind: int) -> None:
        start, end = layout.header[name]["data_offsets"]
        dest = memoryview(flat[layer, kind])
        if len(dest) != end - start:
            raise ArtifactCorrupted(f"{path.name}: tensor {name} has an unexpected size")
        digest = hashlib.sha256() if tensor_sha256 is not None else None
        for offset in range(0, end - start, _PIECE):
            piece = dest[offset : offset + _PIECE]
            if os.preadv(fd, [piece], layout.base + start + offset) != len(piece):
                raise ArtifactCorrupted(f"{path.name}: short read in {name}")
            if digest is not None:
                digest.update(piece)
        if digest is not None and digest.hexdigest() != tensor_sha256.get(name):
            raise ArtifactCorrupted(f"{path.name}: tensor {name} does not match its hash")

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [
                [
                    pool.submit(read_tensor, f"layers.{i}.{kind}", i, j)
                    for j, kind in enumerate(("keys", "values"))
                ]
                for i in range(layout.n_layers)
            ]
            for i, pair in enumerate(futures):
                for future in pair:
                    future.result()
                if on_layer is not None:
                    on_layer(i, host)
    finally:
        os.close(fd)
    return host
