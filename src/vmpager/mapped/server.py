"""The pager process: a VM that serves the page faults of a client's mapped objects.

Started by the client (mapped/client.py) as ``python -m vmpager.mapped.server FD``
with one end of a Unix stream socket. It hosts one ``VM`` (page daemon, swap
pager, clustering, read-ahead, swap devices, write-error policy: the same
classes as any VM) for the client's mapped objects, and runs two threads:

- the request loop (main thread): the client's calls on its objects
  (``read``, ``write``, ``discard``, ``clone``, statistics...), executed on
  the VM and answered in order;
- the fault loop: reads the client's page faults from the userfaultfd and
  resolves each one (``SharedRegion.fault``) under the VM lock. It never
  needs the client: a client thread faulting inside numpy holds its GIL for
  as long as the operation lasts, and everything, eviction and swap I/O
  included, happens here meanwhile.

A fault that cannot be served (a device read error, swap exhausted, an
object closed under its mapping) is answered with a poisoned page: the
client's access gets SIGBUS, never zeros; this process prints why on its
stderr (the client's) first. The process exits when the client's
socket closes.

Messages are pickles framed by an 8-byte length; descriptors ride with a
message's header (SCM_RIGHTS).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import pickle
import select
import socket
import sys
import threading
import traceback
from typing import Any

import numpy as np

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.mapped import uffd as U
from vmpager.mapped.binding import SharedRegion, bound_page_limit
from vmpager.mapped.wire import recv_message, send_message
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

__all__ = ["serve"]

#: Object methods the client may call through its proxy.
OBJECT_CALLS = frozenset(
    {
        "read",
        "write",
        "discard",
        "read_words",
        "write_words",
        "read_pages",
        "write_pages",
        "reserve",
        "flush",
    }
)
#: VM methods the client may call.
VM_CALLS = frozenset({"statistics", "check", "pageout", "sync", "swapinfo", "wait_idle"})

COUNTS = (
    "faults",
    "soft_faults",
    "wp_faults",
    "spurious_faults",
    "early_dirty",
    "ahead_pages",
    "unbinds",
    "unbind_runs",
    "daemon_unbinds",
    "dropped",
)


class PagerServer:
    def __init__(self, sock: socket.socket, settings: dict[str, Any]) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        # Pageout clusters must not take neighbours from the active queue: an
        # active page of a mapped object may be writable by the client, and a
        # write of it would mark it clean while the client goes on writing.
        config = dataclasses.replace(
            settings.get("config") or VMConfig(), pageout_cluster_active=False
        )
        page_size = settings.get("page_size", 4096)
        swap = settings.get("swap")
        self.faulty: FaultyDevice | None = None
        if settings.get("faulty_swap_nblocks"):
            # For tests of the error paths: swap in memory behind an error injector.
            self.faulty = FaultyDevice(MemoryDevice(settings["faulty_swap_nblocks"], page_size))
            swap = [self.faulty]
        self.vm = VM(settings["memory"], swap, page_size, config=config)
        self.uffd: U.Userfaultfd | None = None
        self.regions: dict[int, SharedRegion] = {}  # by oid
        self._bases: list[int] = []
        self._by_base: list[SharedRegion] = []
        self.objects: dict[int, VMObject] = {}
        self.counts = dict.fromkeys(COUNTS, 0)
        self.limit = settings.get("bound_limit") or bound_page_limit()
        self._stop_r, self._stop_w = os.pipe()
        self.fault_errors = 0

    # -- messages ------------------------------------------------------------

    def _send(self, message: object) -> None:
        with self.send_lock:
            send_message(self.sock, message)

    def run(self) -> None:
        faults = threading.Thread(target=self._fault_loop, name="vmpager-faults", daemon=True)
        self._send(("ready", os.getpid(), self.vm.frames.nframes, self.limit))
        try:
            while True:
                try:
                    request, fds = recv_message(self.sock)
                except (EOFError, ConnectionError):
                    return
                if request[0] == "uffd":
                    self.uffd = U.Userfaultfd(fds[0])
                    faults.start()
                    self._send(("ok", None))
                    continue
                try:
                    result = self._dispatch(request, fds)
                except BaseException as exc:  # every error goes back to the caller
                    self._send(("error", _picklable(exc)))
                else:
                    self._send(("ok", result))
        finally:
            os.write(self._stop_w, b"x")
            if faults.is_alive():
                faults.join(5)
            self.vm.close()

    def _dispatch(self, request: tuple[Any, ...], fds: list[int]) -> object:
        op = request[0]
        vm = self.vm
        if op == "allocate":
            obj = vm.allocate(request[1])
            self.objects[obj.oid] = obj
            return obj.oid, obj.npages, obj.size
        if op == "map_file":
            _, path, mode, private = request
            fobj = vm.map_file(path, mode, private=private)
            self.objects[fobj.oid] = fobj
            return fobj.oid, fobj.npages, fobj.size
        if op == "map":
            _, oid, base = request
            return self._map(self.objects[oid], fds[0], base)
        if op == "unmap":
            self._unmap(request[1])
            return None
        if op == "call":
            _, oid, name, args = request
            if name not in OBJECT_CALLS:
                raise ValueError(f"{name!r} is not a method of a mapped object")
            if name == "flush":
                self._flush(self.objects[oid])
                return None
            return self._object_call(self.objects[oid], name, args)
        if op == "clone":
            return self._clone(self.objects[request[1]])
        if op == "close":
            self._close(request[1])
            return None
        if op == "vm":
            _, name, args = request
            if name not in VM_CALLS:
                raise ValueError(f"{name!r} is not a VM method")
            return getattr(vm, name)(*args)
        if op == "info":
            return self.info()
        if op == "faulty" and self.faulty is not None:
            _, name, value = request
            if name not in ("read_error_rate", "write_error_rate"):
                raise ValueError(f"{name!r} is not a setting of the error injector")
            setattr(self.faulty, name, value)
            return None
        raise ValueError(f"unknown request {op!r}")

    # -- objects ------------------------------------------------------------

    def _map(self, obj: VMObject, memfd: int, base: int) -> int:
        assert self.uffd is not None
        with self.vm.kernel.cond:
            if obj.storage is not None:
                os.close(memfd)
                raise ValueError(f"VM object {obj.oid} is mapped already")
            region = SharedRegion(
                self.vm.kernel, obj, self.uffd, memfd, base, self.limit, self.counts
            )
            obj.storage = region
            self.regions[obj.oid] = region
            i = bisect.bisect(self._bases, base)
            self._bases.insert(i, base)
            self._by_base.insert(i, region)
        return base

    def _unmap(self, oid: int) -> None:
        with self.vm.kernel.cond:
            region = self.regions.pop(oid, None)
            if region is None:
                return
            i = self._by_base.index(region)
            del self._bases[i]
            del self._by_base[i]
            region.close()

    def _object_call(self, obj: VMObject, name: str, args: tuple[Any, ...]) -> object:
        """A call on a mapped object: the frames of the bound pages it reads or writes
        are empty (their contents are in the memfd), so those pages are detached
        first, and the region's faults wait until the call is done."""
        region = self.regions.get(obj.oid)
        if region is None or name == "reserve":
            return getattr(obj, name)(*args)
        cond = self.vm.kernel.cond
        shift = self.vm.kernel.page_shift
        with cond:
            region.calls += 1
            try:
                if name in ("read", "write", "discard"):
                    offset = int(args[0])
                    length = int(args[1]) if name != "write" else len(args[1])
                    region.detach(offset >> shift, ((offset + length - 1) >> shift) + 1)
                else:  # read_words, write_words: byte offsets; read_pages, write_pages
                    indices = np.asarray(args[0]).astype(np.int64, copy=False)
                    if name.endswith("_words"):
                        indices = indices >> shift
                    region.detach_pages(np.unique(indices).tolist())
            except (TypeError, ValueError, OverflowError):
                region.unbind_all()  # arguments the call itself will refuse
        try:
            return getattr(obj, name)(*args)
        finally:
            with cond:
                region.calls -= 1
                cond.notify_all()

    def _clone(self, obj: VMObject) -> tuple[int, int, int]:
        vm = self.vm
        with vm.kernel.cond:
            vm.kernel.check_open()
            region = self.regions.get(obj.oid)
            if region is not None:
                # Pages move to the frozen backing object: none may stay aliased.
                region.unbind_all()
            copy = vm.kernel.clone_locked(obj)
        self.objects[copy.oid] = copy
        return copy.oid, copy.npages, copy.size

    def _flush(self, obj: VMObject) -> None:
        """Write a file object's dirty pages: with its mapping detached and its faults
        held until done (a page the client could write must not be cleaned)."""
        flush = getattr(obj, "flush", None)
        if flush is None:
            raise TypeError(f"VM object {obj.oid} is not a file: there is nothing to flush")
        vm = self.vm
        region = self.regions.get(obj.oid)
        with vm.kernel.cond:
            if region is not None:
                region.flushing = True
                region.unbind_all()
        try:
            flush()
        finally:
            with vm.kernel.cond:
                if region is not None:
                    region.flushing = False
                    vm.kernel.cond.notify_all()

    def _close(self, oid: int) -> None:
        obj = self.objects.pop(oid, None)
        if obj is not None:
            obj.close()
        self._unmap(oid)

    def info(self) -> dict[str, Any]:
        with self.vm.kernel.cond:
            memfd = sum(r.allocated_bytes() for r in self.regions.values())
            bound = sum(len(r.bound) for r in self.regions.values())
            counts = dict(self.counts)
        return {
            "pid": os.getpid(),
            **_own_memory(),
            "memfd_bytes": memfd,
            "bound_npages": bound,
            "bound_limit": self.limit,
            "fault_errors": self.fault_errors,
            "switch_interval": sys.getswitchinterval(),
            **counts,
        }

    # -- faults ------------------------------------------------------------

    def _region_at(self, address: int) -> SharedRegion | None:
        i = bisect.bisect(self._bases, address) - 1
        if i < 0:
            return None
        region = self._by_base[i]
        return region if address < region.base + region.size else None

    def _fault_loop(self) -> None:
        profile = os.environ.get("VMPAGER_PAGER_PROFILE")
        if not profile:
            self._serve_faults()
            return
        # Where the fault thread's time goes (benchmarks): a cProfile dump at exit.
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            self._serve_faults()
        finally:
            profiler.disable()
            profiler.dump_stats(profile)

    def _serve_faults(self) -> None:
        assert self.uffd is not None
        uffd = self.uffd
        vm = self.vm
        poll = select.poll()
        poll.register(uffd.fd, select.POLLIN)
        poll.register(self._stop_r, select.POLLIN)
        while True:
            events = poll.poll()
            if any(fd == self._stop_r for fd, _ in events):
                return
            for fault in uffd.read_faults():
                with vm.kernel.cond:
                    region = self._region_at(fault.address)
                    try:
                        if region is None or region.obj.closed:
                            raise ValueError(
                                f"fault at {fault.address:#x}: no open mapped object there "
                                "(used after close or unmap)"
                            )
                        region.fault(fault)
                    except BaseException as exc:  # the client must not wait for ever
                        self._fault_failed(fault, exc)

    def _fault_failed(self, fault: U.Fault, exc: BaseException) -> None:
        assert self.uffd is not None
        self.fault_errors += 1
        ps = self.vm.page_size
        page_addr = fault.address & ~(ps - 1)
        message = f"{type(exc).__name__}: {exc}"
        # Printed here, on the stderr the client gave this process, before the
        # poisoned page can kill the client.
        print(
            f"vmpager: the pager cannot serve the page at {page_addr:#x} of a mapped "
            f"object: {message}; the access gets SIGBUS",
            file=sys.stderr,
            flush=True,
        )
        try:
            try:
                self.uffd.poison(page_addr, ps)
            except FileExistsError:
                # A write-protect marker is left where a protected page was punched:
                # clearing the protection removes it.
                self.uffd.writeprotect(page_addr, ps, False, wake=False)
                self.uffd.poison(page_addr, ps)
        except OSError:
            traceback.print_exc()
            try:
                self.uffd.wake(page_addr, ps)
            except OSError:
                pass


def _own_memory() -> dict[str, int]:
    """This process's resident memory (smaps_rollup): all of it and its anonymous part
    (the frames not aliased onto a memfd, and the interpreter)."""
    out = {"rss_bytes": -1, "anonymous_bytes": -1}
    keys = {"Rss:": "rss_bytes", "Anonymous:": "anonymous_bytes"}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in keys:
                    out[keys[parts[0]]] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        settings, _ = recv_message(sock)
    except EOFError:
        return
    interval = settings.get("switch_interval")
    if interval:
        sys.setswitchinterval(interval)
    try:
        server = PagerServer(sock, settings)
    except BaseException as exc:
        send_message(sock, ("error", _picklable(exc)))
        return
    server.run()


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash of the pager says where
    serve(int(sys.argv[1]))
