"""docker/compose.yml is valid and has the production shape (the client only; no engine here)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = REPO_ROOT / "docker" / "compose.yml"

pytestmark = pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")


# What the docker client answers to `docker compose ...` when the compose plugin is missing
# (the wording depends on the client's version).
MISSING_PLUGIN_MESSAGES = (
    "is not a docker command",
    "unknown command",
    "unknown shorthand flag",
    "unknown flag",
)


def _compose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose_plugin() -> None:
    """Skips where the docker client has no compose plugin; CI (CI=true) fails instead, since
    .ci/run installs the plugin."""
    proc = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(m in output for m in MISSING_PLUGIN_MESSAGES):
        reason = (
            "the docker compose CLI plugin is missing (`docker compose version`: "
            f"{output.strip().splitlines()[0] if output.strip() else proc.returncode}); "
            ".ci/run installs it"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert proc.returncode == 0, output


@pytest.fixture(scope="module")
def config(compose_plugin) -> dict:
    proc = _compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_config_succeeds(compose_plugin) -> None:
    proc = _compose("config", "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_compose_has_every_service_with_a_healthcheck(config) -> None:
    services = config["services"]
    assert set(services) >= {"postgres", "redis", "web", "worker", "gpu-worker", "beat"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_web_migrates_then_runs_gunicorn(config) -> None:
    web = config["services"]["web"]
    command = " ".join(web["command"])
    assert command.index("migrate") < command.index("gunicorn kvmarket.wsgi:application")
    assert web["environment"]["DJANGO_SETTINGS_MODULE"] == "kvmarket.settings_production"
    assert web["environment"]["DATABASE_URL"].startswith("postgres://")
    assert web["environment"]["CELERY_BROKER_URL"].startswith("redis://redis:")
    assert web["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_web_runs_threads_with_a_timeout_above_the_completion_timeout(config) -> None:
    command = " ".join(config["services"]["web"]["command"])
    assert "--worker-class gthread" in command and "--threads" in command
    timeout = int(command.split("--timeout ")[1].split()[0])
    assert timeout > 120  # COMPLETION_TIMEOUT_SECONDS' default


def test_gpu_worker_serves_loads_on_the_internal_network(config) -> None:
    gpu = config["services"]["gpu-worker"]
    assert gpu["environment"]["GPU_WORKER_BIND_HOST"] == "0.0.0.0"
    assert gpu["environment"]["GPU_WORKER_ADVERTISE_URL"] == "http://gpu-worker:8200"
    assert "ports" not in gpu  # reachable from the web only, never published


def test_gpu_worker_reserves_a_gpu_and_runs_solo_with_prefetch_one(config) -> None:
    gpu = config["services"]["gpu-worker"]
    command = gpu["command"]
    assert command[:4] == ["celery", "-A", "kvmarket", "worker"]
    assert command[command.index("--pool") + 1] == "solo"
    # The default registry's models: SmolLM2 (the default for new documents) and tiny-qwen3.
    assert command[command.index("-Q") + 1] == "gpu.smollm2-135m,gpu.tiny-qwen3"
    assert command[command.index("--prefetch-multiplier") + 1] == "1"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    # Triton's compiled kernels live in a volume: a restarted worker does not recompile.
    cache = gpu["environment"]["TRITON_CACHE_DIR"]
    assert any(v["target"] == cache and v["source"] == "tritoncache" for v in gpu["volumes"])
    assert gpu["environment"]["KV_STORE_DIR"] == "/var/lib/kvmarket/kv"  # the shared env kept
    # The converted GGUF models are shared with the web (its token counts read them).
    models = gpu["environment"]["KVMARKET_MODEL_CACHE"]
    web = config["services"]["web"]
    for service in (gpu, web):
        assert any(v["target"] == models and v["source"] == "modelcache"
                   for v in service["volumes"])


def test_beat_uses_the_database_scheduler(config) -> None:
    command = config["services"]["beat"]["command"]
    assert "beat" in command
    assert "django_celery_beat.schedulers:DatabaseScheduler" in command


def test_images_run_as_a_non_root_user() -> None:
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (REPO_ROOT / "docker" / name).read_text()
        assert "\nUSER kvmarket" in text, name
    assert "FROM python:3.11-slim" in (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in (REPO_ROOT / "docker" / "Dockerfile.gpu").read_text()
