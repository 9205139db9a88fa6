"""Settings, read from the environment (django-environ).

With nothing set, everything runs on embedded defaults for the one-command demo: SQLite and a
Celery broker on the local filesystem (a real worker process, no server). With DATABASE_URL and
CELERY_BROKER_URL set, the same code runs on PostgreSQL and Redis. Production deployments use
kvmarket.settings_production, which refuses an insecure SECRET_KEY and DEBUG.
"""

import json
import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
# A .env file beside manage.py fills in unset variables; KVMARKET_ENV_FILE names another file
# ("" reads none: the tests use that to load settings from a controlled environment).
ENV_FILE = os.environ.get("KVMARKET_ENV_FILE", str(BASE_DIR / ".env"))
if ENV_FILE:
    environ.Env.read_env(ENV_FILE, overwrite=False)

VAR_DIR = Path(env("KVMARKET_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

# An insecure key is accepted only outside production (settings_production refuses it).
INSECURE_SECRET_KEY = "django-insecure-kvmarket-development-only"
SECRET_KEY = env("SECRET_KEY", default=INSECURE_SECRET_KEY)
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "kvmarket.apps.KvmarketAdminConfig",  # django.contrib.admin, staff only
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "django_celery_beat",
    "django_htmx",
    "marketplace",
    "ledger",
]

MIDDLEWARE = [
    "kvmarket.health.HealthCheckMiddleware",  # first: /healthz skips host checks and redirects
    "django.middleware.security.SecurityMiddleware",
    # JSON errors for /api/ whatever produced them, 413 / 503 before and around the rest.
    "kvmarket.api_errors.ApiErrorMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "kvmarket.urls"
WSGI_APPLICATION = "kvmarket.wsgi.application"
ASGI_APPLICATION = "kvmarket.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'kvmarket.sqlite3'}")}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=0))
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo's web server and worker share one SQLite file: wait for locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20
    # Tests on SQLite use a file, so a real Celery worker process can open the test database.
    DATABASES["default"].setdefault("TEST", {}).setdefault(
        "NAME", str(VAR_DIR / "test-kvmarket.sqlite3")
    )
USING_POSTGRES = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "marketplace.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "kvmarket" / "static"]
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns about a missing one
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": env(
            "STATICFILES_BACKEND",
            default="django.contrib.staticfiles.storage.StaticFilesStorage",
        )
    },
}

# --- REST API -------------------------------------------------------------------------------
# Requests per API key (marketplace.throttling reads this setting on every request).
API_KEY_THROTTLE_RATE = env("API_KEY_THROTTLE_RATE", default="600/min")
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["marketplace.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["marketplace.throttling.ApiKeyRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"api_key": API_KEY_THROTTLE_RATE},
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "kvmarket.api_errors.json_exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "kvmarket.parsers.SafeJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "kvmarket API",
    "DESCRIPTION": "Buy per-load licenses to hosted LLM KV caches and continue from them.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
}
CACHES = {
    "default": env.cache("CACHE_URL", default="locmemcache://kvmarket")
}
if CACHES["default"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache":
    # A Redis that stops answering must fail a request's cache call fast (the throttle then
    # counts locally), not hang it; CACHE_URL's query string may override these.
    CACHES["default"].setdefault("OPTIONS", {})
    CACHES["default"]["OPTIONS"].setdefault("socket_connect_timeout", 0.5)
    CACHES["default"]["OPTIONS"].setdefault("socket_timeout", 0.5)
# While the cache is unreachable the throttle counts per process and tries it again this often.
THROTTLE_CACHE_RETRY_SECONDS = env.float("THROTTLE_CACHE_RETRY_SECONDS", default=5.0)

# --- Celery ---------------------------------------------------------------------------------
# Default broker: kombu's filesystem transport under var/, so the demo's worker is a real
# separate process with no server to install. Set CELERY_BROKER_URL=redis://... in production.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
CELERY_RESULT_BACKEND = env(
    "CELERY_RESULT_BACKEND", default=f"db+sqlite:///{VAR_DIR / 'celery-results.sqlite3'}"
)
BROKER_DIR = VAR_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "polling_interval": 0.02,  # kombu's default (1 s) would add up to a second a task
        "store_processed": False,
    }
