"""A live stack of a test's own, for fault injection: a PostgreSQL cluster (initdb into a temp
dir), a redis-server, gunicorn, Celery GPU workers and beat, each a process the test can kill.

Nothing here touches the shared services: every server binds a free port on 127.0.0.1 and
keeps its data and logs under the directory it is given.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.celery_worker import REPO_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(predicate: Callable[[], object], *, timeout: float, what: str,
         interval: float = 0.1, errors_ok: bool = True) -> object:
    """predicate()'s first truthy value, or AssertionError after timeout seconds. With
    errors_ok, an exception in predicate counts as not yet (a server still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:
            if not errors_ok:
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def postgres_bindir() -> Path | None:
    """The directory of the system's initdb/pg_ctl, or None."""
    candidates = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if out:
            candidates.append(out)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for path in candidates:
        if (Path(path) / "initdb").is_file() and (Path(path) / "pg_ctl").is_file():
            return Path(path)
    return None


def _as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root without runuser: cannot start PostgreSQL")
    return [runuser, "-u", "postgres", "--"]


class PostgresCluster:
    """A throwaway cluster: `start()`, `stop()` (pg_ctl stop -m fast), `log()`."""

    def __init__(self, root: Path, bindir: Path) -> None:
        self.bindir = bindir
        self.data = root / "pgdata"
        self.log_path = root / "postgres.log"
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/kvmarket_campaign"
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=kvmarket_campaign"
        root.chmod(0o777)  # the postgres user writes its data and log here when we are root
        self.log_path.touch()
        self.log_path.chmod(0o666)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*_as_postgres_user(), str(self.bindir / tool), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stdout}\n{proc.stderr}\n{self.log()}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200 -c log_lock_waits=on -c deadlock_timeout=200ms")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def create_database(self) -> None:
        import psycopg

        dsn = self.dsn.replace("dbname=kvmarket_campaign", "dbname=postgres")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE kvmarket_campaign")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A cluster in a temp dir of its own (pytest's are private to the test's user, and the
    server may run as the postgres user), removed afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl)")
    root = Path(tempfile.mkdtemp(prefix="kvmarket-pg-"))
    try:
        cluster = PostgresCluster(root, bindir)
        cluster.start()
        try:
            cluster.create_database()
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                cluster._run("pg_ctl", "-D", str(cluster.data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Process:
    """A server process in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (prefork children and threads' subprocesses end with it)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def redis_server(root: Path) -> Process:
    port = free_port()
    cmd = [shutil.which("redis-server") or "redis-server", "--port", str(port),
           "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)]
    proc = Process("redis", cmd, dict(os.environ), root / "redis.log")
    proc.url = f"redis://127.0.0.1:{port}"  # type: ignore[attr-defined]
    proc.port = port  # type: ignore[attr-defined]
    return proc


def redis_answers(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def gunicorn(root: Path, env: dict[str, str], *, workers: int = 2, threads: int = 8) -> Process:
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "kvmarket.wsgi:application",
           "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
           "--worker-class", "gthread", "--threads", str(threads), "--timeout", "120",
           "--graceful-timeout", "5"]
    proc = Process("gunicorn", cmd, env, root / "gunicorn.log")
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


def children(pid: int) -> list[int]:
    """The live child processes of pid (from /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = Path(stat).read_text()
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.split("/")[2]))
    return sorted(found)


def celery_worker(root: Path, env: dict[str, str], name: str, queues: list[str]) -> Process:
    cmd = [sys.executable, "-m", "celery", "-A", "kvmarket", "worker", "--loglevel", "INFO",
           "--pool", "solo", "--hostname", f"{name}@campaign", "-Q", ",".join(queues),
           "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
           "--without-heartbeat"]
    proc = Process(name, cmd, env, root / f"{name}.log")
    proc.hostname = f"{name}@campaign"  # type: ignore[attr-defined]
    return proc


def celery_beat(root: Path, env: dict[str, str]) -> Process:
    cmd = [sys.executable, "-m", "celery", "-A", "kvmarket", "beat", "--loglevel", "INFO",
           "-s", str(root / "beat-schedule")]
    return Process("beat", cmd, env, root / "beat.log")
