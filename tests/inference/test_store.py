"""KVStore: tiers, LRU by bytes, hit counters, restart, delete, optional S3."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from inference import ArtifactNotFound, KVStore, S3Config, generate, precompute
from tests.inference.helpers import DOCS


def _precompute_all(loaded, store, docs):
    return [precompute(loaded, d, store=store).key for d in docs]


def test_restart_finds_artifacts_on_disk(loaded, tmp_path):
    root = tmp_path / "kv"
    key = precompute(loaded, DOCS[0], store=KVStore(root)).key
    reopened = KVStore(root)  # a new process: empty memory tiers
    assert reopened.contains(key) and reopened.keys() == [key]
    art, tier = reopened.load_with_tier(key, loaded)
    assert tier == "disk"
    assert reopened.load_with_tier(key, loaded)[1] == "host"
    gen = generate(loaded, reopened, key, prompt="The", max_tokens=2)
    assert gen.cache_tier == "host"
    stats = reopened.stats()
    assert stats["disk"]["hits"] == 1 and stats["host"]["hits"] >= 2
    assert stats["disk"]["items"] == 1 and stats["disk"]["bytes"] > art.nbytes


def test_host_tier_lru_by_bytes(loaded, tmp_path):
    root = tmp_path / "kv"
    keys = _precompute_all(loaded, KVStore(root), DOCS[:3])
    probe = KVStore(root)
    sizes = [probe.load(k, loaded).nbytes for k in keys]
    budget = sizes[0] + sizes[1] + sizes[2] // 2  # room for two of the three
    store = KVStore(root, host_bytes=budget)
    store.load(keys[0], loaded)
    store.load(keys[1], loaded)
    store.load(keys[0], loaded)  # keys[0] is now the most recently used
    store.load(keys[2], loaded)  # evicts keys[1], the least recently used
    assert set(store.host.items) == {keys[0], keys[2]}
    stats = store.stats()["host"]
    assert stats["evictions"] == 1 and stats["bytes"] <= budget
    assert stats["hits"] == 1 and stats["misses"] == 3
    assert store.load_with_tier(keys[1], loaded)[1] == "disk"


def test_artifact_larger_than_budget_is_served_from_disk(loaded, tmp_path):
    store = KVStore(tmp_path / "kv", host_bytes=10)
    key = precompute(loaded, DOCS[1], store=store).key
    assert store.stats()["host"]["items"] == 0
    assert store.load_with_tier(key, loaded)[1] == "disk"
    assert store.load_with_tier(key, loaded)[1] == "disk"


def test_gpu_tier_is_off_without_cuda(tmp_path):
    import torch

    store = KVStore(tmp_path, gpu_bytes=1 << 30)
    assert store.gpu.budget == (1 << 30 if torch.cuda.is_available() else 0)


def test_delete(loaded, store):
    key = precompute(loaded, DOCS[2], store=store).key
    store.verification_path(key).write_text("{}")
    store.delete(key)
    assert not store.contains(key)
    assert not store.verification_path(key).exists()
    with pytest.raises(ArtifactNotFound):
        store.load(key, loaded)


def test_concurrent_first_loads_read_disk_once(loaded, tmp_path):
    root = tmp_path / "kv"
    key = precompute(loaded, DOCS[3], store=KVStore(root)).key
    store = KVStore(root)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.load(key, loaded)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(a) for a in results}) == 1
    assert store.stats()["disk"]["hits"] == 1


class FakeS3:
    """In-memory stand-in for a boto3 S3 client (the calls KVStore makes)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def upload_file(self, filename: str, bucket: str, key: str) -> None:
        self.objects[(bucket, key)] = Path(filename).read_bytes()

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        if (bucket, key) not in self.objects:
            raise FileNotFoundError(key)
        Path(filename).write_bytes(self.objects[(bucket, key)])

    def head_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 (boto3 names)
        if (Bucket, Key) not in self.objects:
            raise FileNotFoundError(Key)
        return {}

    def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803
        self.objects.pop((Bucket, Key), None)


def test_s3_tier(loaded, tmp_path, monkeypatch):
    fake = FakeS3()
    monkeypatch.setattr(S3Config, "client", lambda self: fake)
    config = S3Config(bucket="kv", prefix="artifacts/")
    key = precompute(loaded, DOCS[4], store=KVStore(tmp_path / "a", s3=config)).key
    assert ("kv", f"artifacts/{key}.safetensors") in fake.objects
    other_host = KVStore(tmp_path / "b", s3=config)  # empty local disk
    assert other_host.contains(key)
    art, tier = other_host.load_with_tier(key, loaded)
    assert tier == "s3" and art.key == key
    assert other_host.path(key).is_file()  # cached on local disk afterwards
    assert other_host.stats()["s3"]["hits"] == 1
    other_host.delete(key)
    assert not fake.objects
