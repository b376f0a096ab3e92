"""The teacher worker's prefetch thread (teacher_dump/worker.py:prefetched), on its own."""

from __future__ import annotations

import threading

import pytest

from teacher_dump.inputs import InputError
from teacher_dump.worker import prefetched


def test_prefetched_keeps_order_raises_where_the_item_was_and_stops_its_producer():
    """The worker's prefetch thread: items in order; a failure while preparing item 3 is raised to
    the consumer after items 0-2 (never swallowed, never early); a consumer that stops early stops
    the producer instead of leaving it blocked on a full queue."""
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield from range(3)
        raise InputError("mimic.jsonl:4: changed after it was validated")

    got = []
    with pytest.raises(InputError, match="mimic.jsonl:4"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [0, 1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = prefetched(endless())
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "lmod-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 3  # one consumed, one queued, one waiting to be queued
