"""I/O engines: who performs asynchronous requests and when they complete.

An engine receives asynchronous requests from the pagers (with the VM lock
held) and must, later and without the lock, call ``perform(request)`` (the
device transfer, which sets ``request.error``), then hand the request to
``complete(requests)``, which takes the VM lock and runs the iodone logic
(NetBSD's aiodoned thread, FreeBSD's swp_pager_async_iodone).

- ``ThreadedEngine``: worker threads perform transfers (os.preadv/pwritev
  release the GIL); one completion thread runs iodone in batches.
- ``HeldEngine``: for tests; holds every request pending until the test
  completes it, in any order, optionally failing it. Covers the PEND paths
  with no sleeps.

Synchronous requests never go through an engine: the requesting thread
performs them itself with the VM lock released.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Protocol

from vmpager.errors import DeviceError
from vmpager.io.request import AnyIORequest

__all__ = ["HeldEngine", "IOEngine", "ThreadedEngine"]

Perform = Callable[[AnyIORequest], None]
Complete = Callable[[list[AnyIORequest]], None]


class IOEngine(Protocol):
    def start(self, perform: Perform, complete: Complete) -> None:
        """Bind the engine to a VM; called once before any ``submit``."""
        ...

    def submit(self, request: AnyIORequest) -> None:
        """Queue an asynchronous request. Never blocks, never completes inline."""
        ...

    def close(self) -> None:
        """Finish queued requests, then stop. Idempotent."""
        ...


class ThreadedEngine:
    """Worker threads perform transfers; a completion thread runs iodone."""

    def __init__(self, nworkers: int = 2) -> None:
        if nworkers < 1:
            raise ValueError(f"nworkers must be >= 1, got {nworkers}")
        self._nworkers = nworkers
        self._todo: queue.SimpleQueue[AnyIORequest | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[AnyIORequest | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._perform: Perform | None = None
        self._complete: Complete | None = None
        self._closed = False

    def start(self, perform: Perform, complete: Complete) -> None:
        self._perform = perform
        self._complete = complete
        for i in range(self._nworkers):
            t = threading.Thread(target=self._work, name=f"vmpager-io-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._iodone, name="vmpager-iodone", daemon=True)
        t.start()
        self._completion_thread = t

    def submit(self, request: AnyIORequest) -> None:
        if self._closed:
            raise RuntimeError("I/O engine is closed")
        self._todo.put(request)

    def _work(self) -> None:
        assert self._perform is not None
        perform = self._perform
        while True:
            request = self._todo.get()
            if request is None:
                return
            try:
                perform(request)
            except DeviceError as exc:
                request.error = exc
            except BaseException as exc:  # never lose a completion
                request.error = DeviceError(5, "engine", request.blk, repr(exc))
            self._done.put(request)

    def _iodone(self) -> None:
        assert self._complete is not None
        complete = self._complete
        while True:
            request = self._done.get()
            if request is None:
                return
            batch = [request]
            stop = False
            while True:  # drain: one lock acquisition for every finished request
                try:
                    more = self._done.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            complete(batch)
            if stop:
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._todo.put(None)
        for t in self._threads:
            t.join()
        if self._threads:
            self._done.put(None)
            self._completion_thread.join()


class HeldEngine:
    """Holds asynchronous requests until the test says how they end."""

    def __init__(self) -> None:
        self.pending: list[AnyIORequest] = []
        self._perform: Perform | None = None
        self._complete: Complete | None = None

    def start(self, perform: Perform, complete: Complete) -> None:
        self._perform = perform
        self._complete = complete

    def submit(self, request: AnyIORequest) -> None:
        self.pending.append(request)

    def complete(self, index: int = 0, error: DeviceError | None = None) -> AnyIORequest:
        """Finish pending request ``index``: perform it, or fail it with ``error``.

        A failed request does not touch the device (as a write that never
        reached it). Call without the VM lock held.
        """
        assert self._perform is not None and self._complete is not None
        request = self.pending.pop(index)
        if error is None:
            try:
                self._perform(request)
            except DeviceError as exc:
                request.error = exc
        else:
            request.error = error
        self._complete([request])
        return request

    def complete_all(self) -> int:
        n = 0
        while self.pending:
            self.complete(0)
            n += 1
        return n

    def close(self) -> None:
        self.complete_all()
