"""The repository's shape: the benchmarks are documented, the build context stays small."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_and_result_is_documented_in_bench_readme() -> None:
    readme = (REPO_ROOT / "bench" / "README.md").read_text()
    scripts = sorted(p.name for p in (REPO_ROOT / "bench").glob("*.py") if p.name != "__init__.py")
    assert scripts, "bench/ has no benchmark"
    for name in scripts:
        assert f"bench/{name}" in readme, f"bench/{name} is not in bench/README.md"
    for result in (REPO_ROOT / "bench" / "results").glob("*"):
        assert f"bench/results/{result.name}" in readme or result.name in readme, (
            f"bench/results/{result.name} is not referenced by bench/README.md"
        )


def test_docker_build_context_leaves_out_local_state() -> None:
    ignored = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var", "test-artifacts"} <= ignored
