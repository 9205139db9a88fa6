"""Settings resolve from the environment: embedded defaults, or PostgreSQL + Redis."""

import json
import secrets
from pathlib import Path

import pytest

from tests.support.subprocess_settings import clean_env, resolve_settings, run_manage, run_python

GOOD_KEY = secrets.token_urlsafe(64)


def test_embedded_defaults_use_sqlite_and_the_filesystem_broker(tmp_path) -> None:
    s = resolve_settings(clean_env(tmp_path))
    assert s["db_engine"] == "django.db.backends.sqlite3"
    assert s["db_name"] == str(tmp_path / "kvmarket.sqlite3")
    assert s["broker"] == "filesystem://"
    folders = s["broker_options"]
    assert folders["data_folder_in"] == folders["data_folder_out"] == str(tmp_path / "broker/queue")
    assert folders["control_folder"] == str(tmp_path / "broker/control")
    assert (tmp_path / "broker" / "queue").is_dir()
    assert s["result_backend"] == f"db+sqlite:///{tmp_path / 'celery-results.sqlite3'}"
    assert s["debug"] is True
    assert s["models"] == ["smollm2-135m", "tiny-qwen3"]
    assert s["queues"] == ["default", "gpu.smollm2-135m", "gpu.tiny-qwen3"]
    assert s["kv_store_dir"] == str(tmp_path / "kv")


def test_a_broker_key_prefix_keeps_the_redis_transport_options(tmp_path: Path) -> None:
    """Parallel test processes share one Redis database through per-process key prefixes."""
    env = clean_env(tmp_path, CELERY_BROKER_URL="redis://127.0.0.1:6379/9",
                    CELERY_BROKER_KEY_PREFIX="gw1.")  # fmt: skip
    s = resolve_settings(env)
    assert s["broker_options"] == {"visibility_timeout": 300, "global_keyprefix": "gw1."}


def test_database_url_and_redis_select_postgres_and_redis(tmp_path) -> None:
    env = clean_env(
        tmp_path,
        DATABASE_URL="postgres://kv:s3cret@db.internal:5433/kvprod",
        CELERY_BROKER_URL="redis://redis.internal:6379/2",
        CELERY_RESULT_BACKEND="redis://redis.internal:6379/3",
        KVMARKET_MODELS=json.dumps({"qwen3-4b": {"ref": "/models/q", "device": "cuda"}}),
        STRIPE_SECRET_KEY="sk_test_123",
        API_KEY_THROTTLE_RATE="5/second",
    )
    s = resolve_settings(env)
    assert s["db_engine"] == "django.db.backends.postgresql"
    assert (s["db_name"], s["db_host"], s["db_port"], s["db_user"]) == (
        "kvprod", "db.internal", "5433", "kv",
    )  # fmt: skip
    assert s["broker"] == "redis://redis.internal:6379/2"
    assert s["result_backend"] == "redis://redis.internal:6379/3"
    assert s["broker_options"] == {"visibility_timeout": 300}  # kombu's default is an hour
    assert s["models"] == ["qwen3-4b"]
    assert s["queues"] == ["default", "gpu.qwen3-4b"]
    assert s["stripe_secret_key"] == "sk_test_123"
    assert s["throttle"] == "5/second"


def test_a_dot_env_file_fills_unset_variables(tmp_path) -> None:
    env_file = tmp_path / "test.env"
    env_file.write_text("CELERY_BROKER_URL=redis://from-dot-env:6379/0\nDEBUG=false\n")
    env = clean_env(tmp_path, KVMARKET_ENV_FILE=str(env_file), DEBUG="true")
    s = resolve_settings(env)
    assert s["broker"] == "redis://from-dot-env:6379/0"
    assert s["debug"] is True  # the real environment wins over the file


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"SECRET_KEY": GOOD_KEY}, "DEBUG must be off"),  # DEBUG defaults to on
        ({"DEBUG": "true", "SECRET_KEY": GOOD_KEY}, "DEBUG must be off"),
        ({"DEBUG": "false"}, "SECRET_KEY"),  # the insecure development key
        ({"DEBUG": "false", "SECRET_KEY": "short-but-set"}, "SECRET_KEY"),
    ],
)
def test_production_settings_refuse_debug_and_insecure_keys(tmp_path, overrides, message) -> None:
    env = clean_env(
        tmp_path, DJANGO_SETTINGS_MODULE="kvmarket.settings_production", **overrides
    )
    proc = run_python("import django; django.setup()", env)
    assert proc.returncode != 0
    assert "ImproperlyConfigured" in proc.stderr
    assert message in proc.stderr


def _production_env(tmp_path) -> dict[str, str]:
    return clean_env(
        tmp_path,
        DJANGO_SETTINGS_MODULE="kvmarket.settings_production",
        DEBUG="false",
        SECRET_KEY=GOOD_KEY,
        ALLOWED_HOSTS="kvmarket.example.com",
    )


def test_production_settings_load_with_a_real_key(tmp_path) -> None:
    s = resolve_settings(_production_env(tmp_path), module="kvmarket.settings_production")
    assert s["debug"] is False
    assert s["secure_ssl_redirect"] is True
    assert s["session_cookie_secure"] is True


def test_check_deploy_is_clean_under_production_settings(tmp_path) -> None:
    proc = run_manage("check", "--deploy", "--fail-level", "WARNING", env=_production_env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues" in proc.stdout


def test_migrations_are_complete(tmp_path) -> None:
    proc = run_manage("makemigrations", "--check", "--dry-run", env=clean_env(tmp_path))
    assert proc.returncode == 0, f"missing migrations:\n{proc.stdout}\n{proc.stderr}"
    assert "No changes detected" in proc.stdout
