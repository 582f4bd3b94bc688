"""The kernel's internal interface: what pagers, the fault path, the daemon and
batched calls share (the state under the VM lock and the services around it).

``VM`` (vm/system.py) is the public face and the wiring; it builds one
``Kernel`` and hands it, never itself, to every part inside. The kernel holds:

- the lock (``lock``) and the condition every wake-up goes through (``cond``),
  and the page daemon's own condition (``daemon_cond``);
- frames (``frames``), the page queues, counters, watermarks, the I/O limits
  (``inflight``, ``pagermap``), the swap space, the pager registry and the
  three pagers, the I/O engine and the batched reads' thread pool;
- the object table (``register_object``, ``destroy_object``, ``objects``);
- page services: ``wait_page``, ``free_page``, ``free_if_clean``,
  ``make_dirty``, ``drop_pages``; frame services: ``alloc_frame``,
  ``alloc_frame_for_readaround``, ``wait_for_frame``; the daemon's control
  (``wake_daemon``, ``daemon_needed``, ``add_deficit``, ``begin_pageout_pass``,
  ``set_stuck``); unlocked transfers (``transfer_unlocked``);
- the data paths the objects forward to (``read``, ``copy``, ``discard``...).

Every method expects the caller to hold ``lock`` unless its docstring says
otherwise. Nothing here is public API: users see ``VM`` and ``VMObject``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from vmpager.errors import CorruptPage, DeviceError, ObjectClosed, SwapExhausted
from vmpager.io.fanout import Fanout
from vmpager.io.inflight import InflightLimits
from vmpager.io.request import AnyIORequest, IOKind
from vmpager.swap.space import SwapSpace
from vmpager.units import check_int
from vmpager.vm import readahead, shadow
from vmpager.vm.condition import VMCondition
from vmpager.vm.config import VMConfig, watermarks
from vmpager.vm.fault import hold_new_run, hold_page
from vmpager.vm.frames import FramePool
from vmpager.vm.object import ObjectKind, VMObject, checked_range
from vmpager.vm.page import QUEUE_INACTIVE, QUEUE_NONE, QUEUE_WIRED, Page
from vmpager.vm.pagermap import PagerMap
from vmpager.vm.queues import PageQueues
from vmpager.vm.registry import PagerRegistry
from vmpager.vm.stats import Counters

if TYPE_CHECKING:
    from vmpager.io.engine import IOEngine
    from vmpager.vm.pageout import PageDaemon
    from vmpager.vm.pagerops import CheckedPager, Pager, SwapPagerOps

__all__ = ["Kernel"]

log = logging.getLogger("vmpager")

#: The most pages one step of a write takes at once (``fault.hold_new_run``):
#: bounds what a look at the pager costs when the run stops early.
RUN_MAX_NPAGES = 256


class Kernel:
    """The state and services every part of the VM shares; see the module docstring.

    Built by ``VM``, which then attaches the pagers (``attach_pagers``), the
    I/O engine and the page daemon (``attach_engine``, ``attach_daemon``).
    """

    def __init__(self, config: VMConfig, page_size: int, nframes: int, layout: str) -> None:
        self.config = config
        self.page_size = page_size
        #: offset >> page_shift is the page index, offset & page_mask the offset in it.
        self.page_shift = page_size.bit_length() - 1
        self.page_mask = page_size - 1
        self.lock = threading.Lock()
        self.cond = VMCondition(self.lock)
        #: The page daemon sleeps on its own condition (same lock), so that the
        #: wake-ups of page and frame waiters do not wake it for nothing.
        self.daemon_cond = threading.Condition(self.lock)
        self.frames = FramePool(nframes, page_size)
        self.queues = PageQueues()
        self.counters = Counters()
        cfg = config
        marks = watermarks(cfg, self.frames.nframes)
        self.read_reserve = marks.read_reserve_nframes
        self.free_min_nframes = marks.free_min_nframes
        self.free_target_nframes = marks.free_target_nframes
        self.inactive_target = marks.inactive_target
        self.pagermap = PagerMap(
            self.cond,
            max(cfg.pager_map_npages, 2 * cfg.cluster_max_npages + cfg.pager_map_reserve_npages),
            max(cfg.pager_map_reserve_npages, cfg.cluster_max_npages),
        )
        self.inflight = InflightLimits(self.cond, cfg.nswbuf, cfg.swap_async_max)
        self.space = SwapSpace(layout=layout)  # type: ignore[arg-type]
        self.pagers = PagerRegistry()
        #: Threads for the concurrent reads of batched calls (started on first use).
        depth = check_int(cfg.batch_read_depth, "config.batch_read_depth", minimum=1, maximum=256)
        check_int(cfg.batch_max_npages, "config.batch_max_npages", minimum=1)
        self.fanout = Fanout(depth)
        self.objects: dict[int, VMObject] = {}
        self._next_oid = 1
        #: The daemon's last pass could launder nothing; frame waiters give up
        #: (SwapExhausted) instead of waiting, until a frame or block is freed.
        self.stuck = False
        self._frame_waiters = 0
        #: Frames wanted beyond the target by batched calls that found too few free
        #: (vm_pageout_deficit); the daemon adds it to its next pass's target.
        self._deficit = 0
        #: The free-frame count the daemon's current pass aims for.
        self.pageout_target = self.free_target_nframes
        #: The thread running a pageout scan outside the daemon thread, if any.
        self.scan_owner: int | None = None
        self._read_error: DeviceError | None = None
        self.closed = False
        #: Resident pages that are dirty (kept by ``Page.dirty``; ``free_page``
        #: takes freed ones off): the write floor reads it on every write to a
        #: clean page.
        self.ndirty = 0

    def attach_pagers(self, swap: SwapPagerOps, vnode: CheckedPager, device: CheckedPager) -> None:
        """Register the three pagers (wiring, once, before any object exists)."""
        self.swap_pager: SwapPagerOps = swap
        self.vnode_pager: CheckedPager = vnode
        self.device_pager: CheckedPager = device
        self.pagers.register(ObjectKind.ANONYMOUS, swap)
        self.pagers.register(ObjectKind.VNODE, vnode)
        self.pagers.register(ObjectKind.DEVICE, device)

    def attach_engine(self, engine: IOEngine) -> None:
        """Start ``engine`` on this kernel's transfers (wiring, once)."""
        self.engine = engine
        engine.start(self.perform, self.complete)

    def attach_daemon(self, daemon: PageDaemon) -> None:
        self.daemon = daemon

    # -- objects ------------------------------------------------------------------

    def register_object(self, obj: VMObject) -> None:
        """Give ``obj`` the next object id and track it (lock held)."""
        obj.oid = self._next_oid
        self._next_oid += 1
        self.objects[obj.oid] = obj

    def check_open(self) -> None:
        if self.closed:
            raise ObjectClosed("the VM is closed")

    # -- data paths ---------------------------------------------------------------

    def read(self, obj: VMObject, offset: int, length: int) -> bytes:
        if (
            type(offset) is not int
            or type(length) is not int
            or offset < 0
            or length < 0
            or offset + length > obj.size
        ):
            # Anything but plain ints in range gets the full check (bool and
            # float refused by name, numpy integers converted).
            offset, length = checked_range(obj, offset, length)
        ps = self.page_size
        pindex, off = divmod(offset, ps)
        if off + length <= ps:
            with self.lock:  # the condition's lock, without its Python-level __enter__
                page = obj.pages.get(pindex)
                if page is None or page.busy or page.prefetched:
                    # hold_page also counts the use of a read-around page.
                    page = hold_page(self, obj, pindex, write=False, overwrite=False)
                else:
                    page.referenced = True
                    self.counters.hits += 1
                start = page.frame * ps + off
                return self.frames.arena[start : start + length]
        out = bytearray(length)
        self.readinto(obj, offset, memoryview(out))
        return bytes(out)

    def readinto(self, obj: VMObject, offset: int, view: memoryview) -> None:
        self.copy(obj, offset, view, write=False)

    def write(self, obj: VMObject, offset: int, view: memoryview) -> None:
        self.copy(obj, offset, view, write=True)

    def copy(
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
        page's old contents, and keeps the bytes past the end zero. A write
        of whole new pages takes each run of them at once
        (``fault.hold_new_run``: the same pages, flags, queues and stream
        as page by page) and copies it with one slice per run of
        consecutive frames; the page that ends a run for want of a frame
        takes the per-page path (it waits, or raises with the run before
        it written).
        """
        ps = self.page_size
        length = view.nbytes
        fview = self.frames.view
        pos = 0
        with self.cond:
            size = obj.size
            pages = obj.pages
            while pos < length:
                # A closed object has no pages: the fault reaches the dead pager.
                pindex, off = divmod(offset + pos, ps)
                if write and off == 0 and hold is None and pindex not in pages:
                    # Whole new pages (inside the view and the object): a run at once.
                    whole = min((length - pos) // ps, size // ps - pindex, RUN_MAX_NPAGES)
                    if whole > 1:
                        run = hold_new_run(self, obj, pindex, whole)
                        if run:
                            self._fill_run(run, view, pos)
                            pos += len(run) * ps
                            continue
                n = min(ps - off, length - pos)
                valid = min(ps, size - pindex * ps)
                overwrite = write and off == 0 and n >= valid
                if hold is None:
                    page = hold_page(self, obj, pindex, write=write, overwrite=overwrite)
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

    def _fill_run(self, run: Sequence[Page], view: memoryview, pos: int) -> None:
        """Copy ``view[pos:]`` into the consecutive pages ``run``, one slice per run
        of consecutive frames. Lock held. O(bytes)."""
        for buffer in self.frames.run_views([page.frame for page in run]):
            nbytes = buffer.nbytes
            buffer[:] = view[pos : pos + nbytes]
            pos += nbytes

    def discard(self, obj: VMObject, offset: int, length: int) -> None:
        ps = self.page_size
        end = offset + length
        first_full = -(-offset // ps)
        end_full = end // ps
        if first_full >= end_full:
            if length:
                self.write(obj, offset, memoryview(bytes(length)))
            return
        if offset < first_full * ps:
            self.write(obj, offset, memoryview(bytes(first_full * ps - offset)))
        if end > end_full * ps:
            self.write(obj, end_full * ps, memoryview(bytes(end - end_full * ps)))
        with self.cond:
            if obj.backing is not None:
                # A shadow must hide the backing object's pages: store zeros.
                pass
            else:
                self.drop_pages(obj, first_full, end_full)
                self.swap_pager.free_space(obj, first_full, end_full - first_full)
                return
        zeros = memoryview(bytes(ps))
        for pindex in range(first_full, end_full):
            self.write(obj, pindex * ps, zeros)

    def drop_pages(self, obj: VMObject, start: int, end: int, *, force: bool = False) -> None:
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
                    self.wait_page(page)
                    waited = True
                    break
                self.free_page(page)
            if not waited:
                return

    def close_object(self, obj: VMObject) -> None:
        with self.cond:
            if obj.closed:
                return
            obj._before_close()
            self.destroy_object(obj)
            self.cond.notify_all()

    def destroy_object(self, obj: VMObject) -> None:
        """Free everything ``obj`` holds and drop its reference on its backing object.

        The object gets the dead pager first (vm/deadpager.py): faults that
        wait on its busy pages meanwhile find it closed when they look again.
        """
        pager = obj.pager
        obj.mark_closed()
        self.drop_pages(obj, 0, obj.npages)
        pager.dealloc(obj)
        obj.reserve_state = None
        self.objects.pop(obj.oid, None)
        shadow.release_backing(self, obj)

    def clone(self, obj: VMObject) -> VMObject:
        with self.cond:
            self.check_open()
            obj.check_open()
            return self.clone_locked(obj)

    def clone_locked(self, obj: VMObject) -> VMObject:
        """``clone`` for a caller that holds the lock (and has checked ``obj`` is open)."""
        return shadow.clone(self, obj)

    def strategy(
        self, obj: VMObject, op: str, offset: int, buffer: memoryview | None, length: int
    ) -> None:
        obj.check_open()
        if obj.kind is not ObjectKind.ANONYMOUS:
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
        self.swap_pager.strategy(obj, op, offset, buffer, length)

    def reserve(self, obj: VMObject, offset: int, length: int) -> None:
        if length == 0:
            return
        ps = self.page_size
        first = offset // ps
        end = -(-(offset + length) // ps)
        with self.cond:
            if obj.kind is not ObjectKind.ANONYMOUS:
                raise ValueError(f"only anonymous objects reserve swap, not {obj.kind!r}")
            if not self.swap_pager.reserve(obj, first, end - first):
                self.reservation_failed(end - first)

    def reservation_failed(self, npages: int) -> None:
        raise SwapExhausted(
            f"cannot reserve swap for {npages} pages: {self.swap_pager.describe_free()}"
        )

    def data_map(self, obj: VMObject, first: int, npages: int) -> list[bool]:
        """For pages ``first .. first + npages - 1``: does the page hold data?

        True when some object of its shadow chain has the page resident or
        on its pager; False for pages that read as zeros because nothing was
        ever written there (or it was discarded). O(npages) per chain level.
        """
        with self.cond:
            result = [False] * npages
            level: VMObject | None = obj
            start = first
            while level is not None:
                for i, has in enumerate(level.pager.has_pages(level, start, npages)):
                    if has:
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

    # -- services for the fault path, the pagers and the daemon (lock held) -----------

    def hold_page(self, obj: VMObject, pindex: int, *, write: bool, overwrite: bool) -> Page:
        """Fault page ``pindex`` of ``obj`` in and return it resident and idle
        (``vm/fault.py``: ``hold_page``); ``overwrite`` when the caller replaces
        the whole page. Lock held; may release it while paging."""
        return hold_page(self, obj, pindex, write=write, overwrite=overwrite)

    def pager_for(self, obj: VMObject) -> Pager:
        """``obj``'s pager: its kind's, or the dead pager once it is closed. O(1)."""
        return obj.pager

    def in_daemon(self) -> bool:
        ident = threading.get_ident()
        return ident == self.daemon.ident or ident == self.scan_owner

    def wait_page(self, page: Page) -> None:
        page.wanted = True
        self.cond.wait()

    def room_to_dirty(self) -> bool:
        """May one more resident page become dirty? Else make room and return False.

        Page-ins may use the last ``read_reserve`` frames; that works only
        while those frames are free or hold clean (droppable) pages. A write
        to a clean resident page needs no frame, so it is checked here: when
        free frames alone do not cover the reserve, the dirty pages (``ndirty``,
        O(1)) are compared with the frames and, if the reserve would hold
        dirt, the pageout machinery runs as for a write that needs a frame
        (which may release the lock) and the caller looks again;
        ``SwapExhausted`` when nothing can be laundered.
        """
        reserve = self.read_reserve
        if self.frames.free_nframes > reserve:
            return True
        if self.frames.nframes - self.ndirty - 1 >= reserve:
            return True
        self.wait_for_frame(for_read=False)
        return False

    def make_dirty(self, obj: VMObject, page: Page) -> None:
        page.dirty = True
        obj.pager.unswapped(obj, page.pindex)

    def alloc_frame(self, *, for_read: bool) -> int | None:
        frames = self.frames
        floor = 0 if for_read else self.read_reserve
        if frames.free_nframes <= floor:
            return None
        frame = frames.alloc()
        if frames.free_nframes < self.free_min_nframes:
            self.wake_daemon()
        return frame

    def wake_daemon(self) -> None:
        """Tell the page daemon thread to look at memory again (lock held)."""
        self.daemon_cond.notify()

    def alloc_frame_for_readaround(self) -> int | None:
        """A frame for a read-around page, or None: never waits, never takes the reserve.

        With ``sequential_readahead`` only sequential streams read ahead, and
        what they read is about to be used: they may take frames down to half
        the daemon's minimum (waking it below the minimum, as any allocation).
        Otherwise read-around stops at the minimum.
        """
        frames = self.frames
        if not self.config.sequential_readahead:
            return frames.alloc() if frames.free_nframes > self.free_min_nframes else None
        if frames.free_nframes <= max(self.read_reserve, self.free_min_nframes // 2):
            return None
        frame = frames.alloc()
        if frames.free_nframes < self.free_min_nframes:
            self.wake_daemon()
        return frame

    def streams_faults(self, obj: VMObject) -> bool:
        """Does the fault path detect sequential streams on ``obj`` and ramp its
        read-ahead (``fault_stream``)? Anonymous memory under
        ``sequential_readahead``; file pagers ramp their own. O(1)."""
        return obj.kind is ObjectKind.ANONYMOUS and self.config.sequential_readahead

    def readaround_npages(self, obj: VMObject, pindex: int) -> int:
        """The read-around window of a fault at ``pindex`` (its pager may ramp it up)."""
        return obj.pager.readaround_npages(obj, pindex, self.config.readaround_npages)

    def fault_stream(self, obj: VMObject, pindex: int) -> int:
        """Sequential fault detection on anonymous memory; the read-ahead window. Lock held.

        A fault at the page after the last one faulted in continues a
        sequential stream: the window doubles from ``readaround_npages`` up
        to ``readahead_max_npages``. Any other fault is random: window 0.
        """
        cfg = self.config
        ahead = readahead.next_window(
            obj.readahead_npages,
            sequential=pindex == obj.readahead_next,
            first=cfg.readaround_npages,
            maximum=cfg.readahead_max_npages,
        )
        obj.readahead_npages = ahead
        return ahead

    def fault_stream_run(self, obj: VMObject, first: int, npages: int) -> None:
        """``fault_stream`` then ``fault_done(obj, pindex, 1)`` for each page of
        ``[first, first + npages)`` in order, in one step (new pages written whole).

        Same windows and the same pages left behind as page by page, but those
        go to the inactive queue's head together, in ascending order (as
        ``fault_done`` of a run does). Lock held. O(pages left behind + log window).
        """
        cfg = self.config
        ramp, maximum = cfg.readaround_npages, cfg.readahead_max_npages
        sequential = first == obj.readahead_next
        window = readahead.next_window(
            obj.readahead_npages, sequential=sequential, first=ramp, maximum=maximum
        )
        pindex = first
        last = first + npages - 1
        # The window ramps (doubling) for a few pages, then stays put.
        while pindex < last:
            step = readahead.next_window(window, sequential=True, first=ramp, maximum=maximum)
            if step == window:
                break
            window = step
            pindex += 1
        obj.readahead_npages = window
        obj.readahead_next = last + 1
        if window < maximum or window <= 0:
            return  # below full speed, fault_done leaves nothing behind
        # Pages pindex..last each leave behind the page a window and one before them.
        self._leave_behind(obj, max(pindex - window - 1, 0), last - window)

    def fault_done(self, obj: VMObject, first: int, npages: int) -> None:
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
        self._leave_behind(obj, max(end - npages, 0), end)

    def _leave_behind(self, obj: VMObject, start: int, end: int) -> None:
        """Resident, idle, unwired pages of ``obj`` in ``[start, end)`` to the inactive
        queue's head, unreferenced, in ascending order. Lock held. O(end - start)."""
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

    def scan_here(self, target: int, *, asynchronous: bool) -> bool:
        """Run the page daemon's scan in this thread until ``target`` frames are free.

        While it runs, this thread counts as the daemon (``in_daemon``). Returns
        False when the scan could launder nothing more. Lock held; releases it
        around transfers.
        """
        owner = self.scan_owner
        self.scan_owner = threading.get_ident()
        try:
            return self.daemon.run_until(target, asynchronous=asynchronous)
        finally:
            self.scan_owner = owner

    def wait_for_frame(self, *, for_read: bool) -> None:
        """Make room or wait for it; raises SwapExhausted when nothing can be freed."""
        self.counters.frame_waits += 1
        floor = 0 if for_read else self.read_reserve
        if not self.config.daemon_thread or self.in_daemon():
            ok = self.scan_here(self.free_target_nframes, asynchronous=False)
            if not ok and self.frames.free_nframes <= floor:
                self.out_of_frames(floor)
            return
        if self.stuck and self.frames.free_nframes <= floor:
            self.out_of_frames(floor)
            return
        self._frame_waiters += 1
        try:
            # The daemon sleeps on its own condition: this wakes it alone, not
            # the other waiters.
            self.wake_daemon()
            self.cond.wait(1.0)
        finally:
            self._frame_waiters -= 1
        if self.stuck and self.frames.free_nframes <= floor:
            self.out_of_frames(floor)

    def out_of_frames(self, floor: int) -> None:
        """The scan could launder nothing: drop clean pages, wait for I/O in flight,
        or raise SwapExhausted.

        Clean pages need no I/O to drop, and a stuck daemon sleeps until
        something changes, so pages that became clean since (zero-filled
        reads, page-ins) are reclaimed here. Transfers in flight (other
        threads' page-ins, writes) leave clean pages or free frames behind:
        wait for them (the lock is released) and let the caller look again.
        """
        if self.daemon.reclaim_clean(floor + 1):
            return
        if any(self.inflight.in_flight(kind) for kind in IOKind):
            self.cond.wait(0.1)
            return
        self.raise_exhausted()

    def raise_exhausted(self) -> None:
        self.counters.swap_exhausted += 1
        if self.swap_pager.space_statistics().free:
            # Swap has room but the pageouts still failed (write errors, or
            # every dirty page busy): say so rather than "full".
            what = "is full of dirty pages that could not be written"
        else:
            what = "and swap are full of data"
        raise SwapExhausted(
            f"memory ({self.frames.nframes} frames) {what}: {self.swap_pager.describe_free()}"
        )

    def daemon_needed(self) -> bool:
        if self.stuck:
            return False
        return (
            self.frames.free_nframes < self.free_min_nframes
            or self._frame_waiters > 0
            or self._deficit > 0
        )

    def add_deficit(self, nframes: int) -> None:
        """A batched call wants ``nframes`` more than are free: the daemon's next pass
        frees that many beyond its target (bounded by a quarter of memory). Lock held."""
        self._deficit = min(self._deficit + nframes, self.frames.nframes // 4)
        self.wake_daemon()

    def begin_pageout_pass(self) -> int:
        """The daemon's target for a pass: the free target plus the deficit, now cleared."""
        deficit, self._deficit = self._deficit, 0
        ceiling = max(self.frames.nframes // 2, self.free_target_nframes)
        self.pageout_target = min(self.free_target_nframes + deficit, ceiling)
        return self.pageout_target

    def set_stuck(self, stuck: bool) -> None:
        if self.stuck != stuck:
            self.stuck = stuck
            self.cond.notify_all()
            if not stuck:
                self.wake_daemon()

    def free_page(self, page: Page) -> None:
        """Forget a resident page and free its frame (its data must be elsewhere)."""
        obj = page.obj
        if obj.storage is not None:  # mapped objects: vm/storage.py
            obj.storage.freeing(page)
        if page.queue != QUEUE_NONE:
            self.queues.remove(page)
        if page._dirty:
            page.dirty = False  # out of the count: its data is dropped or elsewhere
        del obj.pages[page.pindex]
        self.frames.free(page.frame)
        if page.wanted:
            page.wanted = False
        self.stuck = False
        self.cond.notify_all()

    def free_pages(self, pages: Sequence[Page]) -> None:
        """``free_page`` for each of ``pages`` (distinct, resident, data elsewhere), with
        one wake-up for all, and their frames freed together (``FramePool.free_many``:
        handed out again in ascending order). Lock held."""
        if not pages:
            return
        queues = self.queues
        inactive = queues.inactive
        frames: list[int] = []
        append = frames.append
        for page in pages:
            obj = page.obj
            if obj.storage is not None:  # mapped objects: vm/storage.py
                obj.storage.freeing(page)
            if page.queue == QUEUE_INACTIVE:
                del inactive[page]
                page.queue = QUEUE_NONE
            elif page.queue != QUEUE_NONE:
                queues.remove(page)
            if page._dirty:
                page.dirty = False  # out of the count: its data is dropped or elsewhere
            del obj.pages[page.pindex]
            append(page.frame)
            page.wanted = False
        self.frames.free_many(frames)
        self.stuck = False
        self.cond.notify_all()

    def mark_written(self, pages: Sequence[Page]) -> None:
        """``pages`` reached their backing store: clean (the dirty count kept) and no
        longer being written. Waiters are not notified here. Lock held. O(pages)."""
        cleaned = 0
        for page in pages:
            if page._dirty:
                page._dirty = False
                cleaned += 1
            page.writing = False
            page.wanted = False
        self.ndirty -= cleaned

    def note_swap_freed(self) -> None:
        self.stuck = False

    def free_written_if_short(self, pages: Iterable[Page]) -> None:
        """An asynchronous pageout finished: free its pages now if memory is short."""
        if self.frames.free_nframes >= self.pageout_target:
            return
        takeable = self._takeable
        self.free_pages([page for page in pages if takeable(page)])

    @staticmethod
    def _takeable(page: Page) -> bool:
        """Resident, clean, idle and unreferenced: ``free_if_clean`` may free it."""
        if page.obj.pages.get(page.pindex) is not page:
            return False
        return not (page._dirty or page.busy or page.writing or page.referenced)

    def free_if_clean(self, page: Page) -> bool:
        """Free ``page`` if it is still resident, clean, idle and unreferenced."""
        if not self._takeable(page):
            return False
        self.free_page(page)
        return True

    def note_read_error(self, err: DeviceError) -> None:
        self._read_error = err

    def take_read_error(self) -> DeviceError | None:
        err, self._read_error = self._read_error, None
        return err

    # -- I/O ------------------------------------------------------------------------

    def perform(self, request: AnyIORequest) -> None:
        """The device transfer of ``request`` (no lock held); sets ``request.error``."""
        try:
            if request.kind is IOKind.READ:
                self.space.read(request.blk, request.buffers)
            else:
                self.space.write(request.blk, request.buffers)
        except CorruptPage as exc:
            request.error = self.name_corrupt(exc, request.blk, request.pages)
        except DeviceError as exc:
            request.error = exc
        except OSError as exc:
            request.error = DeviceError(exc.errno or 5, "swap", request.blk, str(exc))

    def name_corrupt(self, err: CorruptPage, blk: int, pages: Sequence[Page]) -> CorruptPage:
        """``err`` naming the object and offset of its page, one of ``pages`` read from ``blk``."""
        k = err.swap_block - blk
        if 0 <= k < len(pages):
            page = pages[k]
            return err.naming(page.obj.oid, page.pindex * self.page_size)
        return err

    def transfer_unlocked(self, request: AnyIORequest) -> None:
        self.lock.release()
        try:
            self.perform(request)
        finally:
            self.lock.acquire()

    def complete(self, requests: list[AnyIORequest]) -> None:
        with self.cond:
            for request in requests:
                request.done = True
                request.iodone(request)

    def sync(self) -> None:
        """Wait for asynchronous pageouts in flight, then flush every swap device."""
        with self.cond:
            self.cond.wait_for(lambda: self.inflight.in_flight(IOKind.WRITE_ASYNC) == 0)
            devices = [dev for _, dev in self.space.devices()]
        for dev in devices:
            dev.flush()
