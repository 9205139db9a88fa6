"""The ledger sits below marketplace and kvmarket, and has no cycle between its services and
the modules they use (import-linter contracts in pyproject.toml)."""

from pathlib import Path

import pytest
from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.mark.parametrize("contract", ["ledger-below-marketplace", "ledger-internal"])
def test_ledger_import_contract_is_kept(contract: str) -> None:
    kept = lint_imports(
        config_filename=str(PYPROJECT), limit_to_contracts=(contract,), no_cache=True,
        no_logo=True,
    ) == 0  # fmt: skip
    assert kept, "see the broken contract printed above"
