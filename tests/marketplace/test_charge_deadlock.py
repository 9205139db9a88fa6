"""The charge path's row locks on PostgreSQL: what it locks, and 16 concurrent agents on one
document at the service level with no deadlock.

The lock footprint test probes, from a second connection, the shared rows while reserve and
charge hold their locks: the Document and the agent's User must stay unlocked (NOWAIT), as
every concurrent load of the document reads them.

Each thread is an agent with its own database connection and license, running many loads
through the real services (reserve_load -> record_served -> charge_load, some failed and
released instead), while a 17th thread runs the sweep. Every load locks the Load row, then the
License row, then the ledger's accounts. Locking the shared Document row (or the agent's
User row) as well, as ``select_for_update()`` with ``select_related`` did, makes these
transactions deadlock: the test counts PostgreSQL's deadlocks (pg_stat_database) and fails
on any, and on any error a thread saw.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from django.db import connection

from marketplace.models import License, LicenseStatus, Load, LoadKind, LoadStatus, Role
from marketplace.services import completions
from marketplace.services.licenses import purchase_license
from tests.ledger.invariants import assert_ledger_invariants
from tests.support.accounts import make_user
from tests.support.money import NANO, fund

pytestmark = pytest.mark.django_db(transaction=True)

AGENTS = 16
LOADS_PER_AGENT = 30
RESULT = {"usage": {"cached_tokens": 1000, "suffix_tokens": 12, "output_tokens": 3},
          "timings": {"total_s": 0.01}, "worker": "w@test", "final": True}


def _deadlocks() -> int:
    """PostgreSQL's count of deadlocks detected in this database (all sessions)."""
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        return int(cur.fetchone()[0])


def _deadlock_in(exc: BaseException) -> bool:
    import psycopg

    while exc is not None:
        if isinstance(exc, psycopg.errors.DeadlockDetected):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.fixture
def skip_unless_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row-lock deadlocks need PostgreSQL (SQLite locks the whole database)")


def test_16_agents_charging_on_one_document_never_deadlock(skip_unless_postgresql, publisher_user):
    from tests.marketplace.conftest import make_ready_document

    document = make_ready_document(publisher_user, price=1000)
    licenses = []
    for _ in range(AGENTS):
        agent = make_user(role=Role.AGENT)
        fund(agent, amount_nano=NANO)
        lic, _ = purchase_license(agent=agent, document_id=document.pk, loads=LOADS_PER_AGENT)
        licenses.append((agent, lic.pk))
    deadlocks_before = _deadlocks()

    barrier = threading.Barrier(AGENTS + 1)
    done = threading.Event()
    errors: list[BaseException] = []
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def agent_run(i: int) -> None:
        agent, license_id = licenses[i]
        try:
            barrier.wait(timeout=30)
            for n in range(LOADS_PER_AGENT):
                reservation = completions.reserve_load(
                    agent=agent, license_id=license_id, document_id=document.pk,
                    kind=LoadKind.CHAT, idempotency_key=None, payload={"n": n},
                )
                if n % 10 == 9:  # a failure before the first token: released, uncharged
                    completions.fail_load(load=reservation.load, code="test", message="x")
                    outcome = "failed"
                else:
                    load = completions.record_served(load=reservation.load, result=RESULT)
                    completions.charge_load(load=load)
                    outcome = "charged"
                with lock:
                    outcomes[outcome] += 1
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            with lock:
                errors.append(exc)
        finally:
            connection.close()

    def sweeper() -> None:
        try:
            barrier.wait(timeout=30)
            while not done.is_set():
                completions.sweep_loads()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            with lock:
                errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=agent_run, args=(i,)) for i in range(AGENTS)]
    sweep = threading.Thread(target=sweeper)
    for t in [*threads, sweep]:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    sweep.join(timeout=30)
    assert not any(t.is_alive() for t in [*threads, sweep]), "a thread hung"

    deadlocks = _deadlocks() - deadlocks_before
    assert deadlocks == 0 and not any(_deadlock_in(e) for e in errors), (
        f"{deadlocks} deadlocks detected by PostgreSQL; errors: {errors[:3]!r}"
    )
    assert errors == [], errors[:3]
    charged = AGENTS * (LOADS_PER_AGENT - LOADS_PER_AGENT // 10)
    assert outcomes == {"charged": charged, "failed": AGENTS * (LOADS_PER_AGENT // 10)}
    assert Load.objects.filter(status=LoadStatus.SUCCEEDED).count() == charged
    from ledger.models import Transaction

    assert Transaction.objects.filter(kind="load_settlement").count() == charged
    for lic in License.objects.filter(document=document):
        assert lic.loads_used == LOADS_PER_AGENT - LOADS_PER_AGENT // 10
        assert lic.status == LicenseStatus.ACTIVE
    assert_ledger_invariants()


def _locked_elsewhere(table: str, pk: int) -> bool:
    """Whether another connection holds a row lock on the row that blocks updating it (probed
    from a new thread). The key-share lock a foreign key's check takes on the row a new row
    references (the agent's User, under a new Load) blocks no update and is not counted."""
    from django.db import OperationalError, transaction

    found: list[bool] = []

    def probe() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(f"SELECT id FROM {table} WHERE id = %s FOR NO KEY UPDATE NOWAIT",
                            [pk])
            found.append(False)
        except OperationalError:  # could not obtain lock on row
            found.append(True)
        finally:
            connection.close()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join(timeout=30)
    return found == [True]


def test_reserve_and_charge_lock_neither_the_document_nor_the_agent(
    skip_unless_postgresql, sql_path, publisher_user, monkeypatch
):
    from django.db import transaction

    from ledger import services as ledger_services
    from tests.marketplace.conftest import make_ready_document

    document = make_ready_document(publisher_user, price=1000)
    agent = make_user(role=Role.AGENT)
    fund(agent, amount_nano=NANO)
    lic, _ = purchase_license(agent=agent, document_id=document.pk, loads=2)
    seen: dict[str, dict[str, bool]] = {}

    def probe(step: str) -> None:
        seen[step] = {
            "license": _locked_elsewhere("marketplace_license", lic.pk),
            "document": _locked_elsewhere("marketplace_document", document.pk),
            "agent": _locked_elsewhere("marketplace_user", agent.pk),
        }

    real_check, real_settle = completions._check_usable, ledger_services.settle_load

    def check_usable(**kwargs):  # inside _reserve's transaction, after its locks
        probe("reserve")
        return real_check(**kwargs)

    def settle_load(**kwargs):  # inside charge_load's transaction, after its locks
        probe("charge")
        return real_settle(**kwargs)

    monkeypatch.setattr(completions, "_check_usable", check_usable)
    monkeypatch.setattr(ledger_services, "settle_load", settle_load)
    with transaction.atomic():  # the one-query reservation's locks are held until its end
        reservation = completions.reserve_load(
            agent=agent, license_id=lic.pk, document_id=document.pk, kind=LoadKind.CHAT,
            idempotency_key=None, payload={},
        )
        if sql_path == "one_query":
            probe("reserve")
    load = completions.record_served(load=reservation.load, result=RESULT)
    assert completions.charge_load(load=load).status == LoadStatus.SUCCEEDED
    expected = {"license": True, "document": False, "agent": False}
    assert seen == {"reserve": expected, "charge": expected}
