"""PinnedArena: host memory pinned once and carved into artifact buffers (on CPU the same
bookkeeping runs on plain memory), and the store's reads from disk into it."""

from __future__ import annotations

import gc

import torch

from inference import KVStore, precompute
from inference.fastpath.transfer import HostPrefix, PinnedArena
from tests.inference.helpers import DOCS

PAGE = PinnedArena.ALIGN


def _inside(arena: PinnedArena, tensor: torch.Tensor) -> bool:
    start = arena._base
    return start <= tensor.data_ptr() < start + arena.nbytes


def test_a_block_comes_back_only_when_no_view_of_it_is_left():
    arena = PinnedArena(4 * PAGE, pin=False)
    buffer = arena.empty((2, PAGE // 4), torch.bfloat16)  # one page
    assert buffer.shape == (2, PAGE // 4) and buffer.dtype == torch.bfloat16
    assert _inside(arena, buffer) and arena.free_bytes == 3 * PAGE
    layer = buffer[1]  # what a request or the host tier keeps of it
    del buffer
    gc.collect()
    assert arena.free_bytes == 3 * PAGE  # the view still reads that memory
    layer.fill_(1.0)
    del layer
    gc.collect()
    assert arena.free_bytes == 4 * PAGE


def test_freed_neighbours_merge_into_one_range_for_a_larger_buffer():
    arena = PinnedArena(4 * PAGE, pin=False)
    blocks = [arena.empty((PAGE,), torch.uint8) for _ in range(4)]
    assert all(b is not None for b in blocks) and arena.empty((1,), torch.uint8) is None
    pointers = [b.data_ptr() for b in blocks]
    assert len(set(pointers)) == 4  # four distinct pages, no overlap
    del blocks[1:3]  # two neighbours in the middle
    gc.collect()
    both = arena.empty((2 * PAGE,), torch.uint8)  # needs them merged
    assert both is not None and both.data_ptr() == pointers[1]
    assert arena.empty((PAGE,), torch.uint8) is None  # and nothing else was free


def test_a_buffer_too_large_for_the_arena_is_allocated_on_its_own():
    arena = PinnedArena(PAGE, pin=False)
    host = HostPrefix.empty(2, 2, 64, 16, torch.float32, arena=arena)  # 32 KiB
    assert host.buffer.shape == (2, 2, 2, 64, 16) and not _inside(arena, host.buffer)
    small = HostPrefix.empty(1, 1, 4, 16, torch.float32, arena=arena)
    assert _inside(arena, small.buffer)


def test_store_reads_from_disk_into_its_arena_and_reuses_the_memory(loaded, tmp_path):
    root = tmp_path / "kv"
    precomputed = precompute(loaded, DOCS[0], store=KVStore(root))
    size = precomputed.bytes
    store = KVStore(root, host_bytes=4 * size, pinned_bytes=2 * size + 4 * PAGE)
    assert store.arena is None and "pinned_arena" not in store.stats()  # not at construction
    art, tier = store.load_with_tier(precomputed.key, loaded)
    assert tier == "disk"
    host = art.extras["host_prefix"]
    assert store.pin_host_memory() is store.arena  # the first read pinned it, once
    assert _inside(store.arena, host.buffer)
    first_pointer = host.buffer.data_ptr()
    reference = [k.clone() for k in art.keys]
    assert store.stats()["pinned_arena"]["free_bytes"] < 2 * size
    del art, host
    for _ in range(3):  # more reads than the arena holds at once: freed buffers are reused
        store.evict_memory()
        gc.collect()
        again, tier = store.load_with_tier(precomputed.key, loaded)
        assert tier == "disk" and _inside(store.arena, again.extras["host_prefix"].buffer)
        assert all(torch.equal(a, b) for a, b in zip(again.keys, reference, strict=True))
        del again
    store.evict_memory()
    gc.collect()
    reread = store.load(precomputed.key, loaded)
    assert reread.extras["host_prefix"].buffer.data_ptr() == first_pointer  # first fit again


def test_the_host_tier_makes_room_before_a_read_so_it_lands_in_the_arena(loaded, tmp_path):
    """Tier and arena hold one document: reading a second one evicts the first before the
    read (freeing its block), instead of after it, when the read would have found no room."""
    root = tmp_path / "kv"
    seed = KVStore(root)
    first, second = (precompute(loaded, doc, store=seed) for doc in DOCS[:2])
    room = max(first.bytes, second.bytes) + 2 * PAGE
    store = KVStore(root, host_bytes=room, pinned_bytes=room)
    store.load(first.key, loaded)
    gc.collect()
    art, tier = store.load_with_tier(second.key, loaded)
    assert tier == "disk" and list(store.host.items) == [second.key]
    assert _inside(store.arena, art.extras["host_prefix"].buffer)
    assert store.stats()["host"]["evictions"] == 1
    # A document larger than the tier evicts nothing: it could not be kept anyway.
    small = KVStore(root, host_bytes=first.bytes // 2, pinned_bytes=room)
    small.host.items["placeholder"] = art
    small.host.bytes = 1
    assert small.load_with_tier(first.key, loaded)[1] == "disk"
    assert "placeholder" in small.host.items
