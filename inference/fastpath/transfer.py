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

import ctypes
import hashlib
import json
import math
import os
import struct
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.errors import ArtifactCorrupted
from inference.fastpath.model import PrefixKV

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_PIECE = 16 << 20  # bytes per pread call: big enough for throughput, small enough to spread


class PinnedArena:
    """Host memory pinned once, carved into artifact buffers.

    Why: pinning is slow. cudaHostAlloc maps and locks every page, which for a long document's
    artifact costs more than prefilling it, so pinning on a document's first read from disk
    would cost more than it saves. torch's pinned cache only helps for a size it has
    already seen freed, and it rounds every buffer up to a power of two. The arena is pinned
    when the store starts (a worker's start) and reused for every read.

    A buffer's block returns to the arena when the last tensor on its memory is gone. A copy to
    the GPU may still be reading it then, so freed blocks wait aside and are reused only after
    a device synchronise, done when the never-used space runs out (once per turnover of the
    arena, on a read from disk, which is slower than the wait). Without CUDA (tests) the same
    bookkeeping runs on plain memory.
    """

    ALIGN = 4096  # page-aligned buffers: large DMA copies and O_DIRECT-friendly

    def __init__(self, nbytes: int, *, pin: bool | None = None) -> None:
        self.nbytes = nbytes
        self._memory = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned = torch.cuda.is_available() if pin is None else pin
        if self.pinned:
            # Registered rather than allocated pinned: torch's pinned allocator would round the
            # arena up to a power of two.
            err = torch.cuda.cudart().cudaHostRegister(self._memory.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed ({err})")
            weakref.finalize(self, _unregister, self._memory.data_ptr()).atexit = False
        self._base = self._memory.data_ptr()
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), by offset
        self._released: list[tuple[int, int]] = []  # freed since the last synchronise
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        """Bytes not held by a live buffer (freed ones included)."""
        return sum(size for _, size in self._free) + sum(size for _, size in self._released)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised tensor in the arena, or None when no free range is large enough
        (the caller falls back to a pinned allocation of its own)."""
        nbytes = math.prod(shape) * dtype.itemsize
        size = max(self.ALIGN, -(-nbytes // self.ALIGN) * self.ALIGN)
        with self._lock:
            offset = self._take(size)
            if offset is None and self._released:
                # Taken first, then synchronised: every copy from a block in the list was
                # queued before its release, so before the synchronise.
                released, self._released = self._released, []
                if self.pinned:  # copies from the freed blocks may still be in flight
                    torch.cuda.synchronize()
                for block in released:
                    self._give_back(*block)
                offset = self._take(size)
        if offset is None:
            return None
        # The tensor owns a numpy array over its range, so its storage (every view of it)
        # keeps the array alive, and the array's end is the block's release.
        raw = (ctypes.c_uint8 * size).from_address(self._base + offset)
        array = np.frombuffer(raw, dtype=np.uint8)
        # (The finalizer holds the arena, so the arena outlives every buffer in it.)
        weakref.finalize(array, self._release, offset, size).atexit = False
        return torch.from_numpy(array)[:nbytes].view(dtype).view(shape)

    def _release(self, offset: int, size: int) -> None:
        # No lock: the garbage collector may run this inside empty(), in the same thread.
        self._released.append((offset, size))

    def _take(self, size: int) -> int | None:
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                return offset
        return None

    def _give_back(self, offset: int, size: int) -> None:
        """Return a range to the free list, merged with its free neighbours."""
        blocks = sorted([*self._free, (offset, size)])
        merged = [blocks[0]]
        for start, length in blocks[1:]:
            last_start, last_length = merged[-1]
            if last_start + last_length == start:
                merged[-1] = (last_start, last_length + length)
            else:
                merged.append((start, length))
        self._free = merged


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


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
        cls,
        n_layers: int,
        kv_heads: int,
        n_tokens: int,
        head_dim: int,
        dtype: torch.dtype,
        *,
        arena: PinnedArena | None = None,
    ) -> HostPrefix:
        """An uninitialised buffer, from the arena when given and it has room, else pinned
        (with CUDA) on its own."""
        shape = (n_layers, 2, kv_heads, n_tokens, head_dim)
        buffer = None if arena is None else arena.empty(shape, dtype)
        if buffer is None:
            buffer = torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
        return cls(buffer)

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
    arena: PinnedArena | None = None,
) -> HostPrefix:
    """Read an artifact's K/V tensors into one pinned buffer with parallel preads.

    tensor_sha256 (name -> hex), when given, is checked per tensor in the reading threads, so
    verification runs at the speed of many cores instead of one sha256 stream.
    on_layer(i, host) is called in this thread, in layer order, once layer i is in host memory.
    into: a host buffer of the right shape to reuse (its GPU graphs stay valid).
    arena: where a new buffer comes from (already pinned memory), when it has room.
    """
    path = Path(path)
    layout = _layout(path)
    host = into or HostPrefix.empty(layout.n_layers, *layout.shape, layout.dtype, arena=arena)
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
