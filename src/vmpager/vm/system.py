"""The VM: frames, objects, pagers, the page daemon and the I/O engine in one place.

``VM`` is the public entry point. It owns one lock (the "Giant" lock of
FreeBSD 2002 and NetBSD 1.48) that guards every piece of VM state: objects, pages, queues, swap
metadata and the swap allocator. Device transfers run with the lock
released while the pages involved are busy; a single condition variable
carries every wake-up (page no longer busy, frame freed, I/O slot free,
daemon needed).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vmpager.devices.file import FileDevice
from vmpager.devices.protocol import BlockDevice
from vmpager.devices.url import is_swap_url, open_swap_url
from vmpager.errors import (
    CorruptPage,
    DeviceError,
    InvariantViolation,
    ObjectClosed,
    SwapExhausted,
)
from vmpager.io.engine import IOEngine, ThreadedEngine
from vmpager.io.fanout import Fanout
from vmpager.io.inflight import InflightLimits
from vmpager.io.request import IOKind, IORequest
from vmpager.pager import strategy
from vmpager.pager.device import DevicePager
from vmpager.pager.pagermap import PagerMap
from vmpager.pager.registry import PagerRegistry
from vmpager.pager.swap import SwapPager
from vmpager.pager.vnode import VnodePager
from vmpager.swap.space import SwapDeviceStatistics, SwapSpace
from vmpager.tiers.tier import SwapTier, TierStatistics
from vmpager.units import check_int, parse_size
from vmpager.vm import shadow
from vmpager.vm.condition import VMCondition
from vmpager.vm.config import VMConfig
from vmpager.vm.fault import hold_page
from vmpager.vm.frames import FramePool
from vmpager.vm.object import VMObject
from vmpager.vm.page import QUEUE_NONE, QUEUE_WIRED, Page
from vmpager.vm.pageout import PageDaemon
from vmpager.vm.queues import PageQueues
from vmpager.vm.stats import Counters, VMStatistics

if TYPE_CHECKING:
    import os
    from typing import Any

    from numpy.typing import DTypeLike, NDArray

    from vmpager.mapped.client import MappedObject, PagerProcess
    from vmpager.pager.protocol import Pager

__all__ = ["VM", "ScrubReport"]

log = logging.getLogger("vmpager")

_MIN_NFRAMES = 4
_DEFAULT_SWAP_MAX_BYTES = 64 << 30

SwapSpec = str | BlockDevice | tuple[str, int | str]


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
        #: offset >> page_shift is the page index, offset & page_mask the offset in it.
        self._page_shift = page_size.bit_length() - 1
        self._page_mask = page_size - 1
        self._lock = threading.Lock()
        self._cond = VMCondition(self._lock)
        #: The page daemon sleeps on its own condition (same lock), so that the
        #: wake-ups of page and frame waiters do not wake it for nothing.
        self._daemon_cond = threading.Condition(self._lock)
        self.frames = FramePool(frame_bytes // page_size, page_size)
        self.queues = PageQueues()
        self.counters = Counters()
        nframes = self.frames.nframes
        cfg = self.config
        self._read_reserve = min(cfg.read_reserve_nframes, nframes // 4)
        free_min = cfg.free_min_nframes
        if free_min is None:
            free_min = max(1, nframes // 128)
            if cfg.sequential_readahead:
                # Room for a whole read-ahead when the daemon is woken.
                free_min = max(free_min, min(cfg.readahead_max_npages, nframes // 64))
        free_target = cfg.free_target_nframes
        if free_target is None:
            free_target = max(free_min + 1, 2 * free_min, cfg.cluster_max_npages)
            if cfg.pageout_batching:
                # Enough above the minimum to keep every asynchronous write slot busy.
                batches = free_min + cfg.cluster_max_npages * cfg.swap_async_max
                free_target = max(free_target, min(batches, nframes // 8))
        free_target = min(free_target, nframes // 2)
        free_min = min(free_min, max(free_target - 1, 1))
        self.free_min_nframes = free_min + self._read_reserve
        self.free_target_nframes = max(free_target + self._read_reserve, self.free_min_nframes)
        self.inactive_target = max(nframes // 4, 2 * free_target, 1)
        self.pagermap = PagerMap(
            self._cond,
            max(cfg.pager_map_npages, 2 * cfg.cluster_max_npages + cfg.pager_map_reserve_npages),
            max(cfg.pager_map_reserve_npages, cfg.cluster_max_npages),
        )
        self.inflight = InflightLimits(self._cond, cfg.nswbuf, cfg.swap_async_max)
        self.space = SwapSpace(layout=layout)  # type: ignore[arg-type]
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
            self.space.attach_tier(self.tier)
        self.swap_pager = SwapPager(self, self.space)
        self.pagers = PagerRegistry()
        self.pagers.register("anonymous", self.swap_pager)
        self.vnode_pager = VnodePager(self)
        self.pagers.register("vnode", self.vnode_pager)
        self.device_pager = DevicePager(self)
        self.pagers.register("device", self.device_pager)
        #: Threads for the concurrent reads of batched calls (started on first use).
        depth = check_int(cfg.batch_read_depth, "config.batch_read_depth", minimum=1, maximum=256)
        check_int(cfg.batch_max_npages, "config.batch_max_npages", minimum=1)
        self.fanout = Fanout(depth)
        self._objects: dict[int, VMObject] = {}
        self._next_oid = 1
        self._stuck = False
        self._frame_waiters = 0
        #: Frames wanted beyond the target by batched calls that found too few free
        #: (vm_pageout_deficit); the daemon adds it to its next pass's target.
        self._deficit = 0
        #: The free-frame count the daemon's current pass aims for.
        self._pageout_target = self.free_target_nframes
        self._scan_owner: int | None = None
        self._read_error: DeviceError | None = None
        self._owned_devices: list[BlockDevice] = []
        #: Swap files this VM created for encrypted swap, removed when their device closes.
        self._remove_on_close: dict[int, str] = {}
        self._swap_replicas = (
            None if replicas is None else check_int(replicas, "replicas", minimum=0, maximum=16)
        )
        self._mapped: PagerProcess | None = None  # transparent paging, started on demand
        self._closed = False
        try:
            self._open_swap(swap)
        except BaseException:
            self._close_devices()
            self.frames.close()
            raise
        self.engine: IOEngine = engine if engine is not None else ThreadedEngine(cfg.io_workers)
        self.engine.start(self._perform, self._complete)
        self.daemon = PageDaemon(self)
        if cfg.daemon_thread:
            self.daemon.start()

    # -- swap devices -----------------------------------------------------------

    def _open_swap(self, swap: Sequence[SwapSpec] | None) -> None:
        if swap is None:
            directory = tempfile.gettempdir()
            size = min(_DEFAULT_SWAP_MAX_BYTES, int(shutil.disk_usage(directory).free * 0.9))
            nblocks = size // self.page_size
            if nblocks < 16:
                raise SwapExhausted(f"no room for a swap file in {directory}")
            # Unlinked at once: private, and gone with the VM even after a crash.
            device = FileDevice.temporary(nblocks, block_size=self.page_size, directory=directory)
            self._owned_devices.append(device)
            self.space.swapon(device)
            return
        if isinstance(swap, (str, bytes)):
            raise TypeError("swap must be a list of devices, e.g. ['/var/tmp/swap0:4G']")
        for spec in swap:
            self._add_swap(spec)

    def _add_swap(self, spec: SwapSpec) -> BlockDevice:
        if isinstance(spec, tuple):
            path, size = spec
            if is_swap_url(path):
                raise ValueError(f"a swap URL gives its size as '?size=...', not apart: {spec!r}")
            device: BlockDevice = self._open_file_device(path, size)
        elif isinstance(spec, str) and is_swap_url(spec):
            device = open_swap_url(spec, self.page_size, replicas=self._swap_replicas)
            self._owned_devices.append(device)
        elif isinstance(spec, str):
            path, sep, size_text = spec.rpartition(":")
            if sep and path and size_text and (size_text[0].isdigit() or size_text[0] in "+-."):
                device = self._open_file_device(path, size_text)
            else:
                device = self._open_file_device(spec, None)
        elif isinstance(spec, BlockDevice):
            device = spec
            if device.block_size != self.page_size:
                raise ValueError(
                    f"swap device {device.name}: block_size {device.block_size} "
                    f"!= page_size {self.page_size}"
                )
        else:
            raise TypeError(
                "swap entries must be 'path:size', (path, size), a URL or BlockDevice, "
                f"got {spec!r}"
            )
        self.space.swapon(device)
        return device

    def _open_file_device(self, path: str, size: int | str | None) -> BlockDevice:
        nblocks = None
        if size is not None:
            nblocks = (
                parse_size(size, f"swap size of {path}", minimum=self.page_size) // self.page_size
            )
        created = not os.path.exists(path)
        device = FileDevice(path, nblocks, block_size=self.page_size)
        self._owned_devices.append(device)
        if created and self.tier is not None and self.tier.encrypt:
            # Encrypted swap is unreadable once the VM's keys are gone: a file the
            # VM made for it goes with the VM.
            self._remove_on_close[id(device)] = path
        return device

    def swapon(self, path: str | BlockDevice, size: int | str | None = None) -> None:
        """Add a swap device while running (a file is created if ``size`` is given)."""
        with self._cond:
            self._check_vm_open()
            if isinstance(path, str):
                self._add_swap((path, size) if size is not None else path)
            else:
                self._add_swap(path)
            self._set_stuck(False)

    def swapoff(self, device: str | int, *, force: bool = False) -> None:
        """Remove a swap device, moving every page it holds to memory or other devices.

        Refuses with ``SwapExhausted`` when free frames plus the free swap of
        the other devices cannot hold the device's pages; ``force=True`` tries
        anyway (pages move until room runs out, then ``SwapExhausted`` and the
        device stays in use, with nothing lost).
        """
        with self._cond:
            self._check_vm_open()
            index = self._device_index(device)
            space = self.space
            self.swap_pager.flush_stale()
            before = space.statistics()
            dev_stats = next(d for d in before.devices if d.index == index)
            space.swapoff_begin(index)
            try:
                in_use = space.blocks_in_use(index)
                others_free = sum(
                    d.total - d.used - d.bad
                    for d in before.devices
                    if d.index != index and not d.draining
                )
                room = others_free + self.frames.free_nframes
                if len(in_use) > room and not force:
                    raise SwapExhausted(
                        f"swapoff {dev_stats.name}: {len(in_use)} pages in use, but only {room} "
                        "free frames and blocks elsewhere (use force=True to try anyway)"
                    )
                self._drain_device(index)
                removed = space.swapoff_finish(index)
            except BaseException:
                space.swapoff_cancel(index)
                raise
            if removed in self._owned_devices:
                self._owned_devices.remove(removed)
                removed.close()
                self._remove_file(removed)

    def _drain_device(self, index: int) -> None:
        """Move every page whose swap copy is on device ``index`` (lock held)."""
        meta = self.swap_pager.meta
        while True:
            self.swap_pager.flush_stale()
            in_use = set(self.space.blocks_in_use(index).tolist())
            if not in_use:
                return
            owners = [(o, p, b) for o, p, b in meta.items() if b in in_use]
            moved = 0
            for oid, pindex, blk in owners:
                obj = self._objects.get(oid)
                if obj is None or meta.lookup(oid, pindex) != blk:
                    continue
                # A write fault makes the page dirty and frees its stale swap
                # block; the next pageout puts it on another device.
                hold_page(self, obj, pindex, write=True, overwrite=False)
                if meta.lookup(oid, pindex) == blk:
                    # A reserved page keeps its block when dirtied: release it.
                    self.swap_pager.release_block(obj, pindex)
                moved += 1
            if not moved:
                # Blocks in flight (a write completing, a strategy request):
                # let them settle, with the lock released.
                self._cond.wait(0.01)

    def _device_index(self, device: str | int) -> int:
        if isinstance(device, bool) or not isinstance(device, (str, int)):
            raise TypeError(
                f"device must be a swap device's name (str) or index (int), got {device!r}"
            )
        for index, dev in self.space.devices():
            if device == index or device == dev.name:
                return index
        names = ", ".join(d.name for _, d in self.space.devices()) or "none"
        raise ValueError(f"device must name a swap device in use ({names}), got {device!r}")

    def swapinfo(self) -> tuple[SwapDeviceStatistics, ...]:
        """Use of every swap device, in blocks of ``page_size`` bytes (swapctl -l)."""
        with self._cond:
            self.swap_pager.flush_stale()
            return self.space.statistics().devices

    # -- objects ----------------------------------------------------------------

    def allocate(self, size: int | str, *, reserve: bool = False) -> VMObject:
        """A new anonymous, zero-filled, swap-backed object of ``size`` bytes.

        ``size`` is rounded up to whole pages; it may be far larger than memory.
        ``reserve=True`` assigns its swap now (``VMObject.reserve``): the
        allocation raises ``SwapExhausted`` instead of a later pageout failing.
        """
        nbytes = parse_size(size, "size", minimum=1, maximum=1 << 60)
        if not isinstance(reserve, bool):
            raise TypeError(f"reserve must be a bool, got {reserve!r}")
        with self._cond:
            self._check_vm_open()
            npages = -(-nbytes // self.page_size)
            obj = VMObject(self, 0, npages, "anonymous")
            self._register_object(obj)
            if reserve and not self.swap_pager.reserve(obj, 0, npages):
                self._destroy_object(obj)
                self._reservation_failed(npages)
            return obj

    def _register_object(self, obj: VMObject) -> None:
        """Give ``obj`` the next object id and track it (lock held)."""
        obj.oid = self._next_oid
        self._next_oid += 1
        self._objects[obj.oid] = obj

    def map_file(
        self, path: str | os.PathLike[str], mode: str = "r", *, private: bool = False
    ) -> VMObject:
        """A VM object backed by the file at ``path`` (the vnode pager).

        ``mode`` "r" or "r+"; ``private=True`` makes a copy-on-write mapping
        whose changes go to swap, never to the file. Maps of one file share
        one object; see pager/vnode.py for sizes, flush and truncate.
        """
        from vmpager.pager.vnode import map_file

        return map_file(self, path, mode=mode, private=private)

    def map_device(self, buffer: object) -> VMObject:
        """A VM object over fixed memory (bytearray, mmap, numpy array): the device pager."""
        from vmpager.pager.device import map_device

        return map_device(self, buffer)

    # -- transparent paging (mapped/): objects as plain memory ----------------------

    @property
    def mapped(self) -> PagerProcess:
        """The pager process of this VM's mapped objects, started on first use.

        It runs a VM with this one's memory budget, page size and config and
        its own embedded swap; see docs/mapped.md. Raises
        ``UserfaultfdUnavailable`` (saying how to enable it) when
        userfaultfd cannot be used here.
        """
        with self._cond:
            self._check_vm_open()
            pager = self._mapped
        if pager is not None:
            return pager
        from vmpager.mapped.client import PagerProcess

        started = PagerProcess(
            self.frames.nframes * self.page_size, None, self.page_size, config=self.config
        )
        with self._cond:
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
        with self._cond:
            return list(self._objects.values())

    def _check_vm_open(self) -> None:
        if self._closed:
            raise ObjectClosed("the VM is closed")

    # -- data paths ---------------------------------------------------------------

    def _read(self, obj: VMObject, offset: int, length: int) -> bytes:
        if (
            type(offset) is not int
            or type(length) is not int
            or offset < 0
            or length < 0
            or offset + length > obj.size
        ):
            # Anything but plain ints in range gets the full check (bool and
            # float refused by name, numpy integers converted).
            offset, length = obj._check_range(offset, length)
        ps = self.page_size
        pindex, off = divmod(offset, ps)
        if off + length <= ps:
            with self._cond:
                if obj.closed:
                    raise ObjectClosed(f"VM object {obj.oid} is closed")
                page = obj.pages.get(pindex)
                if page is None or page.busy or page.prefetched:
                    # hold_page also counts the use of a read-around page.
                    page = hold_page(self, obj, pindex, False, False)
                else:
                    page.referenced = True
                    self.counters.hits += 1
                start = page.frame * ps + off
                return self.frames.arena[start : start + length]
        out = bytearray(length)
        self._readinto(obj, offset, memoryview(out))
        return bytes(out)

    def _readinto(self, obj: VMObject, offset: int, view: memoryview) -> None:
        self._copy(obj, offset, view, write=False)

    def _write(self, obj: VMObject, offset: int, view: memoryview) -> None:
        self._copy(obj, offset, view, write=True)

    def _copy(
        self,
        obj: VMObject,
        offset: int,
        view: memoryview,
        *,
        write: bool,
        hold: Callable[[int, bool, bool], Page] | None = None,
    ) -> None:
        """Copy between ``view`` and the object's pages, faulting each page in.

        Each page is held (``hold_page``, or ``hold(pindex, write,
        overwrite)``, which file objects give to notice truncation) and
        copied under the VM lock, so no page changes or leaves memory while
        it is copied. A write that covers a page's whole valid part (an
        object's ``size`` may end inside its last page) does not read the
        page's old contents, and keeps the bytes past the end zero.
        """
        ps = self.page_size
        length = view.nbytes
        fview = self.frames.view
        pos = 0
        with self._cond:
            size = obj.size
            while pos < length:
                if obj.closed:
                    raise ObjectClosed(f"VM object {obj.oid} is closed")
                pindex, off = divmod(offset + pos, ps)
                n = min(ps - off, length - pos)
                valid = min(ps, size - pindex * ps)
                overwrite = write and off == 0 and n >= valid
                if hold is None:
                    page = hold_page(self, obj, pindex, write, overwrite)
                else:
                    page = hold(pindex, write, overwrite)
                start = page.frame * ps + off
                if write:
                    fview[start : start + n] = view[pos : pos + n]
                    if valid < ps and off + n >= valid:
                        # The last page of an object that ends inside it: zeros past the end.
                        fview[start + n : page.frame * ps + ps] = bytes(ps - off - n)
                else:
                    view[pos : pos + n] = fview[start : start + n]
                pos += n

    def _discard(self, obj: VMObject, offset: int, length: int) -> None:
        ps = self.page_size
        end = offset + length
        first_full = -(-offset // ps)
        end_full = end // ps
        if first_full >= end_full:
            if length:
                self._write(obj, offset, memoryview(bytes(length)))
            return
        if offset < first_full * ps:
            self._write(obj, offset, memoryview(bytes(first_full * ps - offset)))
        if end > end_full * ps:
            self._write(obj, end_full * ps, memoryview(bytes(end - end_full * ps)))
        with self._cond:
            if obj.backing is not None:
                # A shadow must hide the backing object's pages: store zeros.
                pass
            else:
                self._drop_pages(obj, first_full, end_full)
                self.swap_pager.free_space(obj, first_full, end_full - first_full)
                return
        zeros = memoryview(bytes(ps))
        for pindex in range(first_full, end_full):
            self._write(obj, pindex * ps, zeros)

    def _drop_pages(self, obj: VMObject, start: int, end: int, *, force: bool = False) -> None:
        """Free resident pages of ``obj`` in ``[start, end)`` without writing them.

        Waits for busy pages, unless ``force`` (VM close, after all I/O has
        finished: a page still busy then was leaked, and is logged).
        """
        while True:
            if end - start > len(obj.pages):
                victims = [p for i, p in obj.pages.items() if start <= i < end]
            else:
                victims = [p for i in range(start, end) if (p := obj.pages.get(i)) is not None]
            waited = False
            for page in victims:
                if (page.busy or page.writing) and force:
                    log.error("closing: %r was left busy", page)
                    page.busy = page.writing = False
                if page.busy or page.writing:
                    self._wait_page(page)
                    waited = True
                    break
                self._free_page(page)
            if not waited:
                return

    def _close_object(self, obj: VMObject) -> None:
        with self._cond:
            if obj.closed:
                return
            obj._before_close()
            obj.closed = True
            self._destroy_object(obj)
            self._cond.notify_all()

    def _destroy_object(self, obj: VMObject) -> None:
        """Free everything ``obj`` holds and drop its reference on its backing object."""
        obj.closed = True
        self._drop_pages(obj, 0, obj.npages)
        pager = self._pager_for(obj)
        if pager is not None:
            pager.dealloc(obj)
        obj.reserve_state = None
        self._objects.pop(obj.oid, None)
        shadow.release_backing(self, obj)

    def _clone(self, obj: VMObject) -> VMObject:
        with self._cond:
            self._check_vm_open()
            if obj.closed:
                raise ObjectClosed(f"VM object {obj.oid} is closed")
            return shadow.clone(self, obj)

    def _strategy(
        self, obj: VMObject, op: str, offset: int, buffer: memoryview | None, length: int
    ) -> None:
        if obj.closed:
            raise ObjectClosed(f"VM object {obj.oid} is closed")
        if obj.kind != "anonymous":
            raise ValueError(f"strategy I/O is for swap-backed objects, not {obj.kind!r}")
        if obj.backing is not None:
            # Clones are served through the paths that walk the shadow chain.
            if op == "read":
                assert buffer is not None
                obj.readinto(offset, buffer)
            elif op == "write":
                assert buffer is not None
                obj.write(offset, buffer)
            else:
                obj.discard(offset, length)
            return
        self.swap_pager.flush_stale()  # strategy allocates swap itself
        strategy.strategy(self, obj, op, offset, buffer, length)

    def _reserve(self, obj: VMObject, offset: int, length: int) -> None:
        if length == 0:
            return
        ps = self.page_size
        first = offset // ps
        end = -(-(offset + length) // ps)
        with self._cond:
            if obj.kind != "anonymous":
                raise ValueError(f"only anonymous objects reserve swap, not {obj.kind!r}")
            if not self.swap_pager.reserve(obj, first, end - first):
                self._reservation_failed(end - first)

    def _reservation_failed(self, npages: int) -> None:
        raise SwapExhausted(f"cannot reserve swap for {npages} pages: {self.space.describe_free()}")

    # -- services for the fault path, the pagers and the daemon (lock held) -----------

    def _pager_for(self, obj: VMObject) -> Pager | None:
        return self.pagers.pager_for(obj)

    def _in_daemon(self) -> bool:
        ident = threading.get_ident()
        return ident == self.daemon.ident or ident == self._scan_owner

    def _wait_page(self, page: Page) -> None:
        page.wanted = True
        self._cond.wait()

    def _room_to_dirty(self) -> bool:
        """May one more resident page become dirty? Else make room and return False.

        Page-ins may use the last ``read_reserve`` frames; that works only
        while those frames are free or hold clean (droppable) pages. A write
        to a clean resident page needs no frame, so it is checked here: when
        free frames alone do not cover the reserve, dirty pages are counted
        (O(resident), only then) and, if the reserve would hold dirt, the
        pageout machinery runs as for a write that needs a frame (which may
        release the lock) and the caller looks again; ``SwapExhausted`` when
        nothing can be laundered.
        """
        reserve = self._read_reserve
        if self.frames.free_nframes > reserve:
            return True
        dirty = sum(1 for o in self._objects.values() for p in o.pages.values() if p.dirty)
        if self.frames.nframes - dirty - 1 >= reserve:
            return True
        self._wait_for_frame(for_read=False)
        return False

    def _make_dirty(self, obj: VMObject, page: Page) -> None:
        page.dirty = True
        pager = self._pager_for(obj)
        if pager is not None:
            pager.unswapped(obj, page.pindex)

    def _alloc_frame(self, *, for_read: bool) -> int | None:
        frames = self.frames
        floor = 0 if for_read else self._read_reserve
        if frames.free_nframes <= floor:
            return None
        frame = frames.alloc()
        if frames.free_nframes < self.free_min_nframes:
            self._wake_daemon()
        return frame

    def _wake_daemon(self) -> None:
        """Tell the page daemon thread to look at memory again (lock held)."""
        self._daemon_cond.notify()

    def _alloc_frame_for_readaround(self) -> int | None:
        """A frame for a read-around page, or None: never waits, never takes the reserve.

        With ``sequential_readahead`` only sequential streams read ahead, and
        what they read is about to be used: they may take frames down to half
        the daemon's minimum (waking it below the minimum, as any allocation).
        Otherwise read-around stops at the minimum.
        """
        frames = self.frames
        if not self.config.sequential_readahead:
            return frames.alloc() if frames.free_nframes > self.free_min_nframes else None
        if frames.free_nframes <= max(self._read_reserve, self.free_min_nframes // 2):
            return None
        frame = frames.alloc()
        if frames.free_nframes < self.free_min_nframes:
            self._wake_daemon()
        return frame

    def _readaround_npages(self, obj: VMObject, pindex: int) -> int:
        if obj.kind == "vnode":  # files: sequential read-ahead ramps up
            return self.vnode_pager.readahead_npages(obj, pindex, self.config.readaround_npages)
        return self.config.readaround_npages

    def _fault_stream(self, obj: VMObject, pindex: int) -> int:
        """Sequential fault detection on anonymous memory; the read-ahead window. Lock held.

        A fault at the page after the last one faulted in continues a
        sequential stream: the window doubles from ``readaround_npages`` up
        to ``readahead_max_npages``. Any other fault is random: window 0.
        """
        if pindex == obj.readahead_next:
            cfg = self.config
            ahead = min(
                max(cfg.readaround_npages, 2 * obj.readahead_npages), cfg.readahead_max_npages
            )
        else:
            ahead = 0
        obj.readahead_npages = ahead
        return ahead

    def _fault_done(self, obj: VMObject, first: int, npages: int) -> None:
        """Pages ``[first, first + npages)`` of anonymous ``obj`` were faulted in. Lock held.

        Records where the stream would fault next. A stream at full speed
        also gives up what it left behind (vm_fault_dontneed): as many pages
        as came in, a whole window behind the fault, go to the head of the
        inactive queue with their references cleared, so the page daemon
        takes them before anything else. A program streaming through more
        than memory then keeps what it had before instead of cycling it out
        (the most-recently-used page goes first, which is what a cyclic
        scan wants).
        """
        obj.readahead_next = first + npages
        window = obj.readahead_npages
        if window < self.config.readahead_max_npages or window <= 0:
            return
        end = first - window
        start = max(end - npages, 0)
        if end <= start:
            return
        pages = obj.pages
        noreuse = self.queues.deactivate_noreuse
        # Highest first: each goes to the head, so the head ends in ascending order
        # and the daemon writes the pages out in object order.
        for pindex in range(end - 1, start - 1, -1):
            page = pages.get(pindex)
            if page is not None and not (page.busy or page.writing) and page.queue != QUEUE_WIRED:
                page.referenced = False
                noreuse(page)

    def _wait_for_frame(self, *, for_read: bool) -> None:
        """Make room or wait for it; raises SwapExhausted when nothing can be freed."""
        self.counters.frame_waits += 1
        floor = 0 if for_read else self._read_reserve
        if not self.config.daemon_thread or self._in_daemon():
            owner = self._scan_owner
            self._scan_owner = threading.get_ident()
            try:
                ok = self.daemon.run_until(self.free_target_nframes, asynchronous=False)
            finally:
                self._scan_owner = owner
            if not ok and self.frames.free_nframes <= floor:
                self._out_of_frames(floor)
            return
        if self._stuck and self.frames.free_nframes <= floor:
            self._out_of_frames(floor)
            return
        self._frame_waiters += 1
        try:
            # The daemon sleeps on its own condition: this wakes it alone, not
            # the other waiters.
            self._wake_daemon()
            self._cond.wait(1.0)
        finally:
            self._frame_waiters -= 1
        if self._stuck and self.frames.free_nframes <= floor:
            self._out_of_frames(floor)

    def _out_of_frames(self, floor: int) -> None:
        """The scan could launder nothing: drop clean pages, wait for I/O in flight,
        or raise SwapExhausted.

        Clean pages need no I/O to drop, and a stuck daemon sleeps until
        something changes, so pages that became clean since (zero-filled
        reads, page-ins) are reclaimed here. Transfers in flight (other
        threads' page-ins, writes) leave clean pages or free frames behind:
        wait for them (the lock is released) and let the caller look again.
        """
        if self.daemon._reclaim_clean(floor + 1):
            return
        if any(self.inflight.in_flight(kind) for kind in IOKind):
            self._cond.wait(0.1)
            return
        self._exhausted()

    def _exhausted(self) -> None:
        self.swap_pager.flush_stale()
        self.counters.swap_exhausted += 1
        if self.space.free_blocks:
            # Swap has room but the pageouts still failed (write errors, or
            # every dirty page busy): say so rather than "full".
            what = "is full of dirty pages that could not be written"
        else:
            what = "and swap are full of data"
        raise SwapExhausted(
            f"memory ({self.frames.nframes} frames) {what}: {self.space.describe_free()}"
        )

    def _daemon_needed(self) -> bool:
        if self._stuck:
            return False
        return (
            self.frames.free_nframes < self.free_min_nframes
            or self._frame_waiters > 0
            or self._deficit > 0
        )

    def _add_deficit(self, nframes: int) -> None:
        """A batched call wants ``nframes`` more than are free: the daemon's next pass
        frees that many beyond its target (bounded by a quarter of memory). Lock held."""
        self._deficit = min(self._deficit + nframes, self.frames.nframes // 4)
        self._wake_daemon()

    def _take_deficit(self) -> int:
        """The daemon's target for a pass: the free target plus the deficit, now cleared."""
        deficit, self._deficit = self._deficit, 0
        ceiling = max(self.frames.nframes // 2, self.free_target_nframes)
        self._pageout_target = min(self.free_target_nframes + deficit, ceiling)
        return self._pageout_target

    def _set_stuck(self, stuck: bool) -> None:
        if self._stuck != stuck:
            self._stuck = stuck
            self._cond.notify_all()
            if not stuck:
                self._wake_daemon()

    def _free_page(self, page: Page) -> None:
        """Forget a resident page and free its frame (its data must be elsewhere)."""
        obj = page.obj
        if obj.storage is not None:  # mapped objects: vm/storage.py
            obj.storage.freeing(page)
        if page.queue != QUEUE_NONE:
            self.queues.remove(page)
        del obj.pages[page.pindex]
        self.frames.free(page.frame)
        if page.wanted:
            page.wanted = False
        self._stuck = False
        self._cond.notify_all()

    def _swap_freed(self) -> None:
        self._stuck = False

    def _written_clean(self, pages: Iterable[Page]) -> None:
        """An asynchronous pageout finished: free its pages now if memory is short."""
        if self.frames.free_nframes >= self._pageout_target:
            return
        for page in pages:
            self._free_if_clean(page)

    def _free_if_clean(self, page: Page) -> bool:
        """Free ``page`` if it is still resident, clean, idle and unreferenced."""
        if page.obj.pages.get(page.pindex) is not page:
            return False
        if page.dirty or page.busy or page.writing or page.referenced:
            return False
        self._free_page(page)
        return True

    def _note_read_error(self, err: DeviceError) -> None:
        self._read_error = err

    def _take_read_error(self) -> DeviceError | None:
        err, self._read_error = self._read_error, None
        return err

    # -- I/O ------------------------------------------------------------------------

    def _perform(self, request: IORequest) -> None:
        """The device transfer of ``request`` (no lock held); sets ``request.error``."""
        try:
            if request.kind is IOKind.READ:
                self.space.read(request.blk, request.buffers)
            else:
                self.space.write(request.blk, request.buffers)
        except CorruptPage as exc:
            request.error = self._name_corrupt(exc, request.blk, request.pages)
        except DeviceError as exc:
            request.error = exc
        except OSError as exc:
            request.error = DeviceError(exc.errno or 5, "swap", request.blk, str(exc))

    def _name_corrupt(self, err: CorruptPage, blk: int, pages: Sequence[Page]) -> CorruptPage:
        """``err`` naming the object and offset of its page, one of ``pages`` read from ``blk``."""
        k = err.swap_block - blk
        if 0 <= k < len(pages):
            page = pages[k]
            return err.naming(page.obj.oid, page.pindex * self.page_size)
        return err

    def _perform_unlocked(self, request: IORequest) -> None:
        self._lock.release()
        try:
            self._perform(request)
        finally:
            self._lock.acquire()

    def _complete(self, requests: list[IORequest]) -> None:
        with self._cond:
            for request in requests:
                request.done = True
                request.iodone(request)

    # -- page daemon control ------------------------------------------------------------

    def pageout(self, npages: int | None = None, *, asynchronous: bool = False) -> int:
        """Run the page daemon's scan in this thread until ``npages`` more frames are free.

        For tests and tools. ``asynchronous=True`` acts exactly as the daemon
        thread does (writes go through the I/O engine and complete later).
        Returns the number of frames freed.
        """
        with self._cond:
            self._check_vm_open()
            before = self.frames.free_nframes
            target = (
                self.frames.nframes
                if npages is None
                else min(self.frames.nframes, before + check_int(npages, "npages", minimum=0))
            )
            owner = self._scan_owner
            self._scan_owner = threading.get_ident()
            try:
                self.daemon.run_until(target, asynchronous=asynchronous)
            finally:
                self._scan_owner = owner
            return self.frames.free_nframes - before

    def sync(self) -> None:
        """Wait for asynchronous pageouts in flight, then flush every swap device."""
        with self._cond:
            self._cond.wait_for(lambda: self.inflight.in_flight(IOKind.WRITE_ASYNC) == 0)
            devices = [dev for _, dev in self.space.devices()]
        for dev in devices:
            dev.flush()

    def data_map(self, obj: VMObject, first: int, npages: int) -> list[bool]:
        """For pages ``first .. first + npages - 1``: does the page hold data?

        True when some object of its shadow chain has the page resident or
        on its pager; False for pages that read as zeros because nothing was
        ever written there (or it was discarded). O(npages) per chain level.
        """
        with self._cond:
            result = [False] * npages
            level: VMObject | None = obj
            start = first
            while level is not None:
                pager = self._pager_for(level)
                if pager is self.swap_pager and level.swap_backed:
                    blocks = self.swap_pager.meta.lookup_range(level.oid, start, npages).tolist()
                    state = level.reserve_state
                    for i, blk in enumerate(blocks):
                        if blk >= 0 and (state is None or state[start + i] != 1):
                            result[i] = True
                elif pager is not None:
                    for i in range(npages):
                        if not result[i] and pager.has_page(level, start + i):
                            result[i] = True
                pages = level.pages
                if len(pages) < npages:
                    for pindex in pages:
                        if start <= pindex < start + npages:
                            result[pindex - start] = True
                else:
                    for i in range(npages):
                        if start + i in pages:
                            result[i] = True
                start += level.backing_offset
                level = level.backing
            return result

    def set_swap_async_max(self, value: int) -> int:
        """Change the asynchronous write limit while running; returns the clamped value."""
        with self._cond:
            return self.inflight.set_async_max(value)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no asynchronous write is in flight. Returns False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.inflight.in_flight(IOKind.WRITE_ASYNC) == 0, timeout
            )

    # -- statistics and invariants ----------------------------------------------------

    def statistics(self) -> VMStatistics:
        with self._cond:
            self.swap_pager.flush_stale()
            c = self.counters
            s = self.space.statistics()
            q = self.queues
            resident = sum(len(o.pages) for o in self._objects.values())
            dirty = sum(1 for o in self._objects.values() for p in o.pages.values() if p.dirty)
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
                objects=len(self._objects),
                daemon_scans=self.daemon.scans,
            )

    def tier_statistics(self) -> TierStatistics | None:
        """The swap tiers' statistics (pool, rejects, writebacks, corrupt pages), or None."""
        if self.tier is None:
            return None
        with self._cond:
            self.swap_pager.flush_stale()  # freed blocks leave the pool
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
        with self._cond:
            self._check_vm_open()
            self.swap_pager.flush_stale()
            oids, pindexes, blks = self.swap_pager.meta.owner_arrays()
            owners = []
            for oid, pindex, blk in zip(
                oids.tolist(), pindexes.tolist(), blks.tolist(), strict=True
            ):
                obj = self._objects.get(oid)
                if obj is not None and self.swap_pager.block_of(obj, pindex) == blk:
                    owners.append((oid, pindex, blk))
        tier = self.tier
        corrupt: list[CorruptPage] = []
        checked = 0
        if tier is None or (not tier.integrity and tier.compress is None):
            return ScrubReport(checked=0, corrupt=())
        for oid, pindex, blk in owners:
            with self._cond:
                # Still this page's block? (It may have been freed meanwhile.)
                obj = self._objects.get(oid)
                if obj is None or self.swap_pager.block_of(obj, pindex) != blk:
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
        """Assert every invariant; raises ``InvariantViolation`` listing each one broken."""
        with self._cond:
            problems = self._check_locked()
        if problems:
            raise InvariantViolation(problems)

    def _check_locked(self) -> list[str]:
        self.swap_pager.flush_stale()  # blocks of pages made dirty are free, not in limbo
        problems: list[str] = []
        problems += self.frames.check()
        problems += self.queues.check()
        problems += self.pagermap.check()
        for part, checker in (
            ("swap space", self.space.check),
            ("swap meta", self.swap_pager.meta.check),
            ("vnode pager", self.vnode_pager.check),
            ("swap tier", self._check_tier),
            ("device pager", self.device_pager.check),
        ):
            try:
                checker()
            except AssertionError as exc:
                problems.append(f"{part}: {exc}")
        # Frames: each is free or held by exactly one resident page.
        owner: dict[int, Page] = {}
        queued = 0
        for obj in self._objects.values():
            if obj.storage is not None:  # mapped objects: vm/storage.py
                problems += obj.storage.check(obj)
            for pindex, page in obj.pages.items():
                where = f"page {obj.oid}:{pindex}"
                if page.obj is not obj or page.pindex != pindex:
                    problems.append(f"{where}: recorded as {page!r}")
                if not 0 <= pindex < obj.npages:
                    problems.append(f"{where}: index outside the object ({obj.npages} pages)")
                if page.frame in owner:
                    problems.append(f"{where}: frame {page.frame} also holds {owner[page.frame]!r}")
                owner[page.frame] = page
                if self.frames.is_free(page.frame):
                    problems.append(f"{where}: its frame {page.frame} is on the free list")
                if page.writing and not page.dirty:
                    problems.append(f"{where}: being written but clean")
                if page.queue == QUEUE_NONE and not page.busy:
                    problems.append(f"{where}: idle but on no queue")
                if page.queue != QUEUE_NONE:
                    queued += 1
        if len(owner) + self.frames.free_nframes != self.frames.nframes:
            problems.append(
                f"frames: {len(owner)} resident + {self.frames.free_nframes} free "
                f"!= {self.frames.nframes}"
            )
        nqueued = len(self.queues.active) + len(self.queues.inactive) + len(self.queues.wired)
        if nqueued != queued:
            problems.append(f"queues hold {nqueued} pages but {queued} resident pages are queued")
        # Swap: every used block is owned by exactly one page (meta checks uniqueness).
        stats = self.space.statistics()
        owned = self.swap_pager.meta.total()
        if stats.used != owned:
            problems.append(f"swap: {stats.used} blocks allocated but {owned} owned by pages")
        problems += self._check_block_owners()
        if stats.free + stats.used + stats.bad != stats.total:
            problems.append(
                f"swap: free {stats.free} + used {stats.used} + bad {stats.bad} != {stats.total}"
            )
        problems += shadow.check_chains(self, self._objects)
        for oid in self.swap_pager.meta.objects():
            if oid not in self._objects:
                problems.append(f"swap: blocks owned by object {oid}, which is gone")
        return problems

    def _check_tier(self) -> None:
        if self.tier is not None:
            self.tier.check(device for _, device in self.space.devices())

    def _check_block_owners(self) -> list[str]:
        """Blocks pages own that the swap space has not allocated, and the reverse.

        The counts may agree while the sets differ (a page pointing at a free
        block, which the allocator will hand out again). O(blocks in use).
        """
        oids, pindexes, blks = self.swap_pager.meta.owner_arrays()
        parts = [self.space.blocks_in_use(index) for index, _ in self.space.devices()]
        used = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        problems = []
        stray = np.flatnonzero(~np.isin(blks, used))
        for k in stray[:10].tolist():
            problems.append(
                f"swap: block {blks[k]} of page {oids[k]}:{pindexes[k]} is not allocated"
            )
        if len(stray) > 10:
            problems.append(f"swap: and {len(stray) - 10} more owned blocks not allocated")
        orphans = np.setdiff1d(used, blks)
        if len(orphans):
            problems.append(
                f"swap: {len(orphans)} allocated blocks have no owner "
                f"(first: {orphans[:5].tolist()})"
            )
        return problems

    # -- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        """Stop the daemon, finish I/O, free every object and remove the private swap."""
        with self._cond:
            if self._closed:
                return
            mapped, self._mapped = self._mapped, None
        if mapped is not None:
            mapped.close()  # the pager process of mapped objects
        with self._cond:
            for obj in list(self._objects.values()):
                obj._before_close()  # file objects write their dirty pages back
        self.daemon.stop()
        self.engine.close()
        self.fanout.close()
        with self._cond:
            for obj in list(self._objects.values()):
                obj._before_close()
                obj.closed = True
                self._drop_pages(obj, 0, obj.npages, force=True)
                pager = self._pager_for(obj)
                if pager is not None:
                    pager.dealloc(obj)
            self._objects.clear()
            self._closed = True
        self._close_devices()
        self.frames.close()

    def _close_devices(self) -> None:
        for device in self._owned_devices:
            try:
                device.close()
            except OSError as exc:  # closing must go on for the others
                log.warning("closing %s: %s", device.name, exc)
            self._remove_file(device)
        self._owned_devices.clear()

    def _remove_file(self, device: BlockDevice) -> None:
        path = self._remove_on_close.pop(id(device), None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("removing swap file %s: %s", path, exc)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<VM {self.frames.nframes} frames of {self.page_size} B, {len(self._objects)} objects>"
        )


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What ``VM.scrub`` verified: pages ``checked`` and the ``corrupt`` ones found."""

    checked: int
    corrupt: tuple[CorruptPage, ...]


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
