"""One swap block space over many devices (FreeBSD's swdevt list, dmmax, vm_swap_size).

Swap blocks have global numbers; ``locate`` turns one into a device and a
block on that device. Two layouts:

``"stripe"`` (FreeBSD ``swap_pager.c`` 2002's): devices are interleaved in stripes of
``stripe_blocks`` blocks (dmmax). Global stripe ``s`` belongs to device
``s % max_devices`` at device stripe ``s // max_devices`` (BLK2DEVIDX), and
one blist allocates for all devices, so consecutive allocations spread over
the devices. Inside the blist each stripe is followed by one guard block
that is never free: a run the blist hands out can never cross a stripe,
where FreeBSD 2002 had to cut runs at the boundary after the fact. Stripes of
absent devices, and the blocks past the end of a device in its last stripe,
are kept allocated, so only blocks that exist are ever free. Unlike FreeBSD 2002
no stripe is skipped at the start of a device: there is no disk label to
protect.

``"per_device"`` (modern FreeBSD): every device has its own blist and a
slice of the global block numbers, with at least one unused number between
slices, so no run crosses devices. An allocation tries the devices
round-robin, starting after the last device used, and halves the request
when a whole round fails (``swp_pager_getswapspace``).

Every block of a present device is free, used (allocated) or bad (written
with a hard error: never handed out again). A device being removed
(``swapoff_begin``) is *draining*: it takes no new allocations, and its free
blocks (and blocks freed later) do not count as free space; ``total_blocks``
then counts only its used and bad blocks, as FreeBSD's swapoff takes the
device's size out of the total at its start. So ``free + used + bad ==
total`` always holds.

The "almost full" hysteresis of ``swp_sizecheck``: when free blocks drop
below ``low_water`` the space becomes almost full and logs one warning
(logger ``vmpager.swap``); when they rise above ``high_water`` it clears (an
info message). Every failed attempt of an allocation, an intermediate size of a halving
request too, sets ``full`` (and almost full), as FreeBSD's
``swp_pager_getswapspace`` (2002) does; an allocation that fails at every
size logs one warning per failure streak; ``full`` clears at the next
allocation or free that leaves at least ``low_water`` blocks free
(``swp_sizecheck``).

Concurrency: the caller holds the VM lock for everything except ``locate``,
``run_limit``, ``read``, ``write`` and ``discard``, which may run in I/O
threads without it (they only read the device table, which is replaced, not
mutated, when devices come and go). No method blocks, except the I/O
methods, which block for the device's I/O.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from vmpager.devices.protocol import BlockDevice, ReadableBuffer, WritableBuffer, block_reader
from vmpager.errors import DeviceError, InvariantViolation
from vmpager.swap.blist import Blist
from vmpager.units import check_int

if TYPE_CHECKING:
    from vmpager.tiers.tier import SwapTier

__all__ = ["Layout", "SwapDeviceStatistics", "SwapSpace", "SwapSpaceStatistics"]

log = logging.getLogger("vmpager.swap")

Layout = Literal["per_device", "stripe"]

# Per-block states of a device, in a uint8 array per device. FREE is 0 so a
# fresh array from np.zeros costs no memory until blocks are used.
_FREE = 0
_USED = 1
_BAD = 2
_STATE_NAMES = {_FREE: "free", _USED: "in use", _BAD: "bad"}


@dataclass(frozen=True, slots=True)
class SwapDeviceStatistics:
    """Use of one swap device, in blocks. ``total`` is the device's size."""

    index: int
    name: str
    total: int
    used: int
    bad: int
    draining: bool
    free: int
    #: First global block of the device (per_device layout) or -1 (stripe layout).
    first_block: int


@dataclass(frozen=True, slots=True)
class SwapSpaceStatistics:
    """State and counters of a swap space, in blocks.

    ``total`` counts the devices that take allocations plus the used and bad
    blocks of draining ones, so ``free + used + bad == total``.
    ``warnings`` counts almost-full crossings, ``full_events`` the times a
    failed allocation made the space full.
    """

    layout: str
    block_size: int | None
    total: int
    used: int
    free: int
    bad: int
    almost_full: bool
    full: bool
    low_water: int
    high_water: int
    alloc_calls: int
    alloc_failures: int
    blocks_allocated: int
    blocks_freed: int
    blocks_marked_bad: int
    warnings: int
    full_events: int
    devices: tuple[SwapDeviceStatistics, ...]


class _Slot:
    """A device in the space: its block states, counts and (per_device) blist and slice."""

    __slots__ = (
        "bad",
        "base",
        "blist",
        "device",
        "draining",
        "index",
        "read_block",
        "seq",
        "state",
        "used",
    )

    def __init__(self, index: int, seq: int, device: BlockDevice, base: int) -> None:
        self.index = index
        self.seq = seq  # swapon order: the round-robin order of per_device allocation
        self.device = device
        #: The device's one-block read (``block_reader``): ``read_page``'s way in.
        self.read_block = block_reader(device)
        self.base = base
        self.state: npt.NDArray[np.uint8] = np.zeros(device.nblocks, dtype=np.uint8)
        self.used = 0
        self.bad = 0
        self.draining = False
        self.blist: Blist | None = None

    @property
    def nblocks(self) -> int:
        return len(self.state)

    @property
    def free(self) -> int:
        return len(self.state) - self.used - self.bad


