"""The client's side of transparent paging: the pager process, mapped objects, arrays.

``PagerProcess`` starts (``python -m vmpager.mapped.server``) and talks to
the process that pages this process's mapped objects; ``MappedObject`` is
the client's handle of one such object (its calls are forwarded, so they
are coherent with the mapping); ``map()`` returns a writable memoryview of
the whole object.

How a mapping is made: this process creates the userfaultfd (it must be
the process whose memory faults) and sends it to the pager once; for each
mapping it creates a memfd of the object's size, maps it ``MAP_SHARED``,
marks it ``MADV_DONTFORK`` and registers it for missing and write-protect
faults, then sends the memfd to the pager. The pager fills, tracks and
evicts the pages (mapped/binding.py).

Failures are loud: when the pager process dies, a watcher thread prints
why, makes every mapping inaccessible and releases the faulting threads,
whose access then kills the process with SIGSEGV (nothing reads zeros);
calls on mapped objects raise ``PagerDied``. A fault the pager cannot serve
(a device read error) is reported on stderr and the access gets SIGBUS.
After ``fork()`` the child has no mapping (MADV_DONTFORK): touching an
inherited array there is a SIGSEGV, and calls raise ``PagerDied``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading
import weakref
from collections import deque
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from vmpager.errors import ObjectClosed, VmError
from vmpager.mapped import uffd as U
from vmpager.mapped.wire import recv_message, send_message
from vmpager.units import check_int, parse_size

#: The pager interpreter's thread switch interval (seconds): Python's default.
#: A shorter one bounds how long the fault thread, back from a swap read, may
#: wait for the GIL while the page daemon or an I/O thread runs Python; 0.5 and
#: 0.2 ms were measured and gained nothing (docs/mapped.md, Performance).
PAGER_SWITCH_INTERVAL = 0.005
MIN_SWITCH_INTERVAL = 1e-6
MAX_SWITCH_INTERVAL = 1.0

__all__ = ["MappedObject", "PagerDied", "PagerProcess"]


class PagerDied(VmError):
    """The pager process of mapped objects is gone (or this is a forked child)."""


_live: weakref.WeakSet[PagerProcess] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pager in list(_live):
        pager._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class PagerProcess:
    """A pager process paging this process's mapped objects with its own ``VM``.

    ``memory``, ``swap``, ``page_size`` and ``config`` are those of the VM
    it runs (swap devices must not be used by another VM at the same time).
    ``bound_limit`` caps the pages mapped in the client at once (default: what
    ``vm.max_map_count`` allows); ``faulty_swap_nblocks`` (tests) gives the VM
    swap in memory behind an error injector, set with ``inject``.
    ``switch_interval`` is the pager interpreter's thread switch interval
    (seconds, ``sys.setswitchinterval``; default ``PAGER_SWITCH_INTERVAL``):
    how long the fault thread may wait for the GIL after its I/O returns
    while the page daemon or an I/O thread runs Python.
    Raises ``UserfaultfdUnavailable`` (saying how to enable it) when
    userfaultfd cannot be used here. Thread-safe: calls are serialized.
    """

    def __init__(
        self,
        memory: int | str = "64M",
        swap: list[Any] | None = None,
        page_size: int = 4096,
        *,
        config: Any = None,
        bound_limit: int | None = None,
        faulty_swap_nblocks: int = 0,
        switch_interval: float | None = None,
    ) -> None:
        if switch_interval is not None and (
            isinstance(switch_interval, bool) or not isinstance(switch_interval, (int, float))
        ):
            raise TypeError(
                f"switch_interval must be a number of seconds, got {type(switch_interval).__name__}"
            )
        if switch_interval is not None and not (
            MIN_SWITCH_INTERVAL <= switch_interval <= MAX_SWITCH_INTERVAL
        ):
            raise ValueError(
                f"switch_interval must be between {MIN_SWITCH_INTERVAL} and "
                f"{MAX_SWITCH_INTERVAL} seconds, got {switch_interval!r}"
            )
        self.uffd = U.Userfaultfd()  # first: fails early, and explains, when unavailable
        self._lock = threading.Lock()
        self._replies: deque[tuple[Any, ...]] = deque()
        self._reply_ready = threading.Condition(self._lock)
        self._regions: dict[int, _Region] = {}  # by base address
        self._dead: str | None = None
        self._closed = False
        #: Stop the pager when the last mapping goes (``memmap``: the file is then
        #: flushed as the pager's VM closes).
        self.close_when_unmapped = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmpager.mapped.server", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        settings = {
            "memory": memory,
            "swap": swap,
            "page_size": page_size,
            "config": config,
            "bound_limit": bound_limit,
            "faulty_swap_nblocks": faulty_swap_nblocks,
            "switch_interval": (
                PAGER_SWITCH_INTERVAL if switch_interval is None else switch_interval
            ),
        }
        try:
            send_message(ours, settings)
            reply, _ = recv_message(ours)
            if reply[0] == "error":
                raise reply[1]
            _, self.pid, self.nframes, self.bound_limit = reply
            self.page_size = page_size
            send_message(ours, ("uffd",), [self.uffd.fd])
            reply, _ = recv_message(ours)
        except BaseException:
            self.process.kill()
            self.process.wait()
            ours.close()
            self.uffd.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="vmpager-watch", daemon=True)
        self._watcher.start()
        _live.add(self)

    # -- the socket ----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Read replies; notice the pager's death."""
        while True:
            try:
                message, _ = recv_message(self._sock)
            except (EOFError, OSError):
                break
            with self._lock:
                self._replies.append(message)
                self._reply_ready.notify_all()
        with self._lock:
            if self._closed:
                return
            status = self.process.wait()
            self._dead = f"the pager process (pid {self.pid}) exited with status {status}"
            self._reply_ready.notify_all()
            regions = list(self._regions.values())
        print(
            f"vmpager: {self._dead}: mapped arrays can no longer be paged; "
            "touching a page that is not resident now kills this process (SIGSEGV)",
            file=sys.stderr,
            flush=True,
        )
        for region in regions:
            # No access may succeed any more, so no access can see zeros once the
            # userfaultfd is gone (the kernel would then fill holes with zeros).
            U.mprotect(region.base, region.size, U.PROT_NONE)
        self.uffd.close()  # releases threads waiting on faults: they retry and fault

    def _call(self, request: tuple[Any, ...], fds: list[int] | None = None) -> Any:
        with self._lock:
            if self._dead is not None:
                raise PagerDied(f"mapped objects are unusable: {self._dead}")
            if self._closed:
                raise ObjectClosed("the pager process is closed")
            send_message(self._sock, request, fds)
            while not self._replies:
                if self._dead is not None:
                    raise PagerDied(f"mapped objects are unusable: {self._dead}")
                self._reply_ready.wait()
            status, value = self._replies.popleft()
        if status == "error":
            raise value
        return value

    def _forked(self) -> None:
        self._dead = f"this process is a fork() child of pid {os.getppid()}"
        self._lock = threading.Lock()
        self._reply_ready = threading.Condition(self._lock)

    # -- objects ------------------------------------------------------------

    def allocate(self, size: int | str) -> MappedObject:
        """A new anonymous, zero-filled object of ``size`` bytes in the pager's VM."""
        nbytes = parse_size(size, "size", minimum=1, maximum=1 << 46)
        oid, npages, nbytes = self._call(("allocate", nbytes))
        return MappedObject(self, oid, npages, nbytes)

    def array(
        self, shape: int | tuple[int, ...], dtype: DTypeLike = "float64", *, order: str = "C"
    ) -> NDArray[Any]:
        """A zero-filled numpy array over a new mapped object (see ``VM.array``)."""
        shape_t = _check_shape(shape)
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', got {order!r}")
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise TypeError(f"dtype must not hold Python objects, got {dt}")
        nbytes = dt.itemsize * int(np.prod(shape_t, dtype=object))
        obj = self.allocate(max(nbytes, 1))
        view = obj.map()
        return np.ndarray(shape_t, dtype=dt, buffer=view, order=order)  # type: ignore[arg-type]

    def object_of(self, array: object) -> MappedObject:
        """The mapped object whose memory ``array`` (any buffer) lies in."""
        try:
            address = np.asarray(array).__array_interface__["data"][0]
        except Exception as exc:
            raise TypeError(f"array must be a numpy array or buffer, got {type(array)}") from exc
        with self._lock:
            for region in self._regions.values():
                if region.base <= address < region.base + region.size:
                    return region.obj
        raise ValueError("array is not in the memory of a mapped object of this VM")

    def statistics(self) -> Any:
        """The pager VM's ``VMStatistics``."""
        return self._call(("vm", "statistics", ()))

    def check(self) -> None:
        """The pager VM's ``check()`` (mapped regions included)."""
        self._call(("vm", "check", ()))

    def pageout(self, npages: int | None = None) -> int:
        return int(self._call(("vm", "pageout", (npages,))))

    def sync(self) -> None:
        self._call(("vm", "sync", ()))

    def inject(self, name: str, value: float) -> None:
        """Set ``read_error_rate`` or ``write_error_rate`` of the test swap device."""
        self._call(("faulty", name, value))

    def info(self) -> dict[str, Any]:
        """The pager process: pid, memfd bytes allocated, fault counts."""
        result: dict[str, Any] = self._call(("info",))
        return result

    def close(self) -> None:
        """Stop the pager process. Mapped arrays must not be used afterwards (SIGSEGV)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            regions = list(self._regions.values())
        for region in regions:
            U.mprotect(region.base, region.size, U.PROT_NONE)
        if self._dead is None and not self._forked_child():
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._sock.close()
        self.uffd.close()

    def _forked_child(self) -> bool:
        return self._dead is not None and "fork" in self._dead

    def __enter__(self) -> PagerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- mappings ------------------------------------------------------------

    def map_file(self, path: str, mode: str = "r+", *, private: bool = False) -> MappedObject:
        """The pager VM's object of the file at ``path`` (``VM.map_file``: the vnode
        pager, O_DIRECT, one object per file), to ``map()``. ``mode`` "r" or "r+";
        ``private=True``: copy-on-write, changes go to swap, never to the file."""
        oid, npages, nbytes = self._call(("map_file", os.fspath(path), mode, private))
        return MappedObject(self, oid, npages, nbytes)

    def _map(self, obj: MappedObject) -> memoryview:
        size = obj.npages * self.page_size  # a file's last page is mapped whole
        fd = U.memfd(f"vmpager-{obj.oid}", size)
        try:
            base = U.map_shared(fd, size)
            U.madvise(base, size, U.MADV_DONTFORK)
            self.uffd.register(base, size)
            self._call(("map", obj.oid, base), [fd])
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        region = _Region(obj, base, size)
        raw = (ctypes.c_char * size).from_address(base)
        view = memoryview(raw).cast("B")
        weakref.finalize(raw, self._finalized, region)
        with self._lock:
            self._regions[base] = region
        return view

    def _finalized(self, region: _Region) -> None:
        """The view's finalizer. It may run from the garbage collector inside a
        ``_call`` of this thread, which holds the (non-reentrant) lock: then the
        unmap is done by a thread of its own once the lock is free."""
        if self._lock.acquire(blocking=False):
            self._lock.release()
            self._unmapped(region)
            return
        try:
            threading.Thread(target=self._unmapped, args=(region,), daemon=True).start()
        except RuntimeError:  # interpreter shutting down: the pager goes with it
            U.munmap(region.base, region.size)

    def _unmapped(self, region: _Region) -> None:
        with self._lock:
            self._regions.pop(region.base, None)
            usable = self._dead is None and not self._closed
        U.munmap(region.base, region.size)
        if usable:
            try:
                self._call(("unmap", region.obj.oid))
            except (PagerDied, ObjectClosed, OSError):
                pass
            if self.close_when_unmapped and not self._regions:
                self.close()


def object_of(array: object) -> MappedObject:
    """The mapped object under ``array``, whichever pager process maps it."""
    for pager in list(_live):
        try:
            return pager.object_of(array)
        except ValueError:
            continue
    raise ValueError("array is not in the memory of a mapped object")


class _Region:
    """One mapping in this process; unmapped when the last view of it goes.

    The region does not hold its views: the memoryview handed out (and every
    array over it) keeps the ctypes array alive, whose finalizer unmaps.
    """

    def __init__(self, obj: MappedObject, base: int, size: int) -> None:
        self.obj = obj
        self.base = base
        self.size = size


def _check_shape(shape: int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    if not isinstance(shape, tuple) or not shape:
        raise TypeError(f"shape must be an int or a non-empty tuple of ints, got {shape!r}")
    return tuple(check_int(n, "shape", minimum=1, maximum=1 << 46) for n in shape)


class MappedObject:
    """The client's handle of a VM object in the pager process.

    Calls are forwarded, so ``read``/``write`` and a mapping of the object
    see the same bytes. ``map()`` returns a writable memoryview of the whole
    object (one mapping per object; later calls return the same view while it lives).
    """

    def __init__(self, pager: PagerProcess, oid: int, npages: int, size: int) -> None:
        self._pager = pager
        self.oid = oid
        self.npages = npages
        self.size = size
        self.page_size = pager.page_size
        self.closed = False
        self._view: weakref.ref[memoryview] | None = None

    def __repr__(self) -> str:
        return f"<MappedObject {self.oid} {self.npages} pages{' closed' if self.closed else ''}>"

    def __len__(self) -> int:
        return self.size

    def _forward(self, name: str, *args: Any) -> Any:
        if self.closed:
            raise ObjectClosed(f"VM object {self.oid} is closed")
        return self._pager._call(("call", self.oid, name, args))

    def map(self) -> memoryview:
        if self.closed:
            raise ObjectClosed(f"VM object {self.oid} is closed")
        view = self._view() if self._view is not None else None
        if view is None:
            view = self._pager._map(self)
            self._view = weakref.ref(view)
        return view

    def read(self, offset: int, length: int) -> bytes:
        return self._forward("read", offset, length)  # type: ignore[no-any-return]

    def write(self, offset: int, data: Any) -> None:
        self._forward("write", offset, bytes(data))

    def discard(self, offset: int, length: int) -> None:
        self._forward("discard", offset, length)

    def read_words(self, offsets: Any) -> NDArray[np.uint64]:
        return self._forward("read_words", np.asarray(offsets))  # type: ignore[no-any-return]

    def write_words(self, offsets: Any, values: Any) -> None:
        self._forward("write_words", np.asarray(offsets), np.asarray(values))

    def read_pages(self, pindices: Any) -> NDArray[np.uint8]:
        return self._forward("read_pages", np.asarray(pindices))  # type: ignore[no-any-return]

    def write_pages(self, pindices: Any, data: Any) -> None:
        self._forward("write_pages", np.asarray(pindices), np.asarray(data))

    def reserve(self, offset: int = 0, length: int | None = None) -> None:
        self._forward("reserve", offset, length)

    def flush(self) -> None:
        """File objects: write their dirty pages to the file now."""
        self._forward("flush")

    def clone(self) -> MappedObject:
        """A copy-on-write snapshot (an object of the same pager, not mapped yet)."""
        if self.closed:
            raise ObjectClosed(f"VM object {self.oid} is closed")
        oid, npages, size = self._pager._call(("clone", self.oid))
        return MappedObject(self._pager, oid, npages, size)

    def close(self) -> None:
        """Release the object. Its mapping must not be used afterwards (SIGBUS)."""
        if not self.closed:
            self.closed = True
            self._pager._call(("close", self.oid))

    def __enter__(self) -> MappedObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
