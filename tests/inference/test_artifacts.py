"""Artifact format and refusals: each failure has its own error and leaves nothing on disk."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from inference import (
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
    content_key,
    document_prefix_ids,
    errors,
    generate,
    precompute,
    read_artifact,
    wrap_model,
)
from inference.artifact import KVArtifact, read_manifest, write_artifact
from inference.models import check_architecture
from tests.inference.helpers import DOCS, files_under

DOC = DOCS[0]


@pytest.fixture
def artifact_path(loaded, store):
    result = precompute(loaded, DOC, store=store)
    store.evict_memory()  # force the next load to read the file
    return result.key, store.path(result.key)


def test_error_codes_are_stable():
    expected = {
        "ArtifactCorrupted": "artifact_corrupted",
        "ArtifactTruncated": "artifact_truncated",
        "ModelMismatch": "model_mismatch",
        "UnsupportedVersion": "unsupported_version",
        "DocumentTooLong": "document_too_long",
        "UnsupportedArchitecture": "unsupported_architecture",
        "PrecomputeCancelled": "precompute_cancelled",
        "ArtifactNotFound": "artifact_not_found",
        "InvalidRequest": "invalid_request",
    }
    for name, code in expected.items():
        cls = getattr(errors, name)
        assert issubclass(cls, KVError) and cls.code == code
        assert cls("boom").to_dict() == {"code": code, "message": "boom"}


def test_manifest_and_layout(loaded, store, artifact_path):
    key, path = artifact_path
    manifest = read_manifest(path)
    ids = document_prefix_ids(loaded, DOC)
    assert key == content_key(loaded.fingerprint, loaded.tokenizer_fingerprint, "float32", ids)
    assert manifest["key"] == key and manifest["n_tokens"] == len(ids)
    for field in ("model_id", "model_fingerprint", "tokenizer_fingerprint", "dtype", "n_layers",
                  "payload_sha256", "created_at", "engine_version"):
        assert manifest[field]
    tensors = load_file(str(path))
    assert tensors["token_ids"].tolist() == ids
    assert tensors["layers.0.keys"].shape == (loaded.n_kv_heads, len(ids), loaded.head_dim)
    assert len([n for n in tensors if n.endswith(".values")]) == loaded.n_layers
    art = read_artifact(path, loaded)
    assert art.token_ids == ids


def test_precompute_is_idempotent(loaded, store, artifact_path):
    key, path = artifact_path
    mtime = path.stat().st_mtime_ns
    again = precompute(loaded, DOC, store=store)
    assert again.reused and again.key == key and path.stat().st_mtime_ns == mtime


def test_precompute_rewrites_a_truncated_artifact(loaded, store, artifact_path):
    key, path = artifact_path
    path.write_bytes(path.read_bytes()[:50])
    again = precompute(loaded, DOC, store=store)
    assert again.key == key and not again.reused
    store.evict_memory()
    assert store.load(key, loaded).key == key


@pytest.mark.parametrize("where", [0.5, 0.9, 0.999])
def test_flipped_payload_byte(loaded, store, artifact_path, where):
    key, path = artifact_path
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted):
        store.load(key, loaded)


@pytest.mark.parametrize("where", [0.5, 0.999])
def test_flipped_payload_byte_of_an_artifact_without_per_tensor_hashes(
    loaded, store, artifact_path, tmp_path, where
):
    """Artifacts written before per-tensor hashes are checked by their whole-payload sha256."""
    key, path = artifact_path
    art = read_artifact(path, loaded)
    legacy = KVArtifact(
        key=key, manifest={**art.manifest, "tensor_sha256": None},
        token_ids=art.token_ids, keys=art.keys, values=art.values,
    )  # fmt: skip
    legacy_path = tmp_path / "legacy.safetensors"
    write_artifact(legacy_path, legacy)
    assert not read_manifest(legacy_path).get("tensor_sha256")
    assert read_artifact(legacy_path, loaded).token_ids == art.token_ids  # intact: it reads

    data = bytearray(legacy_path.read_bytes())
    data[int(len(data) * where)] ^= 0x01  # in the tensor data, past the header
    legacy_path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted, match="payload"):
        read_artifact(legacy_path, loaded)


def test_flipped_manifest_byte(loaded, store, artifact_path):
    key, path = artifact_path
    data = bytearray(path.read_bytes())
    pos = data.index(loaded.fingerprint[:16].encode())  # inside the manifest JSON
    data[pos] = ord("0") if data[pos] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted):
        store.load(key, loaded)


@pytest.mark.parametrize("keep", [4, 100, -1])
def test_truncated(loaded, store, artifact_path, keep):
    key, path = artifact_path
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ArtifactTruncated):
        store.load(key, loaded)


def test_foreign_model(loaded, store):
    other = wrap_model(loaded.model, loaded.tokenizer, model_id="someone/else",
                       fingerprint="f" * 64, tokenizer_fingerprint=loaded.tokenizer_fingerprint)
    foreign = precompute(other, DOC, store=store)
    store.evict_memory()
    with pytest.raises(ModelMismatch) as info:
        store.load(foreign.key, loaded)
    assert info.value.code == "model_mismatch"
    # Also when the foreign file sits under the key our model would use.
    ours = content_key(loaded.fingerprint, loaded.tokenizer_fingerprint, loaded.dtype,
                       document_prefix_ids(loaded, DOC))
    store.path(ours).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(store.path(foreign.key), store.path(ours))
    with pytest.raises(ModelMismatch):
        generate(loaded, store, ours, prompt="x", max_tokens=1)


def test_foreign_dtype(loaded, loaded_bf16, store):
    key = precompute(loaded_bf16, DOC, store=store).key
    with pytest.raises(ModelMismatch):
        store.load(key, loaded)


def test_unknown_version(loaded, store, artifact_path):
    key, path = artifact_path
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    meta["format_version"] = "99"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(UnsupportedVersion):
        store.load(key, loaded)


def test_not_found(loaded, store):
    with pytest.raises(ArtifactNotFound):
        store.load("0" * 64, loaded)
    with pytest.raises(InvalidRequest):
        store.load("../../etc/passwd", loaded)


def test_too_long_document_leaves_nothing(loaded, store):
    text = " ".join(["word"] * (loaded.max_context + 50))
    with pytest.raises(DocumentTooLong) as info:
        precompute(loaded, text, store=store)
    assert info.value.details["max_context"] == loaded.max_context
    assert files_under(store.root) == []


def test_cancelled_precompute_leaves_nothing(loaded, store):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    progress = []
    with pytest.raises(PrecomputeCancelled):
        precompute(loaded, DOCS[1] * 3, store=store, chunk_size=32, should_cancel=should_cancel,
                   progress=lambda done, total: progress.append((done, total)))
    assert progress and progress[0][0] == 0 and 0 < progress[-1][0] < progress[-1][1]
    assert files_under(store.root) == []


def test_failed_write_leaves_nothing(loaded, store, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError):
        precompute(loaded, DOCS[2], store=store)
    assert files_under(store.root) == []


def test_progress_reports_every_chunk(loaded, store):
    seen = []
    result = precompute(loaded, DOCS[3], store=store, chunk_size=16,
                        progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, result.n_tokens) and seen[-1] == (result.n_tokens, result.n_tokens)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.bytes == store.path(result.key).stat().st_size and result.flops > 0
    assert not result.reused and result.seconds > 0


def test_unsupported_architectures():
    from transformers import MambaConfig, Qwen3Config

    with pytest.raises(UnsupportedArchitecture):
        check_architecture(MambaConfig())
    windowed = Qwen3Config(use_sliding_window=True, sliding_window=64, max_window_layers=0,
                           num_hidden_layers=2)
    with pytest.raises(UnsupportedArchitecture):
        check_architecture(windowed)
    check_architecture(Qwen3Config(num_hidden_layers=2))  # plain full attention: accepted


def test_invalid_requests(loaded, shared_store, doc_keys):
    key = doc_keys[DOCS[0]]
    bad = [
        dict(),
        dict(prompt="a", messages=[{"role": "user", "content": "b"}]),
        dict(prompt="a", max_tokens=0),
        dict(prompt="a", temperature=-1),
        dict(prompt="a", top_p=0),
        dict(messages=[{"role": "user"}]),
        dict(messages=[]),
    ]
    for kwargs in bad:
        with pytest.raises(InvalidRequest):
            generate(loaded, shared_store, key, **kwargs)


def test_artifact_json_manifest_is_plain(artifact_path):
    _, path = artifact_path
    manifest = read_manifest(path)
    assert json.loads(json.dumps(manifest)) == manifest


class _CopyEvent:
    """Stands in for a CUDA event of a copy to the GPU (query: has the copy landed)."""

    def __init__(self) -> None:
        self.landed = False
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.landed


def test_landing_gives_a_copys_events_until_it_has_landed_then_forgets_them():
    events = [_CopyEvent(), _CopyEvent()]
    art = KVArtifact(key="k", manifest={}, token_ids=[1], keys=[], values=[],
                     extras={"layer_ready": events})
    assert art.landing() is events  # still copying: readers wait per layer
    events[-1].landed = True
    assert art.landing() is None
    assert "layer_ready" not in art.extras
    queries = events[-1].queries
    assert art.landing() is None and events[-1].queries == queries  # no CUDA call any more
    art.wait_ready()  # nothing to wait for, and no stream touched
    assert KVArtifact(key="k", manifest={}, token_ids=[1], keys=[], values=[]).landing() is None
