"""Run Python or manage.py in a subprocess with a controlled environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Variables the settings read: removed from the inherited environment so that each test
# states exactly what it sets.
SETTINGS_VARS = (
    "DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
    "CELERY_BROKER_KEY_PREFIX",
    "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "CACHE_URL",
    "KVMARKET_MODELS", "KV_STORE_DIR", "KV_S3_BUCKET", "KV_S3_ENDPOINT_URL",
    "STRIPE_SECRET_KEY", "STRIPE_PUBLISHABLE_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE",
    "API_KEY_THROTTLE_RATE", "STATICFILES_BACKEND", "STATIC_ROOT", "SECURE_SSL_REDIRECT",
    "DJANGO_ALLOW_ASYNC_UNSAFE",
)  # fmt: skip


def clean_env(var_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}
    env.update(KVMARKET_ENV_FILE="", KVMARKET_VAR_DIR=str(var_dir), PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def run_manage(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


RESOLVE_SETTINGS = """
import json, os, django
from django.conf import settings
django.setup()
db = settings.DATABASES["default"]
print("SETTINGS=" + json.dumps({
    "module": os.environ["DJANGO_SETTINGS_MODULE"],
    "db_engine": db["ENGINE"], "db_name": str(db["NAME"]), "db_host": db.get("HOST", ""),
    "db_port": str(db.get("PORT", "")), "db_user": db.get("USER", ""),
    "broker": settings.CELERY_BROKER_URL, "result_backend": settings.CELERY_RESULT_BACKEND,
    "broker_options": getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
    "debug": settings.DEBUG, "var_dir": str(settings.VAR_DIR),
    "models": sorted(settings.KVMARKET_MODELS), "kv_store_dir": str(settings.KV_STORE_DIR),
    "stripe_secret_key": settings.STRIPE_SECRET_KEY,
    "throttle": settings.API_KEY_THROTTLE_RATE,
    "queues": sorted(q.name for q in __import__("kvmarket.celery").celery.app.conf.task_queues),
    "secure_ssl_redirect": getattr(settings, "SECURE_SSL_REDIRECT", False),
    "session_cookie_secure": settings.SESSION_COOKIE_SECURE,
}))
"""


def resolve_settings(env: dict[str, str], module: str = "kvmarket.settings") -> dict:
    env = {**env, "DJANGO_SETTINGS_MODULE": module}
    proc = run_python(RESOLVE_SETTINGS, env)
    if proc.returncode != 0:
        raise AssertionError(f"settings failed to load:\n{proc.stdout}\n{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SETTINGS="))
    return json.loads(line.removeprefix("SETTINGS="))