def _runs_of(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(start, length) of every run of True in ``mask``."""
    if not mask.any():
        return []
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


class SwapSpace:
    """The swap block space over one or more devices; see the module docstring.

    ``stripe_blocks`` is the stripe (dmmax) of the stripe layout: runs never
    cross one. ``max_devices`` bounds the number of devices (in the stripe
    layout it is the interleave, fixed for the life of the space).
    ``low_water <= high_water`` are the almost-full marks in free blocks.
    ``block_size`` fixes the device block size in advance (else the first
    device sets it).
    """

    def __init__(
        self,
        *,
        layout: Layout = "per_device",
        stripe_blocks: int = 32,
        max_devices: int = 8,
        low_water: int = 128,
        high_water: int = 512,
        block_size: int | None = None,
    ) -> None:
        if layout not in ("per_device", "stripe"):
            raise ValueError(f"layout must be 'per_device' or 'stripe', got {layout!r}")
        self._layout: Layout = layout
        self._stripe = check_int(stripe_blocks, "stripe_blocks", minimum=1, maximum=1 << 20)
        self._max_devices = check_int(max_devices, "max_devices", minimum=1, maximum=1024)
        self._low_water = check_int(low_water, "low_water", minimum=0)
        self._high_water = check_int(high_water, "high_water", minimum=0)
        if self._low_water > self._high_water:
            raise ValueError(
                f"low_water must be <= high_water, got low_water={low_water} "
                f"high_water={high_water}"
            )
        self._block_size = (
            None if block_size is None else check_int(block_size, "block_size", minimum=1)
        )
        # Device table, replaced (never mutated) so I/O threads can read it unlocked.
        self._slots: tuple[_Slot | None, ...] = (None,) * self._max_devices
        # per_device: slots sorted by base, and their bases, for locate().
        self._by_base: tuple[_Slot, ...] = ()
        self._bases: tuple[int, ...] = ()
        self._blist: Blist | None = None  # stripe layout: one blist for all devices
        self._next_seq = 0
        self._rotor = 0  # per_device: seq of the device to try first
        self._free = 0
        self._used = 0
        self._bad = 0
        self._almost_full = False
        self._full = False
        self._alloc_calls = 0
        self._alloc_failures = 0
        self._blocks_allocated = 0
        self._blocks_freed = 0
        self._blocks_marked_bad = 0
        self._warnings = 0
        self._full_events = 0
        #: The swap tiers (compressed pool, integrity, encryption) every transfer
        #: goes through, when the VM has any (``attach_tier``).
        self._tier: SwapTier | None = None

    # ------------------------------------------------------------------
    # geometry

    @property
    def layout(self) -> Layout:
        """``"per_device"`` or ``"stripe"``."""
        return self._layout

    @property
    def stripe_blocks(self) -> int:
        """The stripe (dmmax) of the stripe layout."""
        return self._stripe

    @property
    def max_devices(self) -> int:
        """Most devices the space takes at once."""
        return self._max_devices

    @property
    def block_size(self) -> int:
        """Bytes per block: every device's block size. ``ValueError`` before it is known."""
        if self._block_size is None:
            raise ValueError("the swap space has no block size yet: add a device first")
        return self._block_size

    @property
    def total_blocks(self) -> int:
        """Blocks of the devices taking allocations, plus used and bad blocks of draining ones."""
        return self._free + self._used + self._bad

    @property
    def free_blocks(self) -> int:
        """Blocks that an allocation may hand out (vm_swap_size)."""
        return self._free

    @property
    def used_blocks(self) -> int:
        """Allocated blocks, on all devices."""
        return self._used

    @property
    def bad_blocks(self) -> int:
        """Blocks marked bad, on all devices."""
        return self._bad

    @property
    def almost_full(self) -> bool:
        """Free blocks fell below low_water and have not risen above high_water since."""
        return self._almost_full

    @property
    def full(self) -> bool:
        """An allocation failed, and free blocks have not reached low_water since."""
        return self._full

    def avail(self) -> int:
        """Same as ``free_blocks``."""
        return self._free

    def describe_free(self) -> str:
        """For messages: "swap has F of T blocks free (largest free run R), U used, B bad"."""
        return (
            f"swap has {self._free} of {self.total_blocks} blocks free (largest free run "
            f"{self.largest_free_run()}), {self._used} used, {self._bad} bad"
        )

    def largest_free_run(self) -> int:
        """Length of the longest run one allocation could take now (0 when none is free).

        Runs never cross a stripe or device; blocks of draining devices do not
        count. For messages and tests: O(free runs).
        """
        if self._layout == "stripe":
            blists = [] if self._blist is None else [self._blist]
        else:
            blists = [s.blist for s in self._slots if s is not None and not s.draining and s.blist]
        return max((length for b in blists for _, length in b.free_runs()), default=0)

    def devices(self) -> list[tuple[int, BlockDevice]]:
        """``(index, device)`` of every device present (draining ones too), by index."""
        return [(slot.index, slot.device) for slot in self._slots if slot is not None]

    # Global block <-> (slot, device block). Stripe layout: global stripe s is
    # device s % M's stripe s // M; inside the blist, stripe s starts at
    # s * (stripe + 1) (the extra block is the guard).

    def _where(self, blk: int) -> tuple[_Slot, int, int]:
        """(slot, device block, blocks to the end of the run limit) of a global block."""
        if self._layout == "stripe":
            stripe = self._stripe
            global_stripe, offset = divmod(blk, stripe)
            index = global_stripe % self._max_devices
            slot = self._slots[index]
            if slot is not None:
                dblk = global_stripe // self._max_devices * stripe + offset
                if dblk < slot.nblocks:
                    return slot, dblk, min(stripe - offset, slot.nblocks - dblk)
        else:
            position = bisect.bisect_right(self._bases, blk) - 1
            if position >= 0:
                slot = self._by_base[position]
                dblk = blk - slot.base
                if dblk < slot.nblocks:
                    return slot, dblk, slot.nblocks - dblk
        raise ValueError(f"swap block {blk} is not on any swap device")

    def _global(self, slot: _Slot, dblk: int) -> int:
        if self._layout == "stripe":
            stripe = self._stripe
            return (dblk // stripe * self._max_devices + slot.index) * stripe + dblk % stripe
        return slot.base + dblk

    def _blist_block(self, blk: int) -> int:
        """Stripe layout: the blist block of a global block (one guard block per stripe)."""
        return blk + blk // self._stripe

    def _pieces(self, blk: int, count: int, what: str) -> list[tuple[_Slot, int, int]]:
        """Split a global run into (slot, device block, length) pieces, each inside a run limit."""
        blk = check_int(blk, "blk", minimum=0)
        count = check_int(count, "count", minimum=1)
        pieces: list[tuple[_Slot, int, int]] = []
        while count:
            try:
                slot, dblk, limit = self._where(blk)
            except ValueError:
                raise ValueError(
                    f"{what}: swap block {blk} of the run is not on any swap device"
                ) from None
            length = min(limit, count)
            pieces.append((slot, dblk, length))
            blk += length
            count -= length
        return pieces

    def locate(self, blk: int) -> tuple[BlockDevice, int]:
        """The device holding global block ``blk`` and the block on it. O(1) / O(log ndevices)."""
        slot, dblk, _ = self._where(check_int(blk, "blk", minimum=0))
        return slot.device, dblk

    def run_limit(self, blk: int) -> int:
        """Blocks from ``blk`` to the end of its stripe (stripe) or device (per_device).

        One transfer, and one allocated run, never crosses this limit.
        """
        return self._where(check_int(blk, "blk", minimum=0))[2]

    # ------------------------------------------------------------------
    # I/O

    def attach_tier(self, tier: SwapTier) -> None:
        """Send every transfer through ``tier`` (before the first device is added)."""
        if self._next_seq:
            raise ValueError("attach_tier: the swap space already has devices")
        self._tier = tier

    @property
    def tier(self) -> SwapTier | None:
        """The attached swap tier, or None."""
        return self._tier

    def _io_target(
        self, blk: int, buffers: Sequence[ReadableBuffer] | Sequence[WritableBuffer]
    ) -> tuple[BlockDevice, int]:
        slot, dblk, limit = self._where(check_int(blk, "blk", minimum=0))
        block_size = slot.device.block_size
        nbytes = sum(memoryview(buffer).nbytes for buffer in buffers)
        nblocks = -(-nbytes // block_size)
        if nblocks > limit:
            raise ValueError(
                f"swap I/O of {nblocks} blocks at block {blk} crosses a stripe or device "
                f"boundary (at most {limit} blocks from there)"
            )
        return slot.device, dblk

    def read(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Read the run at global ``blk`` into ``buffers`` (one device request).

        ``ValueError`` if the run crosses ``run_limit(blk)``; ``DeviceError``
        from the device. Blocks for the I/O; the VM lock need not be held.
        """
        device, dblk = self._io_target(blk, buffers)
        if self._tier is not None:
            self._tier.read(blk, device, dblk, buffers)
            return
        device.read_blocks(dblk, buffers)

    def read_page(self, blk: int, page: memoryview) -> None:
        """``read(blk, [page])`` for one page of one block: the page-in of a fault.

        Same results and errors as ``read``, without its per-request generality:
        a memoryview of exactly one block goes to the tier's ``read_page`` or the
        device's one-block read (``block_reader``); anything else goes through
        ``read``. Blocks for the I/O; the VM lock need not be held.
        """
        if type(blk) is not int or blk < 0 or type(page) is not memoryview:
            self.read(blk, [page])
            return
        if page.nbytes != self._block_size:
            self.read(blk, [page])
            return
        by_base = self._by_base
        if len(by_base) == 1:  # per_device with one device: no search
            slot = by_base[0]
            dblk = blk - slot.base
            if not 0 <= dblk < len(slot.state):
                slot, dblk, _ = self._where(blk)  # raises: not on any device
        else:
            slot, dblk, _ = self._where(blk)
        tier = self._tier
        if tier is not None:
            tier.read_page(blk, slot.device, dblk, page)
        else:
            slot.read_block(dblk, page)

    def read_many(
        self,
        requests: Sequence[tuple[int, Sequence[WritableBuffer]]],
        run: Callable[[Callable[[int], None], Sequence[int]], None],
    ) -> list[DeviceError | None]:
        """Independent reads of global runs, several in flight (see ``FileDevice.read_many``).

        Each request is checked as for ``read`` (``ValueError`` before any I/O);
        ``run(fn, indices)`` runs ``fn`` over the indices, several at once. A
        device with a ``read_many`` of its own gets its requests in one call;
        others get one ``read_blocks`` per request. Result ``i``: None, or the
        ``DeviceError`` of request ``i``. The VM lock need not be held.
        """
        if self._tier is not None:
            return self._read_each_tiered(requests, run)
        groups: dict[int, tuple[BlockDevice, list[int], list[tuple[int, Sequence[WritableBuffer]]]]]
        groups = {}
        for i, ((_, buffers), (device, dblk)) in enumerate(
            zip(requests, self._io_targets(requests), strict=True)
        ):
            group = groups.setdefault(id(device), (device, [], []))
            group[1].append(i)
            group[2].append((dblk, buffers))
        errors: list[DeviceError | None] = [None] * len(requests)
        for device, indices, items in groups.values():
            many = getattr(device, "read_many", None)
            if many is not None:
                results = many(items, run)
            else:
                results = _read_blocks_each(device, items, run)
            for i, error in zip(indices, results, strict=True):
                errors[i] = error
        return errors

    def _read_each_tiered(
        self,
        requests: Sequence[tuple[int, Sequence[WritableBuffer]]],
        run: Callable[[Callable[[int], None], Sequence[int]], None],
    ) -> list[DeviceError | None]:
        """``read_many`` through the tier: the tier reads the device parts of all the
        requests with each device's own ``read_many`` (one pipeline per Redis node),
        then checks and decrypts page by page."""
        tier = self._tier
        assert tier is not None
        items = [
            (blk, device, dblk, buffers)
            for (blk, buffers), (device, dblk) in zip(
                requests, self._io_targets(requests), strict=True
            )
        ]
        return tier.read_many(items, run)

    def _io_targets(
        self, requests: Sequence[tuple[int, Sequence[WritableBuffer]]]
    ) -> list[tuple[BlockDevice, int]]:
        """``_io_target`` of every request (the same checks and errors, in order); with
        one device (per_device) a request of memoryviews inside it is placed without
        the search and the argument checks."""
        by_base = self._by_base
        if len(by_base) != 1:
            return [self._io_target(blk, buffers) for blk, buffers in requests]
        slot = by_base[0]
        device = slot.device
        base = slot.base
        nblocks = len(slot.state)
        size = self._block_size
        assert size is not None
        targets: list[tuple[BlockDevice, int]] = []
        for blk, buffers in requests:
            if type(blk) is int and base <= blk < base + nblocks:
                nbytes = 0
                for buffer in buffers:
                    if type(buffer) is not memoryview:
                        break
                    nbytes += buffer.nbytes
                else:
                    dblk = blk - base
                    if dblk + -(-nbytes // size) <= nblocks:
                        targets.append((device, dblk))
                        continue
            targets.append(self._io_target(blk, buffers))
        return targets

    def write(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Write ``buffers`` to the run at global ``blk`` (one device request); see ``read``."""
        device, dblk = self._io_target(blk, buffers)
        if self._tier is not None:
            self._tier.write(blk, device, dblk, buffers)
            return
        device.write_blocks(dblk, buffers)

    def discard(self, blk: int, count: int) -> None:
        """Tell the devices the run's contents are no longer needed (one request per piece)."""
        for slot, dblk, length in self._pieces(blk, count, "discard"):
            slot.device.discard(dblk, length)

    # ------------------------------------------------------------------
    # devices coming and going

    def _slot(self, index_or_name: int | str) -> _Slot:
        if isinstance(index_or_name, bool) or not isinstance(index_or_name, (int, str)):
            raise TypeError(f"index_or_name must be a device index or name, got {index_or_name!r}")
        for slot in self._slots:
            if slot is not None and (
                slot.index == index_or_name
                if isinstance(index_or_name, int)
                else slot.device.name == index_or_name
            ):
                return slot
        present = ", ".join(f"{s.index}:{s.device.name}" for s in self._slots if s) or "none"
        raise ValueError(f"no swap device {index_or_name!r} (devices: {present})")

    def swapon(self, device: BlockDevice) -> int:
        """Add ``device`` (all its blocks free); returns its index. Works while in use.

        Refuses (``ValueError``) a device whose block size differs from the
        others', a device (or name) already present, and more than
        ``max_devices`` devices. Cost: O(device blocks / stripe_blocks) blist
        frees (stripe) or one blist (per_device).
        """
        if not isinstance(device, BlockDevice):
            raise TypeError(f"device must implement BlockDevice, got {type(device).__name__}")
        block_size = check_int(device.block_size, "device.block_size", minimum=1)
        nblocks = check_int(device.nblocks, "device.nblocks", minimum=1)
        if self._block_size is not None and block_size != self._block_size:
            raise ValueError(
                f"swap device {device.name}: block_size {block_size} differs from the swap "
                f"space's {self._block_size}"
            )
        for slot in self._slots:
            if slot is not None and (slot.device is device or slot.device.name == device.name):
                raise ValueError(
                    f"swap device {device.name} is already in use (index {slot.index})"
                )
        index = next((i for i, slot in enumerate(self._slots) if slot is None), None)
        if index is None:
            raise ValueError(f"too many swap devices: max_devices={self._max_devices} in use")
        base = -1 if self._layout == "stripe" else self._place(nblocks)
        slot = _Slot(index, self._next_seq, device, base)
        self._next_seq += 1
        if self._layout == "stripe":
            self._stripe_swapon(slot)
        else:
            slot.blist = Blist(nblocks)
            by_base = sorted((*self._by_base, slot), key=lambda s: s.base)
            self._by_base = tuple(by_base)
            self._bases = tuple(s.base for s in by_base)
        self._block_size = block_size
        if self._tier is not None:
            self._tier.device_added(device)
        slots = list(self._slots)
        slots[index] = slot
        self._slots = tuple(slots)
        self._free += nblocks
        log.info("swapon %s: index %d, %d blocks", device.name, index, nblocks)
        self._sizecheck()
        return index

    def _place(self, nblocks: int) -> int:
        """per_device: the lowest global base with a free gap block on both sides of the slice."""
        base = 0
        for slot in self._by_base:
            if base + nblocks < slot.base:  # leaves block base + nblocks unused
                return base
            base = max(base, slot.base + slot.nblocks + 1)
        return base

    def _stripe_swapon(self, slot: _Slot) -> None:
        stripe, ndev = self._stripe, self._max_devices
        nstripes = -(-slot.nblocks // stripe)
        last = (nstripes - 1) * ndev + slot.index  # the device's last global stripe
        needed = last * (stripe + 1) + stripe
        if self._blist is None:
            # Everything starts allocated: only the device's stripes are freed below.
            self._blist = Blist(1)
            self._blist.fill(0, 1)
        if needed > self._blist.nblocks:
            self._blist.resize(needed, free_new=False)
        for dstripe in range(nstripes):
            length = min(stripe, slot.nblocks - dstripe * stripe)
            self._blist.free((dstripe * ndev + slot.index) * (stripe + 1), length)

    def _release_free_blocks(self, slot: _Slot, *, free: bool) -> None:
        """Stripe layout: take the slot's free blocks out of the blist (or give them back)."""
        blist = self._blist
        assert blist is not None
        stripe = self._stripe
        for start, length in _runs_of(slot.state == _FREE):
            # A run of free device blocks may span device stripes: split at them.
            while length:
                piece = min(length, stripe - start % stripe)
                first = self._blist_block(self._global(slot, start))
                if free:
                    blist.free(first, piece)
                else:
                    taken = blist.fill(first, piece)
                    assert taken == piece, "a free block of a device was allocated in the blist"
                start += piece
                length -= piece

    def swapoff_begin(self, index_or_name: int | str) -> None:
        """First half of swapoff: the device takes no new allocations; its free blocks
        stop counting as free. Blocks freed on it later stay unallocatable."""
        slot = self._slot(index_or_name)
        if slot.draining:
            return
        if self._layout == "stripe":
            self._release_free_blocks(slot, free=False)
        slot.draining = True
        self._free -= slot.free
        log.info("swapoff %s: draining, %d blocks in use", slot.device.name, slot.used)
        self._sizecheck()

    def swapoff_cancel(self, index_or_name: int | str) -> None:
        """Undo ``swapoff_begin``: the device takes allocations again."""
        slot = self._slot(index_or_name)
        if not slot.draining:
            return
        if self._layout == "stripe":
            self._release_free_blocks(slot, free=True)
        slot.draining = False
        self._free += slot.free
        log.info("swapoff %s: cancelled", slot.device.name)
        self._sizecheck()

    def blocks_in_use(self, index_or_name: int | str) -> npt.NDArray[np.int64]:
        """Global numbers of the device's allocated blocks (not free, not bad), ascending
        for per_device and by device block for stripe. O(device blocks)."""
        slot = self._slot(index_or_name)
        dblks = np.flatnonzero(slot.state == _USED).astype(np.int64)
        if self._layout == "stripe":
            stripe = self._stripe
            return (dblks // stripe * self._max_devices + slot.index) * stripe + dblks % stripe
        return dblks + slot.base

    def swapoff_finish(self, index_or_name: int | str) -> BlockDevice:
        """Remove the device, which must have no blocks in use; returns it (the caller closes it).

        Its bad blocks go with it. Implies ``swapoff_begin`` if that was not called.
        """
        slot = self._slot(index_or_name)
        if slot.used:
            raise ValueError(
                f"swapoff {slot.device.name}: {slot.used} blocks are still in use; "
                "move their pages first (blocks_in_use)"
            )
        self.swapoff_begin(slot.index)
        # Nothing of the device is free in the blists any more; drop it.
        slots = list(self._slots)
        slots[slot.index] = None
        self._slots = tuple(slots)
        if self._layout == "per_device":
            self._by_base = tuple(s for s in self._by_base if s is not slot)
            self._bases = tuple(s.base for s in self._by_base)
        self._bad -= slot.bad
        if self._tier is not None:
            self._tier.device_removed(slot.device)
        log.info("swapoff %s: removed", slot.device.name)
        self._sizecheck()
        return slot.device

    # ------------------------------------------------------------------
    # allocation

    def alloc(self, count: int, *, min_count: int | None = None) -> tuple[int, int] | None:
        """Allocate a run of ``count`` global blocks inside one stripe / device.

        With ``min_count < count``, a failed request is halved (down to
        ``min_count``) and retried; in the per_device layout every size is
        tried on every device round-robin first. Returns ``(blk, n)`` with
        ``min_count <= n <= count``, or None (the space is then full). In
        the stripe layout ``count`` is capped at ``stripe_blocks``. Cost: per
        size, one blist search per device tried.
        """
        count = check_int(count, "count", minimum=1)
        floor = count if min_count is None else check_int(min_count, "min_count", minimum=1)
        if floor > count:
            raise ValueError(f"min_count must be in [1, {count}] (count), got {floor}")
        if self._layout == "stripe":
            if floor > self._stripe:
                raise ValueError(
                    f"a run of {floor} blocks cannot fit in a stripe: min_count (or count) must "
                    f"be at most stripe_blocks={self._stripe}"
                )
            count = min(count, self._stripe)
        self._alloc_calls += 1
        was_full = self._full
        size, most = count, count
        while True:
            got = (
                self._alloc_stripe(size, most)
                if self._layout == "stripe"
                else (self._alloc_per_device(size, most))
            )
            if got is not None:
                break
            # swp_pager_getswapspace (FreeBSD swap_pager.c 2002): every failed
            # attempt, the intermediate ones of a halving request too, marks
            # the space full and almost full; the next allocation or free that
            # leaves low_water blocks free clears ``full`` (swp_sizecheck).
            if not self._full:
                self._full_events += 1
            self._full = True
            self._almost_full = True
            if size <= floor:
                self._alloc_failures += 1
                if was_full:
                    return None  # one warning per failure streak
                log.warning(
                    "swap space full: no free run of %d blocks (%d blocks free, largest free "
                    "run %d)",
                    floor,
                    self._free,
                    self.largest_free_run(),
                )
                return None
            # As swp_pager_getswapspace: take anything shorter than what failed.
            most = size - 1
            size = max(size >> 1, floor)
        slot, dblk, taken = got
        slot.state[dblk : dblk + taken] = _USED
        slot.used += taken
        self._used += taken
        self._free -= taken
        self._blocks_allocated += taken
        self._sizecheck()
        return self._global(slot, dblk), taken

    def _alloc_stripe(self, size: int, most: int) -> tuple[_Slot, int, int] | None:
        if self._blist is None:
            return None
        got = self._blist.alloc(size, most)
        if got is None:
            return None
        first, taken = got
        stripe_index, offset = divmod(first, self._stripe + 1)
        slot = self._slots[stripe_index % self._max_devices]
        assert slot is not None and not slot.draining, f"blist handed out block {first}"
        return slot, stripe_index // self._max_devices * self._stripe + offset, taken

    def _alloc_per_device(self, size: int, most: int) -> tuple[_Slot, int, int] | None:
        ready = sorted(
            (s for s in self._slots if s is not None and not s.draining), key=lambda s: s.seq
        )
        if not ready:
            return None
        start = next((i for i, s in enumerate(ready) if s.seq >= self._rotor), 0)
        for slot in ready[start:] + ready[:start]:
            assert slot.blist is not None
            got = slot.blist.alloc(size, most)
            if got is not None:
                self._rotor = slot.seq + 1
                return slot, got[0], got[1]
        return None

    def free(self, blk: int, count: int) -> None:
        """Give back allocated blocks (a run of existing blocks, split at run limits).

        ``ValueError`` (changing nothing) if a block does not exist, is free
        (a double free) or is bad. On a draining device the blocks stay
        unallocatable. Cost: O(count) plus one blist free per piece.
        """
        pieces = self._pieces(blk, count, "free")
        self._require_used(pieces, "free")
        if self._tier is not None:
            retired = self._tier.freed(blk, count)
            if retired:
                # Blocks whose pages were found corrupt are not handed out again.
                for bad in retired:
                    self.mark_bad(bad, 1)
                keep = sorted(set(range(blk, blk + count)).difference(retired))
                for start, length in _runs_of_numbers(keep):
                    self._free_pieces(self._pieces(start, length, "free"))
                self._sizecheck()
                return
        self._free_pieces(pieces)
        self._sizecheck()

    def free_many(self, blocks: Sequence[int]) -> None:
        """Give back allocated ``blocks`` (sorted, no repeats): ``free`` of each run of
        consecutive blocks among them, in one call.

        The same end state, statistics, retirements (blocks the tier found
        corrupt are marked bad) and log messages as those ``free`` calls; the
        checks are made for all blocks at once, before anything changes. A
        list that is not strictly increasing, a block that does not exist or
        is not allocated, and the stripe layout take the ``free`` calls one
        run at a time (so the error is ``free``'s). Cost: O(len(blocks)) in
        numpy, plus one blist free per run.
        """
        if not blocks:
            return
        if self._layout != "per_device" or not self._by_base:
            self._free_runs(blocks)
            return
        array = np.asarray(blocks)
        if (
            array.dtype.kind not in "iu"
            or array.ndim != 1
            or int(array[0]) < 0
            or (len(array) > 1 and not bool((array[1:] > array[:-1]).all()))
        ):
            self._free_runs(blocks)
            return
        array = array.astype(np.int64, copy=False)
        parts = self._by_slot(array)
        if parts is None:
            self._free_runs(blocks)
            return
        if self._tier is not None:
            retired = self._tier.freed_blocks(array.tolist())
            if retired:
                # Blocks whose pages were found corrupt are not handed out again.
                for bad in retired:
                    self.mark_bad(bad, 1)
                array = np.setdiff1d(array, np.asarray(retired, dtype=np.int64))
                parts = self._by_slot(array)
                assert parts is not None
        for slot, dblks in parts:
            count = len(dblks)
            if not count:
                continue
            slot.state[dblks] = _FREE
            slot.used -= count
            self._used -= count
            self._blocks_freed += count
            assert slot.blist is not None
            free = slot.blist.free
            breaks = np.flatnonzero(dblks[1:] != dblks[:-1] + 1).tolist()
            starts = dblks[[0, *(b + 1 for b in breaks)]].tolist()
            ends = dblks[[*breaks, count - 1]].tolist()
            for start, end in zip(starts, ends, strict=True):
                free(start, end - start + 1)
            if not slot.draining:
                self._free += count
        self._sizecheck()

    def _by_slot(
        self, array: npt.NDArray[np.int64]
    ) -> list[tuple[_Slot, npt.NDArray[np.int64]]] | None:
        """per_device: sorted global blocks as (slot, device blocks) per device, or
        None when one does not exist or is not allocated."""
        if not len(array):
            return []
        bases = self._bases
        if len(bases) == 1:
            slots = [(self._by_base[0], array)]
        else:
            where = np.searchsorted(np.asarray(bases, dtype=np.int64), array, side="right") - 1
            if int(where[0]) < 0:
                return None
            cuts = np.flatnonzero(where[1:] != where[:-1]) + 1
            slots = [
                (self._by_base[int(where[a])], array[a:b])
                for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(array)], strict=True)
            ]
        parts: list[tuple[_Slot, npt.NDArray[np.int64]]] = []
        for slot, global_blocks in slots:
            dblks = global_blocks - slot.base
            if int(dblks[0]) < 0 or int(dblks[-1]) >= slot.nblocks:
                return None
            if not bool((slot.state[dblks] == _USED).all()):
                return None
            parts.append((slot, dblks))
        return parts

    def _free_runs(self, blocks: Sequence[int]) -> None:
        """``free`` of each run of consecutive numbers in ``blocks``, in order."""
        for start, length in _runs_of_numbers(list(blocks)):
            self.free(start, length)

    def _free_pieces(self, pieces: list[tuple[_Slot, int, int]]) -> None:
        for slot, dblk, length in pieces:
            slot.state[dblk : dblk + length] = _FREE
            slot.used -= length
            self._used -= length
            self._blocks_freed += length
            if self._layout == "per_device":
                # A draining device's own blist is never searched, so it may
                # keep its free blocks; swapoff_cancel then has nothing to redo.
                assert slot.blist is not None
                slot.blist.free(dblk, length)
            elif not slot.draining:
                assert self._blist is not None
                self._blist.free(self._blist_block(self._global(slot, dblk)), length)
            if not slot.draining:
                self._free += length

    def mark_bad(self, blk: int, count: int) -> None:
        """Allocated blocks become bad: never handed out again, counted per device.

        ``ValueError`` (changing nothing) unless every block is allocated.
        """
        pieces = self._pieces(blk, count, "mark_bad")
        self._require_used(pieces, "mark_bad")
        for slot, dblk, length in pieces:
            slot.state[dblk : dblk + length] = _BAD
            slot.used -= length
            slot.bad += length
            self._used -= length
            self._bad += length
            self._blocks_marked_bad += length
        log.warning("swap blocks %d..%d marked bad", blk, blk + count - 1)

    def _require_used(self, pieces: list[tuple[_Slot, int, int]], what: str) -> None:
        for slot, dblk, length in pieces:
            if length == 1 and slot.state[dblk] == _USED:
                continue  # the common single block, without an array search
            states = slot.state[dblk : dblk + length]
            wrong = np.flatnonzero(states != _USED)
            if len(wrong):
                first = dblk + int(wrong[0])
                raise ValueError(
                    f"{what}: swap block {self._global(slot, first)} ({slot.device.name} block "
                    f"{first}) is {_STATE_NAMES[int(states[wrong[0]])]}, not allocated"
                )

    def _sizecheck(self) -> None:
        """swp_sizecheck: almost-full hysteresis between the water marks; clear ``full``."""
        if self._free < self._low_water:
            if not self._almost_full:
                self._almost_full = True
                self._warnings += 1
                log.warning(
                    "swap space almost full: %d blocks free, below the low water mark %d",
                    self._free,
                    self._low_water,
                )
        else:
            self._full = False
            if self._free > self._high_water and self._almost_full:
                self._almost_full = False
                log.info(
                    "swap space no longer almost full: %d blocks free, above high water mark %d",
                    self._free,
                    self._high_water,
                )

    # ------------------------------------------------------------------
    # statistics and invariants

    def statistics(self) -> SwapSpaceStatistics:
        """Counts of the space and of each device. O(ndevices)."""
        devices = tuple(
            SwapDeviceStatistics(
                index=slot.index,
                name=slot.device.name,
                total=slot.nblocks,
                used=slot.used,
                bad=slot.bad,
                draining=slot.draining,
                free=slot.free,
                first_block=slot.base,
            )
            for slot in self._slots
            if slot is not None
        )
        return SwapSpaceStatistics(
            layout=self._layout,
            block_size=self._block_size,
            total=self.total_blocks,
            used=self._used,
            free=self._free,
            bad=self._bad,
            almost_full=self._almost_full,
            full=self._full,
            low_water=self._low_water,
            high_water=self._high_water,
            alloc_calls=self._alloc_calls,
            alloc_failures=self._alloc_failures,
            blocks_allocated=self._blocks_allocated,
            blocks_freed=self._blocks_freed,
            blocks_marked_bad=self._blocks_marked_bad,
            warnings=self._warnings,
            full_events=self._full_events,
            devices=devices,
        )

    def check(self) -> None:
        """Assert every invariant; raise ``InvariantViolation`` listing all broken ones.

        Per device and in total, free + used + bad == total and the counts
        match the block states; the blists hold exactly the free blocks of
        devices taking allocations (no block of a missing or draining device,
        and no stripe guard, is free); per_device slices keep a gap between
        them. Cost: O(total blocks) with numpy, plus a blist check.
        """
        problems: list[str] = []
        free = used = bad = 0
        present = [slot for slot in self._slots if slot is not None]
        for position, slot in enumerate(self._slots):
            if slot is not None and slot.index != position:
                problems.append(
                    f"device {slot.device.name} at position {position} has index {slot.index}"
                )
        for slot in present:
            name = slot.device.name
            counts = np.bincount(slot.state, minlength=3)
            if len(counts) > 3:
                problems.append(f"{name}: block states outside free/used/bad")
            if (int(counts[_USED]), int(counts[_BAD])) != (slot.used, slot.bad):
                problems.append(
                    f"{name}: counts used={slot.used} bad={slot.bad} but states say "
                    f"used={int(counts[_USED])} bad={int(counts[_BAD])}"
                )
            if slot.free < 0 or slot.free + slot.used + slot.bad != slot.nblocks:
                problems.append(f"{name}: free {slot.free} + used + bad != total {slot.nblocks}")
            if slot.nblocks != slot.device.nblocks:
                problems.append(
                    f"{name}: device has {slot.device.nblocks} blocks, space {slot.nblocks}"
                )
            if slot.device.block_size != self._block_size:
                problems.append(
                    f"{name}: block_size {slot.device.block_size} != {self._block_size}"
                )
            used += slot.used
            bad += slot.bad
            if not slot.draining:
                free += slot.free
        if (free, used, bad) != (self._free, self._used, self._bad):
            problems.append(
                f"space counts free={self._free} used={self._used} bad={self._bad}, devices say "
                f"free={free} used={used} bad={bad}"
            )
        # Water marks are first applied at the first swapon (an empty new space is quiet).
        if self._next_seq and self._free < self._low_water and not self._almost_full:
            problems.append(f"{self._free} blocks free, below low_water, but not almost_full")
        if self._layout == "stripe":
            self._check_stripe(present, problems)
        else:
            self._check_per_device(present, problems)
        if problems:
            raise InvariantViolation(problems)

    def _check_per_device(self, present: list[_Slot], problems: list[str]) -> None:
        if self._blist is not None:
            problems.append("per_device layout has a shared blist")
        by_base = sorted(present, key=lambda s: s.base)
        if list(self._by_base) != by_base or self._bases != tuple(s.base for s in by_base):
            problems.append("the base-sorted device table is stale")
        for left, right in itertools.pairwise(by_base):
            if left.base + left.nblocks >= right.base:
                problems.append(
                    f"{left.device.name} [{left.base}, {left.base + left.nblocks}) leaves no gap "
                    f"before {right.device.name} at {right.base}"
                )
        for slot in present:
            blist = slot.blist
            if blist is None or blist.nblocks != slot.nblocks:
                problems.append(f"{slot.device.name}: missing or mis-sized blist")
                continue
            try:
                blist.check()
            except AssertionError as error:
                problems.append(f"{slot.device.name}: blist: {error}")
            in_blist = np.zeros(slot.nblocks, dtype=bool)
            for start, length in blist.free_runs():
                in_blist[start : start + length] = True
            # A draining device's blist is never searched, but frees still reach it.
            expected = slot.state == _FREE
            if not np.array_equal(in_blist, expected):
                wrong = int(np.flatnonzero(in_blist != expected)[0])
                problems.append(
                    f"{slot.device.name}: block {wrong} is "
                    f"{_STATE_NAMES[int(slot.state[wrong])]} but "
                    f"{'free' if in_blist[wrong] else 'allocated'} in its blist"
                )

    def _check_stripe(self, present: list[_Slot], problems: list[str]) -> None:
        blist = self._blist
        if blist is None:
            if present:
                problems.append("stripe layout with devices but no blist")
            return
        try:
            blist.check()
        except AssertionError as error:
            problems.append(f"blist: {error}")
        if blist.avail() != self._free:
            problems.append(f"blist has {blist.avail()} free blocks, the space {self._free}")
        stripe, ndev = self._stripe, self._max_devices
        expected_free = {slot.index: np.zeros(slot.nblocks, dtype=bool) for slot in present}
        for start, length in blist.free_runs():
            positions = np.arange(start, start + length, dtype=np.int64)
            global_stripe, offset = np.divmod(positions, stripe + 1)
            if (offset == stripe).any():
                problems.append(f"a stripe guard block in [{start}, {start + length}) is free")
                continue
            index = global_stripe % ndev
            dblk = global_stripe // ndev * stripe + offset
            for device_index in np.unique(index).tolist():
                mask = index == device_index
                slot = self._slots[device_index]
                if slot is None or slot.draining:
                    problems.append(
                        f"blist blocks of {'draining' if slot else 'missing'} device "
                        f"{device_index} are free"
                    )
                    continue
                blocks = dblk[mask]
                if int(blocks.max()) >= slot.nblocks:
                    problems.append(f"blocks past the end of {slot.device.name} are free")
                    continue
                expected_free[device_index][blocks] = True
        for slot in present:
            want = (slot.state == _FREE) & (not slot.draining)
            have = expected_free[slot.index]
            if not np.array_equal(have, want):
                wrong = int(np.flatnonzero(have != want)[0])
                state = _STATE_NAMES[int(slot.state[wrong])]
                if slot.draining:
                    state += " (draining)"
                problems.append(
                    f"{slot.device.name}: block {wrong} is {state} but "
                    f"{'free' if have[wrong] else 'allocated'} in the blist"
                )

    def __repr__(self) -> str:
        return (
            f"SwapSpace(layout={self._layout!r}, devices={len(self.devices())}, "
            f"total={self.total_blocks}, free={self._free}, used={self._used}, bad={self._bad})"
        )


def _runs_of_numbers(numbers: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive numbers in sorted ``numbers``."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][0] + runs[-1][1] == n:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def _read_each(
    read: Callable[[int], None],
    where: Callable[[int], tuple[str, int]],
    count: int,
    run: Callable[[Callable[[int], None], Sequence[int]], None],
) -> list[DeviceError | None]:
    """Requests ``0 .. count-1`` read one by one, several at once (``run``).

    ``read(k)`` does request ``k``; ``where(k)`` is its ``(device name,
    block)``, naming an ``OSError`` as a ``DeviceError``. Result ``k`` is None
    or that request's ``DeviceError``.
    """
    results: list[DeviceError | None] = [None] * count

    def one(k: int) -> None:
        try:
            read(k)
        except DeviceError as error:
            results[k] = error
        except OSError as error:
            name, blk = where(k)
            results[k] = DeviceError(error.errno or errno.EIO, name, blk, str(error))

    run(one, range(count))
    return results


def _read_blocks_each(
    device: BlockDevice,
    items: Sequence[tuple[int, Sequence[WritableBuffer]]],
    run: Callable[[Callable[[int], None], Sequence[int]], None],
) -> list[DeviceError | None]:
    """``read_many`` for a device without one: one ``read_blocks`` per request."""
    return _read_each(
        lambda k: device.read_blocks(*items[k]),
        lambda k: (device.name, items[k][0]),
        len(items),
        run,
    )
