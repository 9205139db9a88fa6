"""Metering through the public services: reserve_load, charge_load, fail_load.

A load is charged exactly once, under the ledger key load:<id>; a load that is not pending
is never charged; a second charge of a charged load changes nothing, whatever result it brings.
"""

from __future__ import annotations

import pytest

from ledger.models import Transaction
from ledger.selectors import escrow_balance, payable_balance
from marketplace.models import License, LicenseStatus, Load, LoadKind, LoadStatus, User
from marketplace.services.completions import charge_load, fail_load, reserve_load
from marketplace.services.errors import MarketplaceError
from marketplace.services.licenses import purchase_license
from tests.marketplace.conftest import FAKE_RESULT, NANO, make_ready_document, wallet

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("sql_path")]

PRICE = 50_000  # nano-USD a load


@pytest.fixture
def license(funded_agent: User, publisher_user: User) -> License:
    document = make_ready_document(publisher_user, price=PRICE)
    license, _ = purchase_license(agent=funded_agent, document_id=document.pk, loads=3)
    return license


def _reserve(license: License, key: str = "req-1", *, retry: bool = False) -> Load:
    return reserve_load(
        agent=license.agent, license_id=license.pk, document_id=license.document_id,
        kind=LoadKind.CHAT, idempotency_key=key,
        payload={"messages": [{"role": "user", "content": "Hi"}]}, key_seen=retry,
    ).load  # fmt: skip


def _books(license: License) -> tuple[int, int, int]:
    return (
        wallet(license.agent),
        escrow_balance(license.ledger_ref),
        payable_balance(license.document.publisher),
    )


def _settlements(license: License) -> list[str]:
    """The idempotency keys of the license's load settlements."""
    settlements = Transaction.objects.filter(
        license_ref=license.ledger_ref, idempotency_key__startswith="load:"
    )
    return list(settlements.values_list("idempotency_key", flat=True))


def test_a_charge_is_posted_once_under_the_loads_ledger_key(license: License) -> None:
    load = _reserve(license)
    escrow_before = escrow_balance(license.ledger_ref)

    charged = charge_load(load=load, result=dict(FAKE_RESULT))

    assert charged.status == LoadStatus.SUCCEEDED
    assert charged.amount_nano == PRICE
    assert _settlements(license) == [f"load:{load.pk}"]
    assert escrow_balance(license.ledger_ref) == escrow_before - PRICE


def test_charging_a_charged_load_again_changes_nothing(license: License) -> None:
    load = _reserve(license)
    first = charge_load(load=load, result=dict(FAKE_RESULT))
    books = _books(license)

    usage = {"cached_tokens": 1000, "suffix_tokens": 40, "output_tokens": 30}
    other = {**FAKE_RESULT, "text": "Another answer.", "usage": usage}
    again = charge_load(load=load, result=other)

    assert again.pk == first.pk and again.status == LoadStatus.SUCCEEDED
    assert again.response["text"] == FAKE_RESULT["text"]  # what a retry replays: the first answer
    assert (again.suffix_tokens, again.output_tokens) == (12, 3)
    assert _books(license) == books
    assert _settlements(license) == [f"load:{load.pk}"]


def test_a_failed_load_is_never_charged(license: License) -> None:
    load = _reserve(license)
    fail_load(load=load, code="worker_error", message="The worker failed.")
    books = _books(license)

    with pytest.raises(MarketplaceError) as raised:
        charge_load(load=load, result=dict(FAKE_RESULT))

    assert raised.value.code == "load_not_pending"
    load.refresh_from_db()
    assert load.status == LoadStatus.FAILED and not load.amount_nano
    assert _books(license) == books
    assert _settlements(license) == []
    license.refresh_from_db()
    assert license.loads_used == 0  # the failed load's slot was given back


def test_a_charged_load_cannot_be_failed_afterwards(license: License) -> None:
    load = _reserve(license)
    charge_load(load=load, result=dict(FAKE_RESULT))

    after = fail_load(load=load, code="late", message="Too late.")

    assert after.status == LoadStatus.SUCCEEDED
    license.refresh_from_db()
    assert license.loads_used == 1


def test_a_retried_load_settles_once_on_its_first_row(license: License) -> None:
    """A failed attempt and its retry (same Idempotency-Key) are one Load row and one key."""
    load = _reserve(license, key="retry-me")
    fail_load(load=load, code="worker_error", message="The worker failed.")

    retried = _reserve(license, key="retry-me", retry=True)
    assert retried.pk == load.pk and retried.attempts == 2
    charge_load(load=retried, result=dict(FAKE_RESULT))
    charge_load(load=retried, result=dict(FAKE_RESULT))

    assert _settlements(license) == [f"load:{load.pk}"]
    assert payable_balance(license.document.publisher) > 0


def test_each_load_of_a_license_settles_under_its_own_key(license: License) -> None:
    loads = [_reserve(license, key=f"req-{i}") for i in range(3)]
    for load in loads:
        charge_load(load=load, result=dict(FAKE_RESULT))

    assert sorted(_settlements(license)) == sorted(f"load:{load.pk}" for load in loads)
    assert escrow_balance(license.ledger_ref) == 0
    license.refresh_from_db()
    assert license.status == LicenseStatus.EXHAUSTED
    assert wallet(license.agent) < 10 * NANO
