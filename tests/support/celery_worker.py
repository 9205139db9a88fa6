"""Start a REAL Celery worker process for integration tests.

    with start_celery_worker(["default"]) as worker:
        result = some_task.apply_async(queue="default").get(timeout=30)

The worker is `python -m celery -A kvmarket worker` in a subprocess. It connects to the same
database as the test run (the test database pytest-django created: the URL is built from the live
settings, so the worker sees committed data — use `transactional_db`), the same broker and the
same result backend. It is ready when a kvmarket.ping sent to a queue only it consumes comes
back. On exit it gets SIGTERM (warm shutdown), then SIGKILL after `stop_timeout` seconds. Its log
is printed when it fails to start, dies early, or the body of the `with` raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[2]


def database_url_from_settings(db: dict | None = None) -> str:
    """A DATABASE_URL (django-environ syntax) for the live `default` database settings."""
    if db is None:
        from django.conf import settings

        db = settings.DATABASES["default"]
    engine = db["ENGINE"]
    name = str(db["NAME"])
    if engine == "django.db.backends.sqlite3":
        if name.startswith("file:") or name == ":memory:":
            raise RuntimeError(
                "The test database is an in-memory SQLite database, which a worker process "
                "cannot see; set DATABASES['default']['TEST']['NAME'] to a file."
            )
        return "sqlite:///" + str(Path(name).resolve())
    if engine == "django.db.backends.postgresql":
        user = quote(str(db.get("USER") or ""), safe="")
        password = quote(str(db.get("PASSWORD") or ""), safe="")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = str(db.get("HOST") or "")
        if host.startswith("/"):  # a Unix socket directory
            port = f"?port={db['PORT']}" if db.get("PORT") else ""
            return f"postgres://{auth}%2F{quote(host.lstrip('/'), safe='')}/{quote(name)}{port}"
        port = f":{db['PORT']}" if db.get("PORT") else ""
        return f"postgres://{auth}{host}{port}/{quote(name, safe='')}"
    raise RuntimeError(f"start_celery_worker does not know the database engine {engine!r}")


@dataclass
class CeleryWorker:
    """A running worker: its process, node name, queues and log file."""

    process: subprocess.Popen
    hostname: str
    queues: list[str]
    control_queue: str
    log_path: Path
    env: dict[str, str] = field(repr=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def print_log(self, reason: str) -> None:
        sys.stderr.write(
            f"\n----- celery worker {self.hostname} log ({reason}) -----\n{self.log()}"
            f"\n----- end of celery worker log -----\n"
        )


def _worker_env(extra_env: dict[str, str] | None) -> dict[str, str]:
    from django.conf import settings

    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE=os.environ.get("DJANGO_SETTINGS_MODULE", "kvmarket.settings"),
        DATABASE_URL=database_url_from_settings(),
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        CELERY_RESULT_BACKEND=settings.CELERY_RESULT_BACKEND,
        KVMARKET_VAR_DIR=str(settings.VAR_DIR),
        PYTHONUNBUFFERED="1",
    )
    if extra_env:
        env.update({k: str(v) for k, v in extra_env.items()})
    return env


def _wait_ready(worker: CeleryWorker, timeout: float) -> None:
    """Round-trip kvmarket.ping through the worker's private queue."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from kvmarket.celery import ping

    deadline = time.monotonic() + timeout
    token = f"ready-{worker.hostname}"
    result = ping.apply_async(args=[token], queue=worker.control_queue)
    while True:
        if not worker.is_alive():
            raise RuntimeError(
                f"celery worker {worker.hostname} exited with {worker.process.returncode} "
                "before it was ready"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"celery worker {worker.hostname} not ready after {timeout:.0f}s")
        try:
            value = result.get(timeout=min(1.0, remaining), propagate=True)
        except CeleryTimeout:
            continue
        if value != token:
            raise RuntimeError(f"unexpected ping answer {value!r}")
        return


def _stop(worker: CeleryWorker, timeout: float) -> None:
    proc = worker.process
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown: finish the task in hand
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    else:
        # Prefork children left behind by a dying parent: end the whole group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def start_celery_worker(
    queues: list[str],
    *,
    pool: str = "solo",
    concurrency: int = 1,
    extra_env: dict[str, str] | None = None,
    hostname: str | None = None,
    ready_timeout: float = 60.0,
    stop_timeout: float = 15.0,
    extra_args: list[str] | None = None,
) -> Iterator[CeleryWorker]:
    """Run `celery -A kvmarket worker -Q <queues>` for the body of the `with`."""
    if not queues:
        raise ValueError("start_celery_worker needs at least one queue")
    tag = uuid.uuid4().hex[:10]
    hostname = hostname or f"test-{tag}@%h"
    node = hostname.replace("%h", os.uname().nodename)
    control_queue = f"test.ready.{tag}"
    env = _worker_env(extra_env)
    fd, log_name = tempfile.mkstemp(prefix=f"celery-worker-{tag}-", suffix=".log")
    log_path = Path(log_name)
    cmd = [
        sys.executable, "-m", "celery", "-A", "kvmarket", "worker",
        "--loglevel", "INFO",
        "--pool", pool,
        "--concurrency", str(concurrency),
        "--hostname", hostname,
        "-Q", ",".join([*queues, control_queue]),
        "--prefetch-multiplier", "1",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        *(extra_args or []),
    ]  # fmt: skip
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so prefork children end with it
        )
    worker = CeleryWorker(proc, node, list(queues), control_queue, log_path, env)
    try:
        try:
            _wait_ready(worker, ready_timeout)
        except BaseException as exc:
            worker.print_log(f"not ready: {exc}")
            raise
        try:
            yield worker
        except BaseException:
            worker.print_log("the test body raised")
            raise
        if not worker.is_alive():
            worker.print_log(f"exited early with {proc.returncode}")
    finally:
        _stop(worker, stop_timeout)
        with contextlib.suppress(OSError):
            log_path.unlink()
