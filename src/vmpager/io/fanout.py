"""Run one blocking call over many items on a few threads at once (queue depth for reads).

The batched calls of a VM object page many pages in at once: their reads are
independent, and a disk serves several in flight faster than one after the
other (a virtio or NVMe disk: about 4x at depth 16). ``os.preadv`` releases
the GIL, so a few threads reach that depth.

``Fanout(nthreads).run(fn, items)`` calls ``fn(item)`` for every item, on the
calling thread and up to ``nthreads - 1`` helper threads, each taking items
from one shared position; it returns when every call has returned. The
helpers are started on first use and live until ``close()``. Cost: one
wake-up per helper per ``run`` call, not per item.

``submit(fn, item)`` hands one call to the same helpers and returns at once
(the vnode pager's asynchronous read-ahead): no other thread pool is needed
for transfers nobody waits for. A helper takes a ``run`` before queued
calls, so a ``run`` waits at most for the calls helpers are already in.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Fanout"]

T = TypeVar("T")

log = logging.getLogger(__name__)


class _Job(Generic[T]):
    __slots__ = ("done", "error", "fn", "items", "lock", "next", "pending")

    def __init__(self, fn: Callable[[T], None], items: Sequence[T], nworkers: int) -> None:
        self.fn = fn
        self.items = items
        self.next = 0
        self.lock = threading.Lock()
        self.pending = nworkers
        self.done = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        """Take items until none is left; record the first exception."""
        items = self.items
        fn = self.fn
        lock = self.lock
        try:
            while True:
                with lock:
                    i = self.next
                    if i >= len(items) or self.error is not None:
                        break
                    self.next = i + 1
                fn(items[i])
        except BaseException as exc:
            with lock:
                if self.error is None:
                    self.error = exc
        finally:
            with lock:
                self.pending -= 1
                if self.pending == 0:
                    self.done.set()


class Fanout:
    """A calling thread plus ``nthreads - 1`` helpers run one function over many items."""

    def __init__(self, nthreads: int, name: str = "vmpager-fanout") -> None:
        if type(nthreads) is not int or not 1 <= nthreads <= 256:
            raise ValueError(f"nthreads must be an int in [1, 256], got {nthreads!r}")
        self.nthreads = nthreads
        self._name = name
        self._threads: list[threading.Thread] = []
        self._work = threading.Condition()
        self._job: _Job[object] | None = None
        self._generation = 0
        self._wanted = 0  # helpers still to join the current job
        self._closed = False
        self._running = threading.Lock()  # one run at a time
        self._spawn = threading.Lock()  # guards _threads while helpers start
        self._calls: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._submitted = 0
        self._failed_calls = 0

    def run(self, fn: Callable[[T], None], items: Sequence[T], *, width: int | None = None) -> None:
        """Call ``fn`` on every item, at most ``width`` (default and at most
        ``nthreads``) at once; re-raise the first exception after all calls in
        progress have returned (items not started then are skipped). Blocks
        until done; runs from several threads take turns.
        """
        width = self.nthreads if width is None else max(1, min(width, self.nthreads))
        if len(items) <= 1 or width == 1:
            for item in items:
                fn(item)
            return
        with self._running:
            if self._closed:
                raise RuntimeError("fanout is closed")
            nhelpers = min(width, len(items)) - 1
            self._start_helpers(nhelpers)
            job: _Job[T] = _Job(fn, items, nhelpers + 1)
            with self._work:
                self._job = job  # type: ignore[assignment]
                self._generation += 1
                self._wanted = nhelpers
                self._work.notify(nhelpers)
            job.work()
            job.done.wait()
            with self._work:
                self._job = None
            if job.error is not None:
                raise job.error

    def submit(self, fn: Callable[[T], None], item: T) -> None:
        """Call ``fn(item)`` on a helper thread later; returns at once.

        Calls run in submission order on up to ``max(1, nthreads - 1)``
        helpers. ``fn`` must not raise: an exception is logged and dropped
        (nobody waits for the call), so ``fn`` reports its own errors. Calls
        submitted before ``close()`` still run. ``RuntimeError`` after close.
        """
        with self._work:
            if self._closed:
                raise RuntimeError("fanout is closed")
            self._calls.append((fn, item))
            self._submitted += 1
            wanted = min(len(self._calls), max(1, self.nthreads - 1))
            self._work.notify()
        if len(self._threads) < wanted:
            self._start_helpers(wanted)

    @property
    def calls_submitted(self) -> int:
        """Calls handed to ``submit`` since creation."""
        return self._submitted

    @property
    def calls_failed(self) -> int:
        """Submitted calls that raised (logged and dropped)."""
        return self._failed_calls

    def _start_helpers(self, count: int) -> None:
        with self._spawn:
            self._start_helpers_locked(count)

    def _start_helpers_locked(self, count: int) -> None:
        while len(self._threads) < count:
            t = threading.Thread(
                target=self._helper, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _helper(self) -> None:
        seen = 0
        while True:
            call = None
            with self._work:
                while (
                    not self._closed
                    and not self._calls
                    and (self._job is None or self._generation == seen or self._wanted <= 0)
                ):
                    self._work.wait()
                job = self._job
                if job is not None and self._generation != seen and self._wanted > 0:
                    seen = self._generation
                    self._wanted -= 1
                elif self._calls:
                    job = None
                    call = self._calls.popleft()
                else:  # closed, and nothing left to do
                    return
            if call is None:
                assert job is not None
                job.work()
                continue
            fn, item = call
            try:
                fn(item)
            except BaseException:
                self._failed_calls += 1
                log.exception("%s: a submitted call raised", self._name)

    def close(self) -> None:
        """Stop the helper threads (after the run in progress and the submitted
        calls). Idempotent."""
        with self._running, self._work:
            self._closed = True
            self._work.notify_all()
        for t in self._threads:
            t.join()
        self._threads.clear()
