"""Group commit of load charges: the charges waiting at one moment share one transaction.

Every load's charge moves money from its license's escrow to the publisher's payable, and a
posting keeps its accounts locked until its commit: with many agents on one document, every
charge waits for that one payable row, and charges committed one at a time queue behind each
other. The process-wide Charger takes every charge waiting at that moment and settles them in
one database transaction (each in its own savepoint, so one failing charge does not fail the
others), after locking the batch's rows in one global order (loads, licenses, then the ledger
accounts by id), so that batches of several web processes cannot deadlock. A caller waits for
its batch's commit, so the answer still says what was charged; when the batch fails as a whole
or does not commit in time, the caller charges its load alone, and a load that
still cannot be charged stays served for the sweep (the outbox).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import close_old_connections, transaction

from ledger import services as ledger_services
from marketplace.models import License, Load

log = logging.getLogger(__name__)

MAX_BATCH = 64
WAIT_SECONDS = 10.0  # then the caller charges alone


@dataclass
class PendingCharge:
    load_id: int
    wall_seconds: float | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Load | None = None
    error: BaseException | None = None


ChargeOne = Callable[..., Load]  # charge_load / charge_served: (load=, wall_seconds=) -> Load


def charge_batch(batch: list[PendingCharge], *, charge_one: ChargeOne) -> None:
    """Charge every load of ``batch`` with ``charge_one`` in one transaction; sets each item's
    result or error."""
    results: dict[int, Load | BaseException] = {}
    with transaction.atomic():
        ids = sorted({item.load_id for item in batch})
        loads = {load.pk: load for load in
                 Load.objects.select_for_update().filter(pk__in=ids).order_by("pk")}
        licenses = list(
            License.objects.select_for_update(of=("self",)).select_related("document")
            .filter(pk__in={load.license_id for load in loads.values()}).order_by("pk")
        )
        ledger_services.lock_settlement_accounts(settlements=[
            (lic.ledger_ref, lic.document.publisher_id, lic.agent_id) for lic in licenses
        ])
        for item in batch:
            load = loads.get(item.load_id)
            if load is None:
                results[item.load_id] = Load.DoesNotExist(f"load {item.load_id}")
                continue
            try:
                results[item.load_id] = charge_one(load=load, wall_seconds=item.wall_seconds)
            except Exception as exc:  # noqa: BLE001 - this load alone; its savepoint rolled back
                results[item.load_id] = exc
    for item in batch:  # committed: hand out the results
        outcome = results[item.load_id]
        if isinstance(outcome, BaseException):
            item.error = outcome
        else:
            item.result = outcome


class Charger:
    """One thread per process that settles the charges queued by request threads in batches."""

    def __init__(
        self, *, charge_one: ChargeOne, charge_alone: ChargeOne, max_batch: int = MAX_BATCH
    ) -> None:
        self.charge_one = charge_one  # one load, inside the batch's transaction
        self.charge_alone = charge_alone  # one load in its own transactions, with retries
        self.max_batch = max_batch
        self.batches = 0  # batches committed (tests, metrics)
        self._cond = threading.Condition()
        self._queue: list[PendingCharge] = []
        self._thread: threading.Thread | None = None

    def submit(self, *, load: Load, wall_seconds: float | None = None) -> PendingCharge:
        item = PendingCharge(load.pk, wall_seconds)
        with self._cond:
            self._queue.append(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kvmarket-charger",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return item

    def charge(self, *, load: Load, wall_seconds: float | None = None) -> Load:
        """Charge ``load`` (served) with whatever else is waiting; returns it charged, or as
        charge_alone left it when its batch could not charge it."""
        item = self.submit(load=load, wall_seconds=wall_seconds)
        if item.done.wait(WAIT_SECONDS) and item.result is not None:
            return item.result
        if item.error is not None:
            log.warning("Batched charge of load %s failed: %r; charging it alone",
                        load.pk, item.error)
        return self.charge_alone(load=load, wall_seconds=wall_seconds)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
            try:
                charge_batch(batch, charge_one=self.charge_one)
                self.batches += 1
            except Exception as exc:  # noqa: BLE001 - the callers charge alone
                log.warning("A batch of %s charges failed: %r", len(batch), exc)
                for item in batch:
                    item.result, item.error = None, exc
            finally:
                for item in batch:
                    item.done.set()
                close_old_connections()  # a broken or expired connection is not reused

