"""The import graph keeps its layers (import-linter; contracts in pyproject.toml).

kvmarket -> marketplace -> ledger -> inference: each package imports only those below it, and
inference imports no Django, Celery or app code. Imports inside functions count too.
Run by hand: .venv/bin/lint-imports
"""

from pathlib import Path

from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _kept(contract: str) -> bool:
    return lint_imports(
        config_filename=str(PYPROJECT), limit_to_contracts=(contract,), no_cache=True,
        no_logo=True,
    ) == 0  # fmt: skip


def test_inference_imports_no_django_celery_or_app_code() -> None:
    assert _kept("inference-plain"), "see the broken contract printed above"


def test_each_package_imports_only_the_layers_below_it() -> None:
    assert _kept("layers"), "see the broken contract printed above"
