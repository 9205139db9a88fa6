"""Group commit of charges (marketplace.services.charging) on PostgreSQL, with real commits.

Charges waiting together settle in one transaction, each load once; a charge that fails in a
batch leaves the others charged; two batches locking the same rows in opposite orders finish.
"""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from ledger.models import Transaction
from ledger.selectors import escrow_balance, payable_balance
from marketplace.models import License, Load, LoadKind, LoadStatus, User
from marketplace.services.charging import Charger, PendingCharge, charge_batch
from marketplace.services.completions import (
    charge_load,
    charge_served,
    fail_load,
    record_served,
    reserve_load,
)
from marketplace.services.licenses import purchase_license
from tests.marketplace.conftest import FAKE_RESULT, NANO, make_ready_document

pytestmark = pytest.mark.django_db(transaction=True)

PRICE = 40_000


def _served(license: License, key: str) -> Load:
    load = reserve_load(
        agent=license.agent, license_id=license.pk, document_id=license.document_id,
        kind=LoadKind.CHAT, idempotency_key=key, payload={"key": key},
    ).load  # fmt: skip
    return record_served(load=load, result={**FAKE_RESULT, "final": True})


def _settlement_keys(loads: list[Load]) -> list[str]:
    keys = [load.ledger_idempotency_key for load in loads]
    return list(Transaction.objects.filter(idempotency_key__in=keys)
                .values_list("idempotency_key", flat=True))


@pytest.fixture
def licenses(funded_agent: User, publisher_user: User) -> list[License]:
    document = make_ready_document(publisher_user, price=PRICE)
    return [purchase_license(agent=funded_agent, document_id=document.pk, loads=10)[0]
            for _ in range(2)]


def test_waiting_charges_settle_in_one_batch_each_load_once(licenses: list[License]) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("group commit is measured on PostgreSQL")
    loads = [_served(licenses[i % 2], f"k{i}") for i in range(8)]
    publisher = licenses[0].document.publisher
    payable_before = payable_balance(publisher)
    charger = Charger(charge_one=charge_load, charge_alone=charge_served)
    with charger._cond:  # the charger thread cannot take the queue until all eight are in it
        items = [charger.submit(load=load) for load in loads]
    for item in items:
        assert item.done.wait(30)
    assert charger.batches == 1
    assert [item.result.status for item in items] == [LoadStatus.SUCCEEDED] * 8
    assert sorted(_settlement_keys(loads)) == sorted(load.ledger_idempotency_key for load in loads)
    assert payable_balance(publisher) - payable_before == 8 * PRICE * 8 // 10
    for lic in licenses:
        assert escrow_balance(lic.ledger_ref) == 6 * PRICE


def test_a_failing_charge_does_not_fail_the_others_in_its_batch(
    licenses: list[License],
) -> None:
    good = _served(licenses[0], "good")
    failed = reserve_load(
        agent=licenses[1].agent, license_id=licenses[1].pk, document_id=licenses[1].document_id,
        kind=LoadKind.CHAT, idempotency_key="failed", payload={},
    ).load  # fmt: skip
    fail_load(load=failed, code="generation_failed", message="no")
    batch = [PendingCharge(failed.pk, None), PendingCharge(good.pk, None)]
    charge_batch(batch, charge_one=charge_load)
    assert batch[0].error is not None and batch[0].result is None
    assert batch[1].result is not None and batch[1].result.status == LoadStatus.SUCCEEDED
    assert _settlement_keys([good, failed]) == [good.ledger_idempotency_key]


def test_batches_crossing_two_publishers_in_opposite_orders_both_finish(
    funded_agent: User, publisher_user: User,
) -> None:
    """Batch A settles a load of publisher X then one of Y, batch B one of Y then one of X:
    without the batch's accounts locked up front in id order, each would hold one payable and
    wait for the other's."""
    from marketplace.models import Role
    from tests.support.accounts import make_user
    from tests.support.money import fund

    other_publisher = make_user(role=Role.PUBLISHER, email="other-publisher@example.com")
    other_agent = make_user(role=Role.AGENT, email="other-agent@example.com")
    fund(other_agent, amount_nano=10 * NANO)
    documents = [make_ready_document(publisher, price=PRICE)
                 for publisher in (publisher_user, other_publisher)]
    agents = [funded_agent, funded_agent, other_agent, other_agent]  # A's loads, then B's
    errors: list[BaseException] = []
    for round_ in range(4):
        lic = [purchase_license(agent=agents[i], document_id=documents[i % 2].pk,
                                loads=2)[0] for i in range(4)]
        loads = [_served(lic[i], f"x{round_}-{i}") for i in range(4)]
        batches = [[PendingCharge(loads[0].pk, None), PendingCharge(loads[1].pk, None)],
                   [PendingCharge(loads[3].pk, None), PendingCharge(loads[2].pk, None)]]
        barrier = threading.Barrier(2)

        def run(batch: list[PendingCharge], barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait(10)
                charge_batch(batch, charge_one=charge_load)
            except BaseException as exc:  # noqa: BLE001 - a deadlock would land here
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=run, args=(batch,)) for batch in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert len(_settlement_keys(loads)) == 4
