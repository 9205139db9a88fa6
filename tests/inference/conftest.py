"""Fixtures for the KV engine tests. No Django: these tests run with ``-p no:django`` too.

The built-in model and one store of precomputed documents are shared by the whole session so
the suite stays fast on two CPU cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, the fast path's Triton kernels run in Triton's interpreter (numpy). It must be
# chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from inference import BUILTIN_MODEL_ID, KVStore, get_model, precompute  # noqa: E402
from tests.inference.helpers import DOCS  # noqa: E402

# One intra-op thread: the model is tiny, and extra threads only add sync cost (and lose
# badly when other processes share the two cores).
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def loaded():
    return get_model(BUILTIN_MODEL_ID)


@pytest.fixture(scope="session")
def loaded_bf16():
    return get_model(BUILTIN_MODEL_ID, dtype="bfloat16")


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> KVStore:
    return KVStore(tmp_path_factory.mktemp("kv-shared"))


@pytest.fixture(scope="session")
def doc_keys(loaded, shared_store) -> dict[str, str]:
    """Every test document precomputed once into the shared store."""
    return {doc: precompute(loaded, doc, store=shared_store, chunk_size=64).key for doc in DOCS}


@pytest.fixture
def store(tmp_path: Path) -> KVStore:
    return KVStore(tmp_path / "kv")
