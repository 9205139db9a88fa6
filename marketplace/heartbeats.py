"""A web process's heartbeat for the loads it is working on.

Every load between its reservation and its charge is tracked here; a daemon thread touches
their ``heartbeat_at`` every LOAD_HEARTBEAT_SECONDS (one UPDATE per process, not per load).
When the process dies the heartbeats stop, and the sweep (services.completions.sweep_loads)
releases or charges its loads once they are LOAD_STALE_SECONDS old.
"""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.db import connection
from django.utils import timezone

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loads: set[int] = set()
_thread: threading.Thread | None = None


def track(load_id: int) -> None:
    global _thread
    with _lock:
        _loads.add(load_id)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_beat, name="load-heartbeat", daemon=True)
            _thread.start()


def untrack(load_id: int) -> None:
    with _lock:
        _loads.discard(load_id)


def tracked() -> set[int]:
    with _lock:
        return set(_loads)


def touch() -> int:
    """Touch the tracked loads now; returns how many rows were updated."""
    from marketplace.models import Load, LoadStatus

    ids = tracked()
    if not ids:
        return 0
    return Load.objects.filter(
        pk__in=ids, status__in=[LoadStatus.PENDING, LoadStatus.SERVED]
    ).update(heartbeat_at=timezone.now())


def _beat() -> None:
    stop = threading.Event()
    while True:
        stop.wait(float(settings.LOAD_HEARTBEAT_SECONDS))
        try:
            touch()
        except Exception:  # noqa: BLE001 - the next beat tries again
            log.warning("Touching in-flight loads failed", exc_info=True)
        finally:
            connection.close()  # this thread's own connection; none is kept between beats