# A prefix for every broker key and channel on Redis, so several deployments (or parallel test
# processes) can share one Redis database without consuming each other's tasks.
BROKER_KEY_PREFIX = env("CELERY_BROKER_KEY_PREFIX", default="")
if BROKER_KEY_PREFIX and CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": BROKER_KEY_PREFIX}
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
CELERY_RESULT_EXPIRES = 3600
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Settlement schedule (seconds between runs of ledger.tasks.settle_payouts).
SETTLEMENT_INTERVAL_SECONDS = env.int("SETTLEMENT_INTERVAL_SECONDS", default=24 * 3600)
CELERY_BEAT_SCHEDULE = {
    "ledger-settle-payouts": {
        "task": "ledger.tasks.settle_payouts",
        "schedule": float(SETTLEMENT_INTERVAL_SECONDS),
    },
    # Marketplace housekeeping: close expired licenses (refunding unused escrow) and fail,
    # uncharged, loads left pending by a dead API process.
    "marketplace-expire-licenses": {
        "task": "marketplace.tasks.expire_licenses",
        "schedule": 3600.0,
    },
    "marketplace-expire-stale-loads": {
        "task": "marketplace.tasks.expire_stale_loads",
        "schedule": 300.0,
    },
}

# --- Models and KV storage ------------------------------------------------------------------
# The model registry: slug -> how to load it. Each model gets its own GPU queue "gpu.<slug>".
# Override with KVMARKET_MODELS='{"qwen3-4b": {"ref": "/models/Qwen3-4B", "dtype": "bfloat16",
# "device": "cuda", "input_price_usd_per_mtok": "0.10", "output_price_usd_per_mtok": "0.40"}}'.
DEFAULT_MODELS = {
    "tiny-qwen3": {
        "ref": "kvmarket/tiny-qwen3",
        "label": "kvmarket tiny Qwen3 (built-in, CPU)",
        "dtype": "float32",
        "device": "cpu",
        "input_price_usd_per_mtok": "0.10",
        "output_price_usd_per_mtok": "0.40",
    }
}
KVMARKET_MODELS = json.loads(env("KVMARKET_MODELS", default="null")) or DEFAULT_MODELS
KV_STORE_DIR = Path(env("KV_STORE_DIR", default=str(VAR_DIR / "kv")))
KV_STORE_HOST_BYTES = env.int("KV_STORE_HOST_BYTES", default=1 << 30)
KV_STORE_GPU_BYTES = env.int("KV_STORE_GPU_BYTES", default=8 << 30)
KV_S3_BUCKET = env("KV_S3_BUCKET", default="")
KV_S3_ENDPOINT_URL = env("KV_S3_ENDPOINT_URL", default="")
COMPLETION_TIMEOUT_SECONDS = env.float("COMPLETION_TIMEOUT_SECONDS", default=120.0)
# A GPU worker run with a thread pool (--pool threads -c 64) gathers the completions of one
# document that arrive within this window into one batch; 0 (default) serves them one by one.
COMPLETION_BATCH_WINDOW_MS = env.float("COMPLETION_BATCH_WINDOW_MS", default=0.0)
DOCUMENT_MAX_UPLOAD_BYTES = env.int("DOCUMENT_MAX_UPLOAD_BYTES", default=2 * 1024 * 1024)

# --- Money and Stripe -----------------------------------------------------------------------
STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY", default="")
STRIPE_PUBLISHABLE_KEY = env("STRIPE_PUBLISHABLE_KEY", default="")
STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env("STRIPE_API_BASE", default="")  # tests and stripe-mock may override
PUBLIC_BASE_URL = env("PUBLIC_BASE_URL", default="http://127.0.0.1:8000")
PAYOUT_THRESHOLD_NANO_USD = env.int("PAYOUT_THRESHOLD_NANO_USD", default=10 * 10**9)
DEFAULT_CACHE_READ_MULTIPLIER = env("DEFAULT_CACHE_READ_MULTIPLIER", default="0.1")
DEFAULT_PUBLISHER_SHARE = env("DEFAULT_PUBLISHER_SHARE", default="0.8")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
}

# GPU workers run `celery worker --pool solo -Q gpu.<slug>` with one task in hand at a time.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
