"""CLI smoke tests: ``python -m inference`` subcommands print JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference.cli import main
from tests.inference.helpers import DOCS

REPO = Path(__file__).resolve().parents[2]


def _run(capsys, argv: list[str]) -> dict:
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_cli_precompute_generate_verify_inspect(capsys, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCS[0])
    store = str(tmp_path / "kv")
    pre = _run(capsys, ["precompute", "--model", "builtin", "--store", store,
                        "--text-file", str(doc), "--verify"])
    assert pre["n_tokens"] > 10 and pre["verification"]["passed"]
    key = pre["key"]
    gen = _run(capsys, ["generate", "--store", store, "--key", key, "--message",
                        "Quote the passage.", "--max-tokens", "8"])
    assert gen["usage"]["cached_tokens"] == pre["n_tokens"] and gen["token_ids"]
    raw = _run(capsys, ["generate", "--store", store, "--key", key, "--prompt", "The",
                        "--max-tokens", "4", "--temperature", "0.7", "--seed", "1"])
    assert raw["usage"]["suffix_tokens"] >= 1
    rep = _run(capsys, ["verify", "--store", store, "--key", key, "--suffix", "Hi",
                        "--steps", "8"])
    assert rep["bitwise_equal"] and rep["greedy_total"] == 8
    info = _run(capsys, ["inspect", "--store", store, "--key", key])
    assert info["manifest"]["key"] == key and info["verification"]["greedy_total"] == 8
    listing = _run(capsys, ["inspect", "--store", store])
    assert listing["keys"] == [key]


def test_cli_error_is_json(capsys, tmp_path):
    code = main(["generate", "--store", str(tmp_path), "--key", "0" * 64, "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert json.loads(err)["error"]["code"] == "artifact_not_found"


def test_cli_bench_small(capsys):
    data = _run(capsys, ["bench", "--model", "builtin", "--lengths", "64,5000",
                         "--repeats", "1", "--device", "cpu"])
    first, too_long = data["results"]
    assert first["n_tokens"] == 64 and set(first["reuse"]) == {"disk", "host"}
    assert first["first_token_match"] is True
    assert first["reuse"]["disk"]["served_from"] == ["disk"]
    assert first["reuse"]["host"]["gpu_state"] == {"before": None, "after": None}  # no GPU
    assert "skipped" in too_long


def test_cli_bench_random_weights(capsys):
    data = _run(capsys, ["bench", "--model-config", "qwen3-test", "--device", "cpu",
                         "--lengths", "40", "--repeats", "1", "--decode-tokens", "3"])
    assert data["model"] == "random/qwen3-test" and data["dtype"] == "bfloat16"
    row = data["results"][0]
    assert row["suffix_tokens"] == 32 and row["first_token_match"] is True


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "inference", "inspect", "--store",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["keys"] == []


def test_bench_reads_the_gpu_state_where_nvml_answers(monkeypatch):
    import torch

    from inference.bench import _gpu_state

    monkeypatch.setattr(torch.cuda, "clock_rate", lambda: 1980)
    monkeypatch.setattr(torch.cuda, "temperature", lambda: 41)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda: 123456)  # mW
    assert _gpu_state("cuda") == {"sm_clock_mhz": 1980, "temperature_c": 41, "power_w": 123.5}
    assert _gpu_state("cpu") is None

    def refused():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(torch.cuda, "clock_rate", refused)
    assert _gpu_state("cuda") is None  # a reading, never a reason for the bench to fail
