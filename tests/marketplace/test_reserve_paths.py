"""The one-query paths (PostgreSQL) against the ORM's: the same answers, nothing else.

A new Idempotency-Key is reserved by one query (marketplace.services.completions._reserve_new),
a retried key, and SQLite, by the ORM (_reserve_orm): each refusal is set up once and tried
on both paths, which must raise the same error (code, status, message, Retry-After), in the
same order when several apply, and reserve nothing. A served load is charged in three round
trips (_charge_served_batched), anything else by the ORM (_charge_locked): once, and a charge
the batch cannot make is made by the ORM.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from ledger.models import Account, Transaction
from marketplace.models import DocumentStatus, License, LicenseStatus, Load, LoadKind, LoadStatus
from marketplace.services import completions
from marketplace.services.errors import MarketplaceError
from marketplace.services.licenses import purchase_license
from tests.marketplace.conftest import NANO, fund, make_ready_document, wallet
from tests.support.accounts import make_user

pytestmark = pytest.mark.django_db

PATHS = ("one_query", "orm")
RESULT = {"usage": {"cached_tokens": 1000, "suffix_tokens": 12, "output_tokens": 3},
          "timings": {"total_s": 0.01}, "worker": "w@test", "final": True}


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the one-query paths run on PostgreSQL only")


def _reserve(path: str, monkeypatch, **kwargs: Any) -> completions.Reservation:
    monkeypatch.setattr(completions, "ONE_QUERY_PATHS", path == "one_query")
    args = {"kind": LoadKind.CHAT, "idempotency_key": None, "payload": {}, "key_seen": False,
            **kwargs}
    return completions.reserve_load(**args)


# Each case: how to spoil a fresh, usable license (3 loads, 1 NANO in the wallet), and the
# refusal both paths must give. Several spoilt at once: the first applicable check wins.
CASES: dict[str, tuple[str, str]] = {
    "missing license": ("missing", "not_found"),
    "another agent's license": ("foreign", "not_found"),
    "license of another document": ("mismatch", "license_document_mismatch"),
    "revoked": ("revoked", "license_revoked"),
    "expired (status)": ("expired", "license_expired"),
    "expired (date)": ("past_expiry", "license_expired"),
    "exhausted (status)": ("exhausted", "license_exhausted"),
    "exhausted (all loads used)": ("all_used", "license_exhausted"),
    "document not ready": ("not_ready", "document_not_ready"),
    "too many in flight": ("in_flight", "too_many_requests"),
    "wallet cannot pay the output": ("poor", "insufficient_funds"),
    "mismatch before revoked": ("mismatch revoked", "license_document_mismatch"),
    "revoked before expired": ("revoked past_expiry", "license_revoked"),
    "expired before exhausted": ("past_expiry all_used", "license_expired"),
    "exhausted before not ready": ("all_used not_ready", "license_exhausted"),
    "not ready before in flight": ("not_ready in_flight", "document_not_ready"),
    "in flight before funds": ("in_flight poor", "too_many_requests"),
}


def _spoil(spoils: str, *, agent, license: License, publisher, settings) -> dict[str, Any]:
    """Spoil the license as named; returns reserve_load's arguments."""
    args = {"agent": agent, "license_id": license.pk, "document_id": license.document_id,
            "funds_needed": NANO // 2}
    for spoil in spoils.split():
        if spoil == "missing":
            args["license_id"] = 10**9
        elif spoil == "foreign":
            other = make_user()
            fund(other, amount_nano=NANO)
            theirs, _ = purchase_license(agent=other, document_id=license.document_id, loads=1)
            args["license_id"] = theirs.pk
        elif spoil == "mismatch":
            args["document_id"] = make_ready_document(publisher).pk
        elif spoil in ("revoked", "expired", "exhausted"):
            License.objects.filter(pk=license.pk).update(status=spoil)
        elif spoil == "past_expiry":
            License.objects.filter(pk=license.pk).update(
                expires_at=timezone.now() - timedelta(seconds=1))
        elif spoil == "all_used":
            License.objects.filter(pk=license.pk).update(loads_used=license.loads_total)
        elif spoil == "not_ready":
            type(license.document).objects.filter(pk=license.document_id).update(
                status=DocumentStatus.PRECOMPUTING)
        elif spoil == "in_flight":
            settings.MAX_IN_FLIGHT_LOADS_PER_AGENT = 1
            other_doc = make_ready_document(publisher)
            held, _ = purchase_license(agent=agent, document_id=other_doc.pk, loads=1)
            completions.reserve_load(agent=agent, license_id=held.pk, document_id=other_doc.pk,
                                     kind=LoadKind.CHAT, idempotency_key="held", payload={})
        elif spoil == "poor":
            args["funds_needed"] = wallet(agent) + 1
        else:
            raise AssertionError(spoil)
    return args


@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_refuse_alike_and_reserve_nothing(case, agent_user, publisher_user,
                                                     settings, monkeypatch):
    spoils, code = CASES[case]
    fund(agent_user, amount_nano=NANO)
    license, _ = purchase_license(
        agent=agent_user, document_id=make_ready_document(publisher_user).pk, loads=3)
    args = _spoil(spoils, agent=agent_user, license=license, publisher=publisher_user,
                  settings=settings)
    used = dict(License.objects.values_list("pk", "loads_used"))
    loads = Load.objects.count()

    refused = {}
    for path in PATHS:
        with pytest.raises(MarketplaceError) as raised:
            _reserve(path, monkeypatch, **args)
        error = raised.value
        refused[path] = (error.code, error.status, error.message, error.extra)

    assert refused["one_query"] == refused["orm"]
    assert refused["orm"][0] == code
    assert dict(License.objects.values_list("pk", "loads_used")) == used
    assert Load.objects.count() == loads


def test_both_paths_reserve_alike(agent_user, publisher_user, monkeypatch):
    """A wallet holding exactly the funds needed is enough; the Load rows are the same."""
    fund(agent_user, amount_nano=NANO)
    document = make_ready_document(publisher_user)
    license, _ = purchase_license(agent=agent_user, document_id=document.pk, loads=3)
    made = {}
    for path in PATHS:
        reservation = _reserve(path, monkeypatch, agent=agent_user, license_id=license.pk,
                               document_id=document.pk, funds_needed=wallet(agent_user),
                               payload={"path": path})
        stored = Load.objects.get(pk=reservation.load.pk)
        skip = ("id", "idempotency_key", "request_hash", "created_at", "heartbeat_at")
        made[path] = {f.attname: getattr(stored, f.attname)
                      for f in Load._meta.concrete_fields if f.name not in skip}
        # what the caller is handed is what the database holds
        assert {f.attname: getattr(reservation.load, f.attname)
                for f in Load._meta.concrete_fields} == {
            f.attname: getattr(stored, f.attname) for f in Load._meta.concrete_fields}
        assert reservation.license.loads_used == License.objects.get(pk=license.pk).loads_used
        assert reservation.document.pk == document.pk and not reservation.replay
        assert reservation.document.artifact_key == document.artifact_key
    assert made["one_query"] == made["orm"]
    assert made["orm"]["status"] == LoadStatus.PENDING
    assert License.objects.get(pk=license.pk).loads_used == 2


def test_a_new_key_already_taken_is_found_by_the_retry(funded_agent, publisher_user,
                                                        monkeypatch):
    """Two first uses of one key: the one that loses the unique key reserves nothing and
    finds the other's Load (still running: 409)."""
    document = make_ready_document(publisher_user)
    license, _ = purchase_license(agent=funded_agent, document_id=document.pk, loads=3)
    first = _reserve("orm", monkeypatch, agent=funded_agent, license_id=license.pk,
                     document_id=document.pk, idempotency_key="k")
    with pytest.raises(MarketplaceError) as raised:
        _reserve("one_query", monkeypatch, agent=funded_agent, license_id=license.pk,
                 document_id=document.pk, idempotency_key="k")
    assert raised.value.code == "request_in_progress"
    assert License.objects.get(pk=license.pk).loads_used == 1
    assert list(Load.objects.values_list("pk", flat=True)) == [first.load.pk]


def _served(agent, publisher, *, price: int = 1000) -> Load:
    document = make_ready_document(publisher, price=price)
    license, _ = purchase_license(agent=agent, document_id=document.pk, loads=1)
    reservation = completions.reserve_load(
        agent=agent, license_id=license.pk, document_id=document.pk, kind=LoadKind.CHAT,
        idempotency_key=None, payload={})
    return completions.record_served(load=reservation.load, result=RESULT)


def _settlements() -> int:
    return Transaction.objects.filter(idempotency_key__startswith="load:").count()


@pytest.fixture
def orm_charges(funded_agent, publisher_user, monkeypatch) -> list[int]:
    """The loads the ORM path charged. A first sale of the publisher is made first (its ledger
    accounts are created then), so the batched path has nothing to fall back on after."""
    completions.charge_load(load=_served(funded_agent, publisher_user))
    calls: list[int] = []
    real = completions._charge_locked

    def spy(**kwargs):
        calls.append(kwargs["load"].pk)
        return real(**kwargs)

    monkeypatch.setattr(completions, "_charge_locked", spy)
    return calls


def test_both_paths_charge_a_served_load_alike(funded_agent, publisher_user, orm_charges,
                                              monkeypatch):
    agent_user = funded_agent
    charged = {}
    for path in PATHS:
        monkeypatch.setattr(completions, "ONE_QUERY_PATHS", path == "one_query")
        served = _served(agent_user, publisher_user)
        before = wallet(agent_user)
        load = completions.charge_load(load=served, wall_seconds=0.5)
        stored = Load.objects.select_related("license").get(pk=load.pk)
        skip = ("id", "license", "idempotency_key", "request_hash", "created_at",
                "heartbeat_at", "finished_at")
        charged[path] = ({f.attname: getattr(stored, f.attname)
                          for f in Load._meta.concrete_fields if f.name not in skip},
                         stored.license.status, before - wallet(agent_user))
        assert load.response == stored.response and load.license.pk == stored.license_id
        assert (load.pk in orm_charges) == (path == "orm")
    assert charged["one_query"] == charged["orm"]
    fields, license_status, paid = charged["orm"]
    assert fields["status"] == LoadStatus.SUCCEEDED and fields["compute_nano"] > 0
    assert license_status == LicenseStatus.EXHAUSTED  # its one load is used and charged
    assert paid == fields["compute_nano"] and fields["wall_seconds"] == 0.5
    assert fields["response"]["loads_left"] == 0
    assert _settlements() == 3  # with the fixture's first sale


def test_the_batched_charge_charges_once(funded_agent, publisher_user, orm_charges,
                                         monkeypatch):
    monkeypatch.setattr(completions, "ONE_QUERY_PATHS", True)
    load = _served(funded_agent, publisher_user)
    first = completions.charge_load(load=load)
    books = (wallet(funded_agent), _settlements())
    again = completions.charge_load(load=load)  # a retry or the sweep: nothing more
    assert again.status == first.status == LoadStatus.SUCCEEDED
    assert again.compute_nano == first.compute_nano > 0
    assert (wallet(funded_agent), _settlements()) == books == (books[0], 2)
    assert orm_charges == []


def test_a_load_that_is_not_served_is_not_charged_by_the_batch(funded_agent, publisher_user,
                                                                monkeypatch):
    monkeypatch.setattr(completions, "ONE_QUERY_PATHS", True)
    load = _served(funded_agent, publisher_user)
    Load.objects.filter(pk=load.pk).update(status=LoadStatus.FAILED)
    with pytest.raises(MarketplaceError) as raised:
        completions.charge_load(load=load)
    assert raised.value.code == "load_not_pending"
    assert _settlements() == 0


def test_a_first_sale_to_a_new_payable_is_charged_by_the_orm_after_the_batch(
    funded_agent, monkeypatch
):
    """The batch cannot create a ledger account (the posting fails, all of it rolls back):
    the publisher's first sale is charged by the ORM path, whose ledger call creates it."""
    monkeypatch.setattr(completions, "ONE_QUERY_PATHS", True)
    publisher = make_user(role="publisher")
    load = _served(funded_agent, publisher)
    assert not Account.objects.filter(key=f"payable:{publisher.pk}").exists()
    charged = completions.charge_load(load=load)
    assert charged.status == LoadStatus.SUCCEEDED and charged.amount_nano == 1000
    assert _settlements() == 1
    assert Account.objects.filter(key=f"payable:{publisher.pk}").exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", PATHS)
def test_the_in_flight_cap_holds_for_concurrent_reservations_of_one_license(
    path, agent_user, publisher_user, settings, monkeypatch
):
    """The count of loads in flight is read after the License row lock was granted, so each
    reservation waiting on it counts the ones committed meanwhile: exactly the cap is
    reserved, the rest refused 429."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    settings.MAX_IN_FLIGHT_LOADS_PER_AGENT = 2
    fund(agent_user, amount_nano=NANO)
    document = make_ready_document(publisher_user)
    license, _ = purchase_license(agent=agent_user, document_id=document.pk, loads=10)
    start = threading.Barrier(8)

    def attempt(i: int) -> str:
        try:
            start.wait(timeout=30)
            _reserve(path, monkeypatch, agent=agent_user, license_id=license.pk,
                     document_id=document.pk)
            return "ok"
        except MarketplaceError as exc:
            return exc.code
        finally:
            connection.close()

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert sorted(outcomes) == ["ok"] * 2 + ["too_many_requests"] * 6
    assert License.objects.get(pk=license.pk).loads_used == 2


@pytest.mark.parametrize("path", PATHS)
def test_a_license_is_exhausted_once_its_last_load_in_flight_is_charged(
    path, funded_agent, publisher_user, orm_charges, monkeypatch
):
    monkeypatch.setattr(completions, "ONE_QUERY_PATHS", path == "one_query")
    document = make_ready_document(publisher_user, price=1000)
    license, _ = purchase_license(agent=funded_agent, document_id=document.pk, loads=2)
    loads = [
        completions.record_served(load=completions.reserve_load(
            agent=funded_agent, license_id=license.pk, document_id=document.pk,
            kind=LoadKind.CHAT, idempotency_key=None, payload={}).load, result=RESULT)
        for _ in range(2)
    ]  # fmt: skip
    completions.charge_load(load=loads[0])
    assert License.objects.get(pk=license.pk).status == LicenseStatus.ACTIVE  # one in flight
    completions.charge_load(load=loads[1])
    assert License.objects.get(pk=license.pk).status == LicenseStatus.EXHAUSTED
    assert len(orm_charges) == (2 if path == "orm" else 0)
