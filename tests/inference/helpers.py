"""Shared test data for the KV engine tests."""

from __future__ import annotations

import importlib
from pathlib import Path

# Passages the model saw styles of (stdlib docstrings, licenses); kept short for speed.
_SOURCES = [
    "json", "re", "csv", "argparse", "textwrap", "heapq", "bisect", "functools", "collections",
    "dataclasses", "pathlib", "string", "shutil", "tempfile", "logging", "decimal", "fractions",
    "random", "statistics", "difflib", "pprint", "base64", "contextlib", "enum", "calendar",
    "copy", "fnmatch", "glob", "gzip", "hmac", "inspect", "pickle", "queue", "sched", "secrets",
    "shelve", "struct", "subprocess", "threading", "typing", "uuid", "warnings", "zipfile",
]
QUESTIONS = [
    "What does the text say?",
    "Quote the passage.",
    "Repeat the first sentence.",
    "Continue the text.",
    "What does it say about functions?",
    "Which sentence mentions the module?",
]


def _passage(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or module_name
    doc = " ".join(doc.split())
    cut = doc[:420]
    return cut[: cut.rfind(" ")] if len(doc) > 420 else cut


DOCS: list[str] = []
for _name in _SOURCES:
    _text = _passage(_name)
    if len(_text) > 60 and _text not in DOCS and len(DOCS) < 24:
        DOCS.append(_text)
PAIRS = [(doc, QUESTIONS[i % len(QUESTIONS)]) for i, doc in enumerate(DOCS)]



def files_under(root: Path) -> list[str]:
    """Every file below root (temp files included): used to prove nothing partial is left."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())
