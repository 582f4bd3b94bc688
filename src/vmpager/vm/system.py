"""The VM: the public entry point, and the wiring of the kernel's parts.

``VM`` checks its arguments, builds one ``Kernel`` (vm/kernel.py: the lock,
frames, queues, counters, watermarks, the object table and the services the
pagers, the fault path, the daemon and batched calls share), attaches the
pagers, the swap devices (vm/swapctl.py), the I/O engine and the page daemon
to it, and forwards its public methods there. The kernel's one lock is the
"Giant" lock of FreeBSD 2002 and NetBSD 1.48: it guards every piece of VM
state; device transfers run with it released while the pages involved are
busy, and one condition variable carries every wake-up.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmpager.devices.protocol import BlockDevice
from vmpager.errors import CorruptPage, InvariantViolation
from vmpager.io.engine import IOEngine, ThreadedEngine
from vmpager.io.request import IOKind
from vmpager.pager.device import DevicePager
from vmpager.pager.swap import SwapPager
from vmpager.pager.vnode import VnodePager
from vmpager.swap.space import SwapDeviceStatistics
from vmpager.tiers.tier import SwapTier, TierStatistics
from vmpager.units import check_int, parse_size
from vmpager.vm import invariants
from vmpager.vm.config import VMConfig
from vmpager.vm.kernel import Kernel
from vmpager.vm.object import ObjectKind, VMObject
from vmpager.vm.pageout import PageDaemon
from vmpager.vm.stats import VMStatistics
from vmpager.vm.swapctl import SwapControl, SwapSpec

if TYPE_CHECKING:
    import os
    from typing import Any

    from numpy.typing import DTypeLike, NDArray

    from vmpager.io.fanout import Fanout
    from vmpager.io.inflight import InflightLimits
    from vmpager.mapped.client import MappedObject, PagerProcess
    from vmpager.swap.space import SwapSpace
    from vmpager.vm.frames import FramePool
    from vmpager.vm.pagermap import PagerMap
    from vmpager.vm.queues import PageQueues
    from vmpager.vm.registry import PagerRegistry
    from vmpager.vm.stats import Counters

__all__ = ["VM", "ScrubReport"]

_MIN_NFRAMES = 4

#: The VM of each kernel, for ``VMObject.map`` (an object knows only its kernel).
_VM_OF: weakref.WeakKeyDictionary[Kernel, VM] = weakref.WeakKeyDictionary()


class VM:
    """A virtual-memory system with a fixed memory budget and swap.

    ``memory``: the budget for resident pages ("64M", or bytes).
    ``swap``: None for the embedded default (a private, sparse swap file in
    the temporary directory, unlinked as soon as it is open, sized to the
    smaller of 64 GiB and 90 % of the free space there); otherwise a list of devices: "path:size"
    strings (the file is created if missing), "path" for an existing file or
    block device, (path, size) tuples, or ``BlockDevice`` objects; ``[]`` for
    no swap at all; a string with ``://`` is a remote device's URL
    (``redis://host:port/db?size=4G``, ``redis+cluster://host:port?size=64G``;
    see ``vmpager.devices.url``), opened and checked here.
    ``page_size``: a power of two >= 4096.
    ``layout``: "per_device" (round-robin over devices) or "stripe" (the
    FreeBSD 2002 interleave). ``engine``: the asynchronous I/O engine (tests pass a
    ``HeldEngine``). ``replicas``: for URL swap devices without a
    ``replicas`` parameter, the replicas each page-out must reach before the
    page counts as clean (see docs/far-memory.md).

    Swap tiers (docs/tiers.md): ``compress`` ("lz4", "zstd" or None) keeps
    pages leaving the frames in a compressed pool first; ``compress_pool``
    is its fixed share of ``memory`` (a fraction, or a size; default a fifth),
    taken out of the frames. ``encrypt=True`` encrypts every page written to
    a swap device (AES-256-GCM, a key per device held only in memory).
    ``integrity`` (default on) checks every page read from swap against an
    xxh3-64 checksum (or the GCM tag): a mismatch raises ``CorruptPage``.

    ``kernel`` is the internal interface the parts inside share (pagers,
    tests); it is not for applications.
    """

    def __init__(
        self,
        memory: int | str = "64M",
        swap: Sequence[SwapSpec] | None = None,
        page_size: int = 4096,
        *,
        config: VMConfig | None = None,
        layout: str = "per_device",
        engine: IOEngine | None = None,
        replicas: int | None = None,
        compress: str | None = None,
        compress_pool: int | str | float | None = None,
        encrypt: bool = False,
        integrity: bool = True,
    ) -> None:
        page_size = check_int(page_size, "page_size", minimum=4096, maximum=1 << 24)
        if page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 4096, got {page_size}")
        memory_bytes = parse_size(memory, "memory", minimum=_MIN_NFRAMES * page_size)
        pool_bytes = _pool_share(compress, compress_pool, memory_bytes, page_size)
        # The pool's share is fixed and comes out of the frames: frames + pool <= memory.
        frame_bytes = memory_bytes - pool_bytes
        if layout not in ("per_device", "stripe"):
            raise ValueError(f"layout must be 'per_device' or 'stripe', got {layout!r}")
        self.config = config if config is not None else VMConfig()
        self.page_size = page_size
        kernel = self.kernel = Kernel(self.config, page_size, frame_bytes // page_size, layout)
        #: The swap tiers every swap transfer goes through (None: plain swap).
        self.tier: SwapTier | None = None
        if compress is not None or encrypt or integrity:
            self.tier = SwapTier(
                page_size,
                compress=compress,
                pool_capacity=pool_bytes,
                encrypt=encrypt,
                integrity=integrity,
            )
            kernel.space.attach_tier(self.tier)
        # The concrete pagers stay here too, for the attributes tools and tests read.
        self._swap_pager = SwapPager(kernel, kernel.space)
        self._vnode_pager = VnodePager(kernel)
        self._device_pager = DevicePager(kernel)
        kernel.attach_pagers(self._swap_pager, self._vnode_pager, self._device_pager)
        # Encrypted swap is unreadable once the VM's keys are gone: files the VM
        # creates for it go with the VM.
        remove_created = self.tier is not None and self.tier.encrypt
        self._mapped: PagerProcess | None = None  # transparent paging, started on demand
        _VM_OF[kernel] = self
        self._swapctl = SwapControl(kernel, replicas, remove_created=remove_created)
        try:
            self._swapctl.open_initial(swap)
        except BaseException:
            kernel.frames.close()
            raise
        kernel.attach_engine(
            engine if engine is not None else ThreadedEngine(self.config.io_workers)
        )
        kernel.attach_daemon(PageDaemon(kernel))
        if self.config.daemon_thread:
            kernel.daemon.start()

    # -- the kernel's parts, as attributes (read-only views for tools and tests) -----

    @property
    def frames(self) -> FramePool:
        return self.kernel.frames

    @property
    def queues(self) -> PageQueues:
        return self.kernel.queues

    @property
    def counters(self) -> Counters:
        return self.kernel.counters

    @property
    def space(self) -> SwapSpace:
        return self.kernel.space

    @property
    def pagers(self) -> PagerRegistry:
        return self.kernel.pagers

    @property
    def swap_pager(self) -> SwapPager:
        return self._swap_pager

    @property
    def vnode_pager(self) -> VnodePager:
        return self._vnode_pager

    @property
    def device_pager(self) -> DevicePager:
        return self._device_pager

    @property
    def pagermap(self) -> PagerMap:
        return self.kernel.pagermap

    @property
    def inflight(self) -> InflightLimits:
        return self.kernel.inflight

    @property
    def fanout(self) -> Fanout:
        return self.kernel.fanout

    @property
    def engine(self) -> IOEngine:
        return self.kernel.engine

    @property
    def daemon(self) -> PageDaemon:
        return self.kernel.daemon

    @property
    def free_min_nframes(self) -> int:
        return self.kernel.free_min_nframes

    @property
    def free_target_nframes(self) -> int:
        return self.kernel.free_target_nframes

    @property
    def inactive_target(self) -> int:
        return self.kernel.inactive_target

    # -- swap devices -----------------------------------------------------------

    def swapon(self, path: str | BlockDevice, size: int | str | None = None) -> None:
        """Add a swap device while running (a file is created if ``size`` is given)."""
        self._swapctl.swapon(path, size)

    def swapoff(self, device: str | int, *, force: bool = False) -> None:
        """Remove a swap device, moving every page it holds to memory or other devices.

        Refuses with ``SwapExhausted`` when free frames plus the free swap of
        the other devices cannot hold the device's pages; ``force=True`` tries
        anyway (pages move until room runs out, then ``SwapExhausted`` and the
        device stays in use, with nothing lost).
        """
        self._swapctl.swapoff(device, force=force)

    def swapinfo(self) -> tuple[SwapDeviceStatistics, ...]:
        """Use of every swap device, in blocks of ``page_size`` bytes (swapctl -l)."""
        with self.kernel.cond:
            return self.kernel.swap_pager.space_statistics().devices

    def allocate(self, size: int | str, *, reserve: bool = False) -> VMObject:
        """A new anonymous, zero-filled, swap-backed object of ``size`` bytes.

        ``size`` is rounded up to whole pages; it may be far larger than memory.
        ``reserve=True`` assigns its swap now (``VMObject.reserve``): the
        allocation raises ``SwapExhausted`` instead of a later pageout failing.
        """
        nbytes = parse_size(size, "size", minimum=1, maximum=1 << 60)
        if not isinstance(reserve, bool):
            raise TypeError(f"reserve must be a bool, got {reserve!r}")
        with self.kernel.cond:
            self.kernel.check_open()
            npages = -(-nbytes // self.page_size)
            obj = VMObject(self.kernel, 0, npages, ObjectKind.ANONYMOUS)
            self.kernel.register_object(obj)
            if reserve and not self.swap_pager.reserve(obj, 0, npages):
                self.kernel.destroy_object(obj)
                self.kernel.reservation_failed(npages)
            return obj

    def map_file(
        self, path: str | os.PathLike[str], mode: str = "r", *, private: bool = False
    ) -> VMObject:
        """A VM object backed by the file at ``path`` (the vnode pager).

        ``mode`` "r" or "r+"; ``private=True`` makes a copy-on-write mapping
        whose changes go to swap, never to the file. Maps of one file share
        one object; see pager/vnode.py for sizes, flush and truncate.
        """
        from vmpager.pager.vnode import map_file

        return map_file(self.kernel, path, mode=mode, private=private)

    def map_device(self, buffer: object) -> VMObject:
        """A VM object over fixed memory (bytearray, mmap, numpy array): the device pager."""
        from vmpager.pager.device import map_device

        return map_device(self.kernel, buffer)

    # -- transparent paging (mapped/): objects as plain memory ----------------------

    @property
    def mapped(self) -> PagerProcess:
        """The pager process of this VM's mapped objects, started on first use.

        It runs a VM with this one's memory budget, page size and config and
        its own embedded swap; see docs/mapped.md. Raises
        ``UserfaultfdUnavailable`` (saying how to enable it) when
        userfaultfd cannot be used here.
        """
        with self.kernel.cond:
            self.kernel.check_open()
            pager = self._mapped
        if pager is not None:
            return pager
        from vmpager.mapped.client import PagerProcess

        started = PagerProcess(
            self.frames.nframes * self.page_size, None, self.page_size, config=self.config
        )
        with self.kernel.cond:
            if self._mapped is None:
                self._mapped = started
                return started
            pager = self._mapped
        started.close()  # another thread started one first
        return pager

    def array(
        self, shape: int | tuple[int, ...], dtype: DTypeLike = "float64", *, order: str = "C"
    ) -> NDArray[Any]:
        """A zero-filled ``numpy.ndarray`` whose memory is a new mapped object.

        Any code may index, slice, sort it or hand it to a C library; its
        pages are paged by the pager process (``mapped``) within the memory
        budget. ``object_of(array)`` gives the object (read, write, discard,
        clone). The array stays usable while any view of it lives and the VM
        is open; see docs/mapped.md for fork, errors and close.
        """
        return self.mapped.array(shape, dtype, order=order)

    def object_of(self, array: object) -> MappedObject:
        """The mapped object whose memory ``array`` lies in (``ValueError`` if none)."""
        return self.mapped.object_of(array)

    def objects(self) -> list[VMObject]:
        with self.kernel.cond:
            return list(self.kernel.objects.values())

    def pageout(self, npages: int | None = None, *, asynchronous: bool = False) -> int:
        """Run the page daemon's scan in this thread until ``npages`` more frames are free.

        For tests and tools. ``asynchronous=True`` acts exactly as the daemon
        thread does (writes go through the I/O engine and complete later).
        Returns the number of frames freed.
        """
        with self.kernel.cond:
            self.kernel.check_open()
            before = self.frames.free_nframes
            target = (
                self.frames.nframes
                if npages is None
                else min(self.frames.nframes, before + check_int(npages, "npages", minimum=0))
            )
            self.kernel.scan_here(target, asynchronous=asynchronous)
            return self.frames.free_nframes - before

    def set_swap_async_max(self, value: int) -> int:
        """Change the asynchronous write limit while running; returns the clamped value."""
        with self.kernel.cond:
            return self.inflight.set_async_max(value)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no asynchronous write is in flight. Returns False on timeout."""
        with self.kernel.cond:
            return self.kernel.cond.wait_for(
                lambda: self.inflight.in_flight(IOKind.WRITE_ASYNC) == 0, timeout
            )

    def statistics(self) -> VMStatistics:
        with self.kernel.cond:
            c = self.counters
            s = self.kernel.swap_pager.space_statistics()
            q = self.queues
            resident = sum(len(o.pages) for o in self.kernel.objects.values())
            dirty = self.kernel.ndirty
            return VMStatistics(
                page_size=self.page_size,
                nframes=self.frames.nframes,
                free_nframes=self.frames.free_nframes,
                resident_npages=resident,
                active_npages=len(q.active),
                inactive_npages=len(q.inactive),
                dirty_npages=dirty,
                faults=c.faults,
                zero_fills=c.zero_fills,
                cow_copies=c.cow_copies,
                clones=c.clones,
                collapses=c.collapses,
                pageins=c.pageins,
                pagein_pages=c.pagein_pages,
                readaround_pages=c.readaround_pages,
                readaround_hits=c.readaround_hits,
                pageouts=c.pageouts,
                pageout_pages=c.pageout_pages,
                pageout_fail_pages=c.pageout_fail_pages,
                cluster_histogram=tuple(sorted(c.cluster_hist.items())),
                swap_total_blocks=s.total,
                swap_used_blocks=s.used,
                swap_bad_blocks=s.bad,
                swap_almost_full=s.almost_full,
                swap_full=s.full,
                read_errors=c.read_errors,
                write_errors=c.write_errors,
                bad_blocks_marked=c.bad_blocks_marked,
                swap_exhausted=c.swap_exhausted,
                frame_waits=c.frame_waits,
                async_writes_in_flight=self.inflight.in_flight(IOKind.WRITE_ASYNC),
                swap_async_max=self.inflight.async_max,
                objects=len(self.kernel.objects),
                daemon_scans=self.daemon.scans,
            )

    def close(self) -> None:
        """Stop the daemon, finish I/O, free every object and remove the private swap."""
        with self.kernel.cond:
            if self.kernel.closed:
                return
            mapped, self._mapped = self._mapped, None
        if mapped is not None:
            mapped.close()  # the pager process of mapped objects
        with self.kernel.cond:
            for obj in list(self.kernel.objects.values()):
                obj._before_close()  # file objects write their dirty pages back
        self.daemon.stop()
        self.engine.close()
        self.fanout.close()
        with self.kernel.cond:
            for obj in list(self.kernel.objects.values()):
                obj._before_close()
                pager = obj.pager
                obj.mark_closed()
                self.kernel.drop_pages(obj, 0, obj.npages, force=True)
                pager.dealloc(obj)
            self.kernel.objects.clear()
            self.kernel.closed = True
        self._swapctl.close_devices()
        self.frames.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        nobjects = len(self.kernel.objects)
        return f"<VM {self.frames.nframes} frames of {self.page_size} B, {nobjects} objects>"

    def sync(self) -> None:
        """Wait for asynchronous pageouts in flight, then flush every swap device."""
        self.kernel.sync()

    def data_map(self, obj: VMObject, first: int, npages: int) -> list[bool]:
        """For pages ``first .. first + npages - 1``: does the page hold data?

        True when some object of its shadow chain has the page resident or
        on its pager; False for pages that read as zeros because nothing was
        ever written there (or it was discarded). O(npages) per chain level.
        """
        return self.kernel.data_map(obj, first, npages)

    def tier_statistics(self) -> TierStatistics | None:
        """The swap tiers' statistics (pool, rejects, writebacks, corrupt pages), or None."""
        if self.tier is None:
            return None
        with self.kernel.cond:
            self._swap_pager.space_statistics()  # deferred frees done: freed blocks leave the pool
        return self.tier.statistics()

    def scrub(self) -> ScrubReport:
        """Read and verify every swapped page; returns what was checked and found corrupt.

        Pages in the compressed pool are decompressed, pages on devices read
        and checked against their checksum or tag (a block being written is
        skipped: its new content is checked next time). Corrupt blocks become
        bad as on a read; each ``CorruptPage`` names its page. Runs with the
        VM lock released between blocks; costs one device read per page.
        Without integrity (``integrity=False`` and no encryption) nothing can
        be checked and the report says so (``checked == 0``).
        """
        with self.kernel.cond:
            self.kernel.check_open()
            oids, pindexes, blks = self._swap_pager.swapped_pages()
            owners = []
            for oid, pindex, blk in zip(
                oids.tolist(), pindexes.tolist(), blks.tolist(), strict=True
            ):
                obj = self.kernel.objects.get(oid)
                if obj is not None and self._swap_pager.block_of(obj, pindex) == blk:
                    owners.append((oid, pindex, blk))
        tier = self.tier
        corrupt: list[CorruptPage] = []
        checked = 0
        if tier is None or (not tier.integrity and tier.compress is None):
            return ScrubReport(checked=0, corrupt=())
        for oid, pindex, blk in owners:
            with self.kernel.cond:
                # Still this page's block? (It may have been freed meanwhile.)
                obj = self.kernel.objects.get(oid)
                if obj is None or self._swap_pager.block_of(obj, pindex) != blk:
                    continue
                try:
                    device, dblk = self.space.locate(blk)
                except ValueError:
                    continue
            found = tier.verify(blk, device, dblk)
            checked += 1
            if found is not None:
                self.counters.read_errors += 1
                corrupt.append(found.naming(oid, pindex * self.page_size))
        return ScrubReport(checked=checked, corrupt=tuple(corrupt))

    def check(self) -> None:
        """Check every invariant; raises ``InvariantViolation`` listing each one broken."""
        with self.kernel.cond:
            found = invariants.problems(self.kernel)
        if found:
            raise InvariantViolation(found)


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What ``VM.scrub`` verified: pages ``checked`` and the ``corrupt`` ones found."""

    checked: int
    corrupt: tuple[CorruptPage, ...]


def map_object(obj: VMObject) -> memoryview:
    """``obj.map()``: the object moves into its VM's pager process (mapped/moved.py)."""
    vm = _VM_OF.get(obj.kernel)
    if vm is None:
        raise TypeError(f"VM object {obj.oid} belongs to no VM and cannot be mapped")
    from vmpager.mapped.moved import move_and_map

    return move_and_map(vm, obj)


def _pool_share(
    compress: str | None, pool: int | str | float | None, memory: int, page_size: int
) -> int:
    """Bytes of ``memory`` given to the compressed pool (0 without compression).

    ``pool`` is a fraction of memory in (0, 1), a size ("64M") or None (a fifth
    of memory, zswap's default max_pool_percent). The frames keep at least
    ``_MIN_NFRAMES`` pages.
    """
    if compress is None:
        if pool is not None:
            raise ValueError("compress_pool needs compress='lz4' or 'zstd'")
        return 0
    if pool is None:
        pool = 0.2
    most = memory - _MIN_NFRAMES * page_size
    if isinstance(pool, float):
        if not 0.0 < pool < 1.0:
            raise ValueError(f"compress_pool as a fraction of memory must be in (0, 1), got {pool}")
        share = int(memory * pool)
    else:
        share = parse_size(pool, "compress_pool", minimum=page_size, maximum=most)
    if not page_size <= share <= most:
        raise ValueError(
            f"compress_pool must be between one page and memory minus {_MIN_NFRAMES} pages "
            f"({page_size}..{most} bytes), got {share}"
        )
    return share
