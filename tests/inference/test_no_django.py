"""The engine is a plain library: it imports and runs with Django not importable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCKER = r'''
import sys

class BlockDjango:
    def find_spec(self, name, path=None, target=None):
        if name == "django" or name.startswith("django.") or name.startswith("rest_framework"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, BlockDjango())
for name in list(sys.modules):
    if name == "django" or name.startswith("django."):
        del sys.modules[name]
try:
    import django  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("blocker failed")

import tempfile
import inference, inference.cli, inference.bench, inference.store, inference.engine  # noqa
from inference import BUILTIN_MODEL_ID, KVStore, generate, get_model, precompute

import torch

torch.set_num_threads(1)
loaded = get_model(BUILTIN_MODEL_ID)
store = KVStore(tempfile.mkdtemp())
key = precompute(loaded, "A tiny document about modules.", store=store).key
gen = generate(loaded, store, key, prompt="The", max_tokens=4)
assert gen.usage.output_tokens >= 1
assert not any(m == "django" or m.startswith("django.") for m in sys.modules), "django loaded"
print("ok")
'''


def test_imports_and_runs_without_django():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_no_django_import_in_source():
    for path in (REPO / "inference").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"django", "rest_framework", "celery", "marketplace",
                                    "ledger", "kvmarket"}, f"{path}: imports {name}"
