"""Ledger benchmark: load settlements per second on PostgreSQL with N concurrent clients.

Each client is its own OS process (its own Django setup and database connection) settling
loads through ledger.services.settle_load, each with a unique idempotency key, against its
own license escrow (one agent per client). Publishers are shared: --publishers 1 makes every
client credit the same publisher payable row (the hot-row worst case).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/kvm_ledger \\
        .venv/bin/python bench/ledger.py --clients 8 --seconds 10

Prints one JSON object. After the run it checks the books: the escrows and payables must
equal exactly what the counted settlements moved, and the trial balance must be zero.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRICE = 37_740  # the design's 3774-token load at 0.10 USD/Mtok x 0.1
SHARE = Decimal("0.8")


def _setup() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmarket.settings")
    import django

    django.setup()


def _client(idx, run_id, publisher_id, agent_id, license_ref, barrier, seconds, out_q, compute):
    _setup()
    from django.db import connection

    from ledger import services
    from marketplace.models import User

    publisher = User.objects.get(pk=publisher_id)
    agent = User.objects.get(pk=agent_id)
    connection.ensure_connection()
    latencies = []
    barrier.wait()
    deadline = time.perf_counter() + seconds  # CLOCK_MONOTONIC: the same clock in every process
    n = 0
    while True:
        t0 = time.perf_counter()
        if t0 >= deadline:
            break
        services.settle_load(
            license_ref=license_ref,
            publisher=publisher,
            amount_nano=PRICE,
            publisher_share=SHARE,
            idempotency_key=f"bench-{run_id}-{idx}-{n}",
            agent=agent,
            compute_nano=compute,
        )
        latencies.append(time.perf_counter() - t0)
        n += 1
    connection.close()
    out_q.put((idx, n, latencies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--publishers", type=int, default=8, help="1 = one hot payable row")
    parser.add_argument("--compute-nano", type=int, default=0, help="also charge the wallet")
    args = parser.parse_args()

    _setup()
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor != "postgresql":
        sys.exit("bench/ledger.py measures PostgreSQL: set DATABASE_URL=postgres://...")
    call_command("migrate", verbosity=0)

    from ledger import selectors, services
    from marketplace.models import Role, User

    run_id = uuid.uuid4().hex[:10]
    budget = 10**15  # plenty of escrow for any run
    publishers = [
        User.objects.create_user(
            email=f"bench-pub-{run_id}-{i}@example.test", password=None, role=Role.PUBLISHER
        )
        for i in range(args.publishers)
    ]
    clients = []
    for i in range(args.clients):
        agent = User.objects.create_user(
            email=f"bench-agent-{run_id}-{i}@example.test", password=None, role=Role.AGENT
        )
        services.credit_topup(
            agent=agent, amount_nano=2 * budget, idempotency_key=f"bt-{run_id}-{i}"
        )
        ref = f"bench-{run_id}-{i}"
        services.purchase_license(
            agent=agent, license_ref=ref, amount_nano=budget, idempotency_key=f"bb-{run_id}-{i}"
        )
        clients.append((agent, ref, publishers[i % len(publishers)]))
    connection.close()

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.clients + 1)
    out_q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client,
            args=(
                i,
                run_id,
                pub.pk,
                agent.pk,
                ref,
                barrier,
                args.seconds,
                out_q,
                args.compute_nano,
            ),
        )
        for i, (agent, ref, pub) in enumerate(clients)
    ]
    for p in procs:
        p.start()
    # Processes need a few seconds to import Django; the clock starts when all are ready.
    barrier.wait(timeout=300)
    start = time.perf_counter()
    results = [out_q.get(timeout=args.seconds + 120) for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(timeout=30)

    total = sum(n for _, n, _ in results)
    lat = sorted(x for _, _, ls in results for x in ls)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else 0.0

    # Check the books against what the clients counted.
    per_client = {idx: n for idx, n, _ in results}
    errors = []
    for i, (_agent, ref, _pub) in enumerate(clients):
        if selectors.escrow_balance(ref) != budget - per_client[i] * PRICE:
            errors.append(f"escrow {ref}")
    pub_loads: dict[int, int] = {}
    for i, (_agent, _ref, pub) in enumerate(clients):
        pub_loads[pub.pk] = pub_loads.get(pub.pk, 0) + per_client[i]
    publisher_nano, _platform_nano = services.split_amount(PRICE, SHARE)
    for pub in publishers:
        if selectors.payable_balance(pub) != pub_loads.get(pub.pk, 0) * publisher_nano:
            errors.append(f"payable {pub.pk}")
    with connection.cursor() as cur:
        cur.execute("SELECT COALESCE(SUM(amount), 0) FROM ledger_posting")
        if cur.fetchone()[0] != 0:
            errors.append("trial balance")
        cur.execute("SELECT version()")
        pg_version = cur.fetchone()[0].split(",")[0]

    print(
        json.dumps(
            {
                "benchmark": "ledger.settle_load",
                "settlements_per_s": round(total / elapsed, 1),
                "settlements": total,
                "seconds": round(elapsed, 2),
                "clients": args.clients,
                "client_kind": "process, one DB connection each",
                "publishers": args.publishers,
                "compute_nano": args.compute_nano,
                "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)},
                "books_exact": not errors,
                "errors": errors,
                "database": pg_version,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "python": platform.python_version(),
            }
        )
    )
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
