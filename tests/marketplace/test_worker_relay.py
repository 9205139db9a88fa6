"""The GPU worker endpoint's relay of engine events to the requests waiting on the loop."""

from __future__ import annotations

import asyncio
import threading

from marketplace.worker_server import EventRelay


def test_events_emitted_together_wake_the_loop_once_and_reach_their_queues_in_order():
    loop = asyncio.new_event_loop()
    try:
        wakes = []
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(callback, *args):
            wakes.append(callback)
            return call_soon_threadsafe(callback, *args)

        loop.call_soon_threadsafe = counted
        relay = EventRelay(loop)
        queues = [asyncio.Queue(), asyncio.Queue()]
        # One batched step: an event per row from the engine thread, the loop not yet running.
        engine = threading.Thread(
            target=lambda: [relay.emit(queues[i % 2], {"n": i}) for i in range(10)]
        )
        engine.start()
        engine.join()
        assert len(wakes) == 1
        loop.run_until_complete(asyncio.sleep(0))
        got = [[q.get_nowait()["n"] for _ in range(q.qsize())] for q in queues]
        assert got == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]

        relay.emit(queues[0], {"n": 10})  # the next burst wakes it again
        assert len(wakes) == 2
        loop.run_until_complete(asyncio.sleep(0))
        assert queues[0].get_nowait() == {"n": 10}
    finally:
        loop.close()
