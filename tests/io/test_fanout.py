"""Fanout: every item exactly once, at most ``width`` at once, the first error re-raised."""

from __future__ import annotations

import threading
import time

import pytest

from vmpager.io.fanout import Fanout

pytestmark = pytest.mark.timeout(60)


class Probe:
    """Records the items seen and the peak number of calls running at once."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def __call__(self, item: int) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(0.001)  # as a read would, without the GIL
        with self.lock:
            self.now -= 1
            self.seen.append(item)


def test_every_item_once_and_width_bounds_concurrency() -> None:
    fanout = Fanout(8)
    try:
        for width in (None, 1, 3, 8, 100):
            probe = Probe()
            fanout.run(probe, list(range(50)), width=width)
            assert sorted(probe.seen) == list(range(50))
            limit = 8 if width is None else min(width, 8)
            assert 1 <= probe.peak <= limit
            if limit > 1:
                assert probe.peak > 1  # it did run in parallel
    finally:
        fanout.close()


def test_first_error_is_raised_after_the_others_finish() -> None:
    fanout = Fanout(4)
    done: list[int] = []

    def fn(item: int) -> None:
        if item == 3:
            raise OSError(5, "boom")
        time.sleep(0.001)
        done.append(item)

    with pytest.raises(OSError, match="boom"):
        fanout.run(fn, list(range(40)))
    assert 3 not in done
    # Still usable afterwards.
    out: list[int] = []
    fanout.run(out.append, [1, 2, 3])
    assert sorted(out) == [1, 2, 3]
    fanout.close()
    fanout.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        fanout.run(out.append, [1, 2])


def test_runs_from_several_threads_take_turns() -> None:
    fanout = Fanout(4)
    totals = [0] * 4

    def caller(k: int) -> None:
        for _ in range(20):
            items = list(range(10))
            got: list[int] = []
            lock = threading.Lock()

            def fn(item: int, got: list[int] = got, lock: threading.Lock = lock) -> None:
                with lock:
                    got.append(item)

            fanout.run(fn, items)
            assert sorted(got) == items
            totals[k] += len(got)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    fanout.close()
    assert totals == [200] * 4


@pytest.mark.parametrize("bad", [0, 257, 2.0, True])
def test_bad_thread_count(bad: object) -> None:
    with pytest.raises(ValueError, match="nthreads must be an int in"):
        Fanout(bad)  # type: ignore[arg-type]


def test_submitted_calls_all_run_before_close_returns() -> None:
    fanout = Fanout(3)
    done: list[int] = []
    lock = threading.Lock()

    def record(item: int) -> None:
        with lock:
            done.append(item)

    for i in range(50):
        fanout.submit(record, i)
    fanout.run(record, list(range(100, 110)))  # a run shares the helpers with the calls
    fanout.close()
    assert sorted(done) == [*range(50), *range(100, 110)]
    assert fanout.calls_submitted == 50 and fanout.calls_failed == 0
    with pytest.raises(RuntimeError, match="closed"):
        fanout.submit(record, 1)


def test_a_submitted_call_that_raises_is_counted_and_the_helpers_go_on() -> None:
    fanout = Fanout(1)  # one thread for runs still gets one helper for calls
    seen: list[int] = []

    def boom(item: int) -> None:
        if item == 0:
            raise ValueError("boom")
        seen.append(item)

    fanout.submit(boom, 0)
    fanout.submit(boom, 1)
    fanout.close()
    assert seen == [1] and fanout.calls_failed == 1
