"""The swap tier pipeline: compressed pool, encryption and integrity under the swap space.

``SwapSpace`` hands every swap transfer to the tier once it has found the
device and the block on it (as Linux's zswap sits under the swap slot: the
swap pager still allocates blocks and writes runs; the tier decides where the
page really goes). On the way out, per page of a run:

1. *compressed pool* (``compress=``): a same-filled page (one 8-byte word
   repeated) is kept as its word; another page is compressed and kept in
   memory when the result is at most ``accept_limit`` bytes. Pages that do
   not compress that well (*rejects*) go on to the device.
2. *seal* (per device): AES-256-GCM with a per-device key, or an xxh3-64
   checksum of the page (``seal.py``); the 10 or 8 bytes of metadata per
   block stay in memory.
3. the device write, one request per run of consecutive device blocks.

The way in is the reverse: a block in the pool is decompressed without
touching a device; a block on a device is read and checked (batches of
reads through each device's own ``read_many``, then checked page by page).
A page that fails is read once more, then from the device's replicas
(``read_replica``, the Redis devices); when no copy passes, ``CorruptPage``,
the data never reaching the caller. The block is then
*bad* for the tier (later reads fail at once) and the swap space marks it bad
when its owner frees it (``freed``).

Pool budget and writeback: the pool holds at most ``pool_capacity`` bytes
(compressed sizes plus a fixed per-entry overhead). When a store takes it
over, the writer writes the oldest entries back to their blocks, up to
``writeback_cluster`` at a time, sorted into runs of consecutive blocks (the
LRU writeback of zswap). The writer is the thread doing the swap write: for
the page daemon's asynchronous pageouts, an I/O engine worker, so writeback
runs asynchronously to the daemon, with the VM lock released. An entry stays
readable in the pool until its block is written; a write to a block being
written back waits for it, so two writes of one block never race.

Locking: the tier has its own lock, never held during device I/O or while
taking the VM lock; ``freed`` and the statistics are called with the VM lock
held (VM lock, then tier lock). ``read``/``write`` run in I/O threads.
"""

from __future__ import annotations

import errno
import logging
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from vmpager.devices.protocol import BlockDevice, ReadableBuffer, WritableBuffer, block_reader
from vmpager.errors import CorruptPage, DeviceError, InvariantViolation
from vmpager.tiers.codec import Codec, fill_word, same_fill_word
from vmpager.tiers.seal import Checksum, Encryption, Seal
from vmpager.units import check_int

__all__ = ["SwapTier", "TierStatistics"]

log = logging.getLogger("vmpager.swap")

#: Bytes charged to the pool per entry besides its data: the ordered dict's
#: slot and link, the key, the entry tuple (203 bytes measured with tracemalloc
#: over 20,000 entries) and the bytes object's header (33), rounded up.
ENTRY_OVERHEAD = 240


@dataclass(frozen=True, slots=True)
class TierStatistics:
    """State and counters of the swap tiers.

    Pool: ``stored_pages`` entries (``same_filled_pages`` of them a single
    word) holding ``pool_bytes`` of ``pool_capacity`` (data plus overhead);
    ``compressed_bytes`` is the data alone, ``ratio`` the pages' bytes over
    it. ``rejects``: pages that compressed too poorly and went to a device.
    ``writebacks``: pages written from the pool to their blocks (in
    ``writeback_runs`` requests). ``hits``: pages read from the pool.
    Devices: ``device_pages_written/read`` through the seal,
    ``corrupt_pages`` detected, ``bad_pending`` corrupt blocks not yet freed,
    ``meta_bytes`` of per-block checksums or tags (``meta_bytes_per_block``).
    """

    compress: str | None
    encrypt: bool
    integrity: bool
    pool_capacity: int
    pool_bytes: int
    stored_pages: int
    same_filled_pages: int
    compressed_bytes: int
    ratio: float
    stores: int
    rejects: int
    writebacks: int
    writeback_runs: int
    writeback_errors: int
    hits: int
    device_pages_written: int
    device_pages_read: int
    corrupt_pages: int
    #: Pages that failed their check once and passed when read again.
    reread_ok: int
    #: Pages that failed their check twice and were read from a device replica.
    replica_ok: int
    bad_pending: int
    meta_bytes: int
    meta_bytes_per_block: int


# A pool entry: (payload, device, device block). The payload is the compressed
# bytes, or an int: the word of a same-filled page.
_Entry = tuple[bytes | int, BlockDevice, int]


def _charge(payload: bytes | int) -> int:
    return ENTRY_OVERHEAD + (len(payload) if isinstance(payload, bytes) else 0)


def _pages(
    buffers: Sequence[ReadableBuffer] | Sequence[WritableBuffer], size: int
) -> list[memoryview]:
    """The request's buffers cut into pages (each buffer a multiple of ``size``)."""
    pages: list[memoryview] = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        if len(view) == size:
            pages.append(view)
            continue
        if len(view) % size:
            raise ValueError(f"swap buffers must be whole pages of {size} bytes, got {len(view)}")
        pages.extend(view[k : k + size] for k in range(0, len(view), size))
    return pages


class _Scratch(threading.local):
    """Page-aligned buffers of one thread (an O_DIRECT device reads and writes them
    without a bounce buffer of its own). ``plain`` holds pages being written back,
    ``sealed`` what goes to or comes from a device."""

    def __init__(self) -> None:
        self.areas: dict[str, tuple[mmap.mmap, memoryview]] = {}

    def get(self, kind: str, nbytes: int) -> memoryview:
        area = self.areas.get(kind)
        if area is None or len(area[1]) < nbytes:
            # A smaller old area is dropped, not closed: views of it may still exist.
            size = max(nbytes, 64 * mmap.PAGESIZE)
            buffer = mmap.mmap(-1, size)
            area = (buffer, memoryview(buffer))
            self.areas[kind] = area
        return area[1][:nbytes]


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in sorted ``indices``."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _read_many(
    device: BlockDevice,
    items: Sequence[tuple[int, Sequence[WritableBuffer]]],
    run: Callable[[Callable[[int], None], Sequence[int]], None],
) -> list[DeviceError | None]:
    """The device's own ``read_many(items, run)``, or ``_read_blocks_each`` for a
    device without one: one result per item, ``None`` where it was read."""
    many = getattr(device, "read_many", None)
    if many is not None:
        results: list[DeviceError | None] = many(items, run)
        return results
    return _read_blocks_each(device, items, run)


def _read_blocks_each(
    device: BlockDevice,
    items: Sequence[tuple[int, Sequence[WritableBuffer]]],
    run: Callable[[Callable[[int], None], Sequence[int]], None],
) -> list[DeviceError | None]:
    """``read_many`` for a device without one: one ``read_blocks`` per request, run
    by ``run``; an ``OSError`` becomes a ``DeviceError`` naming the device and block."""
    results: list[DeviceError | None] = [None] * len(items)

    def one(k: int) -> None:
        dblk, buffers = items[k]
        try:
            device.read_blocks(dblk, buffers)
        except DeviceError as error:
            results[k] = error
        except OSError as error:
            results[k] = DeviceError(error.errno or errno.EIO, device.name, dblk, str(error))

    run(one, range(len(items)))
    return results


class SwapTier:
    """The pipeline between a ``SwapSpace`` and its devices; see the module docstring.

    ``page_size``: the block size. ``compress``: "lz4", "zstd" or None (no
    pool). ``pool_capacity``: bytes the pool may hold. ``encrypt``: AES-GCM
    on every device. ``integrity``: xxh3-64 checksums (implied by
    ``encrypt``, whose tag is the check). ``accept_limit``: largest
    compressed size kept (default 3/4 of a page). ``writeback_cluster``:
    most pages written back at once.
    """

    def __init__(
        self,
        page_size: int,
        *,
        compress: str | None = None,
        pool_capacity: int = 0,
        encrypt: bool = False,
        integrity: bool = True,
        accept_limit: int | None = None,
        writeback_cluster: int = 32,
    ) -> None:
        self.page_size = check_int(page_size, "page_size", minimum=64)
        for name, flag in (("encrypt", encrypt), ("integrity", integrity)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self._codec = Codec(compress, page_size) if compress is not None else None
        self._capacity = check_int(pool_capacity, "pool_capacity", minimum=0)
        if self._codec is not None and self._capacity < page_size:
            raise ValueError(
                f"compress_pool must hold at least one page ({page_size} bytes), "
                f"got {pool_capacity}"
            )
        self._accept = (
            page_size * 3 // 4
            if accept_limit is None
            else check_int(accept_limit, "accept_limit", minimum=1, maximum=page_size)
        )
        self._cluster = check_int(writeback_cluster, "writeback_cluster", minimum=1, maximum=4096)
        self.encrypt = encrypt
        self.integrity = integrity or encrypt
        if self.encrypt:
            Encryption(1, "probe")  # the missing-package error now, not at swapon
        elif self.integrity:
            Checksum(1)
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        self._scratch = _Scratch()
        self._pool: OrderedDict[int, _Entry] = OrderedDict()
        self._pool_bytes = 0
        self._data_bytes = 0
        self._same = 0
        self._seals: dict[int, Seal] = {}  # by id(device)
        #: Each device's one-block read (``block_reader``), by id(device).
        self._readers: dict[int, Callable[[int, memoryview], None]] = {}
        #: Device writes in flight: (first global block, count), one entry per run.
        self._writing: list[tuple[int, int]] = []
        self._writeback: dict[int, BlockDevice] = {}  # global blocks being written back
        self._bad: dict[int, tuple[str, int]] = {}  # corrupt global block -> (device, dblk)
        self._stores = 0
        self._rejects = 0
        self._writebacks = 0
        self._writeback_runs = 0
        self._writeback_errors = 0
        self._hits = 0
        self._dev_written = 0
        self._dev_read = 0
        self._corrupt = 0
        self._reread_ok = 0
        self._replica_ok = 0

    @property
    def compress(self) -> str | None:
        """The compression algorithm, or None."""
        return None if self._codec is None else self._codec.algorithm

    @property
    def pool_capacity(self) -> int:
        """Bytes the pool may hold."""
        return self._capacity

    # -- devices ---------------------------------------------------------------

    def device_added(self, device: BlockDevice) -> None:
        """A device joined the swap space: fresh metadata (and key) for it."""
        seal: Seal | None = None
        if self.encrypt:
            seal = Encryption(device.nblocks, device.name)
        elif self.integrity:
            seal = Checksum(device.nblocks)
        with self._mu:
            if seal is not None:
                self._seals[id(device)] = seal
            self._readers[id(device)] = block_reader(device)

    def device_removed(self, device: BlockDevice) -> None:
        """A device left the swap space (none of its blocks in use): forget its metadata.

        Waits for writebacks still going to it (of blocks freed meanwhile), so the
        caller may close it on return.
        """
        with self._cv:
            while any(d is device for d in self._writeback.values()):
                self._cv.wait()
            self._seals.pop(id(device), None)
            self._readers.pop(id(device), None)
            stale = [b for b, (_, d, _) in self._pool.items() if d is device]
            for blk in stale:
                self._drop(blk)

    # -- the way out -------------------------------------------------------------

    def write(
        self, blk: int, device: BlockDevice, dblk: int, buffers: Sequence[ReadableBuffer]
    ) -> None:
        """Store the pages of a run at global ``blk`` (device block ``dblk``).

        Pages go to the pool or, sealed, to the device in one request per
        consecutive run. Blocks for the device write and for any writeback the
        store triggers. ``DeviceError`` from the device: then none of the
        run's pages is stored anywhere (as a failed plain write).
        """
        pages = _pages(buffers, self.page_size)
        if self._codec is None:
            self._write_through(blk, device, dblk, pages, buffers)
            return
        n = len(pages)
        codec = self._codec
        accept = self._accept
        compress = codec.compress
        kept: list[bytes | int | None] = []
        rejects = 0
        for page in pages:
            word = same_fill_word(page)
            if word is not None:
                kept.append(word)
                continue
            data = compress(page)
            if len(data) <= accept:
                kept.append(data)
            else:
                kept.append(None)
                rejects += 1
        to_device = [i for i, p in enumerate(kept) if p is None] if rejects else []
        victims: list[tuple[int, _Entry]] = []
        writing: list[tuple[int, int]] = []
        seal: Seal | None = None
        with self._mu:
            inflight = self._writeback
            if inflight:
                while any(blk + i in inflight for i in range(n)):
                    self._cv.wait()
            pool, bad = self._pool, self._bad
            for b in range(blk, blk + n):
                if b in pool:
                    self._drop(b)
                if bad:
                    bad.pop(b, None)  # rewritten: the block holds new data
            charged = data_bytes = same = 0
            for i, payload in enumerate(kept):
                if payload is None:
                    continue
                pool[blk + i] = (payload, device, dblk + i)
                if isinstance(payload, bytes):
                    charged += ENTRY_OVERHEAD + len(payload)
                    data_bytes += len(payload)
                else:
                    charged += ENTRY_OVERHEAD
                    same += 1
            self._pool_bytes += charged
            self._data_bytes += data_bytes
            self._same += same
            self._stores += n - rejects
            self._rejects += rejects
            if to_device:
                seal = self._seals.get(id(device))
                writing = [(blk + first, count) for first, count in _runs(to_device)]
                self._writing += writing
            if self._pool_bytes > self._capacity:
                victims = self._pick_victims()
        if to_device:
            try:
                self._device_write(device, dblk, pages, to_device, seal)
            except BaseException:
                with self._cv:
                    for i in range(n):
                        self._drop(blk + i)  # a failed write stores nothing
                    self._done_writing(writing)
                    for b, _ in victims:
                        self._writeback.pop(b, None)
                    self._cv.notify_all()
                raise
            with self._mu:
                self._done_writing(writing)
                self._dev_written += len(to_device)
        while victims:
            if not self._write_back(victims):
                break  # the device refuses: the pool stays over capacity until it heals
            with self._mu:
                victims = self._pick_victims() if self._pool_bytes > self._capacity else []

    def _write_through(
        self,
        blk: int,
        device: BlockDevice,
        dblk: int,
        pages: list[memoryview],
        buffers: Sequence[ReadableBuffer],
    ) -> None:
        """``write`` without a pool: every page sealed and written (the common case,
        kept short: two lock round trips a run, no pool entries to drop, no
        writeback to wait for). ``pages`` are ``buffers`` cut into pages; a seal
        that writes the pages themselves hands the device ``buffers`` (fewer,
        larger views when a pageout's frames are consecutive)."""
        n = len(pages)
        run = (blk, n)
        with self._mu:
            bad = self._bad
            if bad:
                for b in range(blk, blk + n):
                    bad.pop(b, None)  # rewritten: the block holds new data
            seal = self._seals.get(id(device))
            self._writing.append(run)
        done = False
        try:
            if seal is None:
                device.write_blocks(dblk, buffers)
            elif not seal.needs_scratch:
                seal.seal_run(dblk, pages, None)
                device.write_blocks(dblk, buffers)
            else:
                self._device_write(device, dblk, pages, None, seal)
            done = True
        finally:
            with self._mu:
                self._writing.remove(run)
                if done:
                    self._dev_written += n

    def _drop(self, blk: int) -> None:
        """Forget the pool entry of ``blk``, if any (tier lock held)."""
        entry = self._pool.pop(blk, None)
        if entry is None:
            return
        payload = entry[0]
        self._pool_bytes -= _charge(payload)
        if isinstance(payload, bytes):
            self._data_bytes -= len(payload)
        else:
            self._same -= 1

    def _done_writing(self, runs: list[tuple[int, int]]) -> None:
        """Writes of ``runs`` are over (tier lock held)."""
        for run in runs:
            self._writing.remove(run)

    def _in_flight(self, blk: int) -> bool:
        """True when a device write of ``blk`` is in flight (tier lock held)."""
        return any(first <= blk < first + count for first, count in self._writing)

    def _device_write(
        self,
        device: BlockDevice,
        dblk: int,
        pages: list[memoryview],
        indices: list[int] | None,
        seal: Seal | None,
    ) -> None:
        """Seal and write ``pages[i]`` for ``i`` in ``indices`` (all when None) to their
        blocks from ``dblk``, one request per run of consecutive indices."""
        size = self.page_size
        runs = [(0, len(pages))] if indices is None else _runs(indices)
        for first, count in runs:
            run = pages[first : first + count]
            if seal is None:
                device.write_blocks(dblk + first, run)
            elif not seal.needs_scratch:
                seal.seal_run(dblk + first, run, None)
                device.write_blocks(dblk + first, run)
            else:
                out = self._scratch.get("sealed", count * size)
                seal.seal_run(dblk + first, run, out)
                device.write_blocks(dblk + first, [out])

    def _pick_victims(self) -> list[tuple[int, _Entry]]:
        """The oldest entries, not already being written back, whose removal brings the
        pool to 7/8 of its capacity (at most a cluster); tier lock held."""
        victims: list[tuple[int, _Entry]] = []
        excess = self._pool_bytes - self._capacity * 7 // 8
        for blk, entry in self._pool.items():
            if excess <= 0 or len(victims) >= self._cluster:
                break
            if blk in self._writeback:
                continue
            victims.append((blk, entry))
            excess -= _charge(entry[0])
        self._writeback.update((blk, entry[1]) for blk, entry in victims)
        return victims

    def _write_back(self, victims: list[tuple[int, _Entry]]) -> int:
        """Write pool entries to their blocks, then drop them from the pool; returns
        how many were written (entries whose write failed stay in the pool)."""
        codec = self._codec
        assert codec is not None
        victims.sort(key=lambda item: (id(item[1][1]), item[1][2]))
        written: list[tuple[int, _Entry]] = []
        failed = runs = 0
        k = 0
        while k < len(victims):
            # A run: consecutive blocks of one device.
            end = k + 1
            device, first = victims[k][1][1], victims[k][1][2]
            while (
                end < len(victims)
                and victims[end][1][1] is device
                and victims[end][1][2] == first + (end - k)
            ):
                end += 1
            run = victims[k:end]
            k = end
            plain = self._scratch.get("plain", len(run) * self.page_size)
            size = self.page_size
            pages = [plain[k * size : (k + 1) * size] for k in range(len(run))]
            for page, (_, (payload, _, _)) in zip(pages, run, strict=True):
                if isinstance(payload, int):
                    fill_word(page, payload)
                else:
                    codec.decompress_into(payload, page)
            with self._mu:
                seal = self._seals.get(id(device))
            try:
                self._device_write(device, first, pages, None, seal)
            except (DeviceError, OSError, ValueError) as error:
                # The data stays in the pool (over capacity) rather than be lost.
                log.warning("swap tier: writeback of %d pages failed: %s", len(run), error)
                failed += 1
                with self._cv:
                    for blk, _ in run:
                        self._writeback.pop(blk, None)
                    self._cv.notify_all()
                continue
            written.extend(run)
            runs += 1
        with self._cv:
            for blk, entry in written:
                if self._pool.get(blk) is entry:
                    self._drop(blk)
                self._writeback.pop(blk, None)
            self._writebacks += len(written)
            self._writeback_runs += runs
            self._writeback_errors += failed
            self._dev_written += len(written)
            self._cv.notify_all()
        return len(written)

    # -- the way in ------------------------------------------------------------

    def read(
        self, blk: int, device: BlockDevice, dblk: int, buffers: Sequence[WritableBuffer]
    ) -> None:
        """Read the pages of a run at global ``blk`` (device block ``dblk``).

        Pages in the pool are decompressed; the others are read from the
        device (one request per consecutive run) and checked. ``CorruptPage``
        for the first page that fails its check (every such block becomes
        bad); ``DeviceError`` from the device. Blocks for the device reads.
        """
        pages = _pages(buffers, self.page_size)
        if not self._pool and not self._bad:
            # The common case, without the lock: nothing in the pool, no bad block.
            # (Neither can gain an entry for these blocks meanwhile: only a write
            # or a read of them could, and the caller owns them for this read.)
            self._read_through(blk, device, dblk, buffers, pages)
            return
        hits: list[tuple[int, bytes | int]] = []
        with self._mu:
            from_device, seal = self._plan(blk, device, len(pages), hits)
        if hits:
            self._fill_hits(pages, hits)
        if not from_device:
            return
        size = self.page_size
        corrupt: list[int] = []
        for first, count in _runs(from_device):
            targets = pages[first : first + count]
            if seal is not None and seal.needs_scratch:
                scratch = self._scratch.get("sealed", count * size)
                device.read_blocks(dblk + first, [scratch])
                data = [scratch[k * size : (k + 1) * size] for k in range(count)]
            else:
                device.read_blocks(dblk + first, targets)
                data = targets
            if seal is not None:
                corrupt += self._check_run(device, seal, dblk, first, data, targets)
        self._read_done(blk, device, dblk, pages, len(from_device), corrupt)

    def read_page(self, blk: int, device: BlockDevice, dblk: int, page: memoryview) -> None:
        """``read(blk, device, dblk, [page])`` for one page: the page-in of a fault.

        Same results and errors as ``read``: when nothing is in the pool and no
        block is bad, and the device's seal checks in place (the checksum), the
        page is read with the device's one-block read (``block_reader``) and
        checked; a page that fails its check takes ``read``'s way (read again,
        then the replicas, then ``CorruptPage``). Anything else (a pool, bad
        blocks, encryption, a buffer that is not one page) goes through
        ``read``.
        """
        if self._pool or self._bad or type(page) is not memoryview or page.nbytes != self.page_size:
            self.read(blk, device, dblk, [page])
            return
        key = id(device)
        seal = self._seals.get(key)
        reader = self._readers.get(key)
        if reader is None or (seal is not None and seal.needs_scratch):
            self.read(blk, device, dblk, [page])
            return
        reader(dblk, page)
        if seal is not None and not seal.unseal(dblk, page, page):
            corrupt = self._check_run(device, seal, dblk, 0, [page], [page])
            self._read_done(blk, device, dblk, [page], 1, corrupt)
            return
        with self._mu:
            self._dev_read += 1

    def _read_through(
        self,
        blk: int,
        device: BlockDevice,
        dblk: int,
        buffers: Sequence[WritableBuffer],
        pages: list[memoryview],
    ) -> None:
        """``read`` of a run wholly on the device: one request, then the run's check."""
        seal = self._seals.get(id(device))
        n = len(pages)
        if seal is None or not seal.needs_scratch:
            device.read_blocks(dblk, buffers)
            data = pages
        else:
            size = self.page_size
            scratch = self._scratch.get("sealed", n * size)
            device.read_blocks(dblk, [scratch])
            data = [scratch] if n == 1 else [scratch[k * size : (k + 1) * size] for k in range(n)]
        corrupt = [] if seal is None else self._check_run(device, seal, dblk, 0, data, pages)
        self._read_done(blk, device, dblk, pages, n, corrupt)

    def read_many(
        self,
        requests: Sequence[tuple[int, BlockDevice, int, Sequence[WritableBuffer]]],
        run: Callable[[Callable[[int], None], Sequence[int]], None],
    ) -> list[DeviceError | None]:
        """Independent reads of runs ``(blk, device, dblk, buffers)``, batched per device.

        Pool hits are decompressed first; the device parts of every request go
        to each device's own ``read_many`` in one call (one pipeline per Redis
        node, several preads at once on a file), and the pages are checked and
        decrypted after. A device without ``read_many`` gets one
        ``read_blocks`` per part through ``run``. Result ``i``: None, or the
        ``DeviceError`` (``CorruptPage`` for a page failing its check) of
        request ``i``. Blocks for the I/O.
        """
        if not self._pool and not self._bad:
            # The common case, as ``read``'s: every page comes from its device.
            through = self._read_many_through(requests, run)
            if through is not None:
                return through
        size = self.page_size
        n = len(requests)
        errors: list[DeviceError | None] = [None] * n
        plans: list[tuple[list[memoryview], list[int], Seal | None]] = [
            (_pages(buffers, size), [], None) for _, _, _, buffers in requests
        ]
        hits: list[list[tuple[int, bytes | int]]] = [[] for _ in range(n)]
        with self._mu:
            for i, (blk, device, _, _) in enumerate(requests):
                pages = plans[i][0]
                try:
                    from_device, seal = self._plan(blk, device, len(pages), hits[i])
                except CorruptPage as error:
                    errors[i] = error
                    continue
                plans[i] = (pages, from_device, seal)
        for i, found in enumerate(hits):
            if found and errors[i] is None:
                self._fill_hits(plans[i][0], found)
        # The device parts: (request, first page, count, read buffer) grouped by device.
        scratch_pages = sum(
            len(plan[1]) for plan in plans if plan[2] is not None and plan[2].needs_scratch
        )
        scratch = self._scratch.get("many", scratch_pages * size) if scratch_pages else None
        used = 0
        groups: dict[int, tuple[BlockDevice, list[tuple[int, int, int, list[memoryview]]]]] = {}
        for i, (pages, from_device, seal) in enumerate(plans):
            if not from_device or errors[i] is not None:
                continue
            device = requests[i][1]
            parts = groups.setdefault(id(device), (device, []))[1]
            for first, count in _runs(from_device):
                if seal is not None and seal.needs_scratch:
                    assert scratch is not None
                    area = scratch[used * size : (used + count) * size]
                    used += count
                    data = [area[k * size : (k + 1) * size] for k in range(count)]
                else:
                    data = pages[first : first + count]
                parts.append((i, first, count, data))
        for device, parts in groups.values():
            items = [(requests[i][2] + first, data) for i, first, _, data in parts]
            results = _read_many(device, items, run)
            for part, failed in zip(parts, results, strict=True):
                if failed is not None and errors[part[0]] is None:
                    errors[part[0]] = failed
        # Check and decrypt, then count and retire, request by request.
        for device, parts in groups.values():
            corrupt_of: dict[int, list[int]] = {}
            for i, first, count, data in parts:
                if errors[i] is not None:
                    continue
                seal = plans[i][2]
                targets = plans[i][0][first : first + count]
                if seal is None:
                    continue
                try:
                    bad = self._check_run(device, seal, requests[i][2], first, data, targets)
                except DeviceError as failed:  # a re-read failed, or the key is spent
                    errors[i] = failed
                    continue
                corrupt_of.setdefault(i, []).extend(bad)
            for i in {part[0] for part in parts}:
                if errors[i] is not None:
                    continue
                blk, _, dblk, _ = requests[i]
                try:
                    self._read_done(
                        blk, device, dblk, plans[i][0], len(plans[i][1]), corrupt_of.get(i, [])
                    )
                except CorruptPage as corrupt:
                    errors[i] = corrupt
        return errors

    def _read_many_through(
        self,
        requests: Sequence[tuple[int, BlockDevice, int, Sequence[WritableBuffer]]],
        run: Callable[[Callable[[int], None], Sequence[int]], None],
    ) -> list[DeviceError | None] | None:
        """``read_many`` with nothing in the pool and no block bad: the same device
        requests, checks, errors and counters, without planning pool hits and with
        one lock round trip for the count. None (nothing done) when a device's seal
        needs a buffer of its own (encryption) or a request has no pages: the
        general way then."""
        size = self.page_size
        seals = self._seals
        pages_of: list[list[memoryview]] = []
        groups: dict[int, tuple[BlockDevice, Seal | None, list[int]]] = {}
        for i, (_, device, _, buffers) in enumerate(requests):
            key = id(device)
            group = groups.get(key)
            if group is None:
                seal = seals.get(key)
                if seal is not None and seal.needs_scratch:
                    return None
                group = groups[key] = (device, seal, [])
            pages = _pages(buffers, size)
            if not pages:
                return None  # nothing to read: the general way skips it
            pages_of.append(pages)
            group[2].append(i)
        errors: list[DeviceError | None] = [None] * len(requests)
        for device, _, indices in groups.values():
            items = [(requests[i][2], pages_of[i]) for i in indices]
            results = _read_many(device, items, run)
            for i, failed in zip(indices, results, strict=True):
                errors[i] = failed
        read = 0
        for device, seal, indices in groups.values():
            for i in indices:
                if errors[i] is not None:
                    continue
                blk, _, dblk, _ = requests[i]
                pages = pages_of[i]
                corrupt: list[int] = []
                if seal is not None:
                    try:
                        corrupt = self._check_run(device, seal, dblk, 0, pages, pages)
                    except DeviceError as failed:  # a re-read failed
                        errors[i] = failed
                        continue
                if not corrupt:
                    read += len(pages)
                    continue
                try:
                    self._read_done(blk, device, dblk, pages, len(pages), corrupt)
                except CorruptPage as found:
                    errors[i] = found
        if read:
            with self._mu:
                self._dev_read += read
        return errors

    def _plan(
        self, blk: int, device: BlockDevice, n: int, hits: list[tuple[int, bytes | int]]
    ) -> tuple[list[int], Seal | None]:
        """Split a read of ``n`` pages at ``blk``: pool hits appended to ``hits`` as
        (index, payload); returns the indices left for the device and its seal.
        ``CorruptPage`` for a block known bad. Tier lock held."""
        pool = self._pool
        bad = self._bad
        if not pool and not bad:
            return list(range(n)), self._seals.get(id(device))
        from_device: list[int] = []
        for i in range(n):
            if bad:
                found = bad.get(blk + i)
                if found is not None:
                    raise CorruptPage(found[0], found[1], blk + i, "found corrupt before")
            entry = pool.get(blk + i)
            if entry is None:
                from_device.append(i)
            else:
                hits.append((i, entry[0]))
                # The page is about to be resident: its entry is the least useful
                # while it is, so it is the first to be written back.
                pool.move_to_end(blk + i, last=False)
        self._hits += n - len(from_device)
        return from_device, self._seals.get(id(device))

    def _fill_hits(self, pages: list[memoryview], hits: list[tuple[int, bytes | int]]) -> None:
        """Decompress (or refill) the pool hits ``_plan`` found into their pages."""
        codec = self._codec
        for i, payload in hits:
            if isinstance(payload, int):
                fill_word(pages[i], payload)
            else:
                assert codec is not None
                codec.decompress_into(payload, pages[i])

    def _check_run(
        self,
        device: BlockDevice,
        seal: Seal,
        dblk: int,
        first: int,
        data: list[memoryview],
        targets: list[memoryview],
    ) -> list[int]:
        """Unseal pages ``first ..`` of a read at device block ``dblk`` from ``data`` into
        ``targets``; the indices of those that fail even when read again and from
        every replica."""
        failed = seal.unseal_run(dblk + first, data, targets)
        if not failed:
            return []
        corrupt: list[int] = []
        for k in failed:
            how = self._recover(device, seal, dblk + first + k, data[k], targets[k])
            if how is None:
                corrupt.append(first + k)
            else:
                with self._mu:
                    self._count_recovered(how)
        return corrupt

    def _recover(
        self, device: BlockDevice, seal: Seal, block: int, got: memoryview, out: memoryview
    ) -> str | None:
        """A page failed its check: read it once more (damage on the way is not rot at
        rest), then from each of the device's replicas (``read_replica``). Returns
        ``"reread"`` or ``"replica"`` when a copy passed (its page is in ``out``),
        None when none did. Takes no lock (``verify`` calls it with the tier lock held)."""
        device.read_blocks(block, [got])
        if seal.unseal(block, got, out):
            return "reread"
        read_replica = getattr(device, "read_replica", None)
        if read_replica is None:
            return None
        replica = 0
        while True:
            try:
                if not read_replica(block, [got], replica):
                    return None
            except DeviceError as error:
                log.warning("swap tier: replica %d of %s: %s", replica, device.name, error)
            else:
                if seal.unseal(block, got, out):
                    log.warning(
                        "swap tier: block %d of %s failed its check; replica %d's copy passed",
                        block,
                        device.name,
                        replica,
                    )
                    return "replica"
            replica += 1

    def _count_recovered(self, how: str) -> None:
        """Count a page ``_recover`` saved (tier lock held)."""
        if how == "reread":
            self._reread_ok += 1
        else:
            self._replica_ok += 1

    def _read_done(
        self,
        blk: int,
        device: BlockDevice,
        dblk: int,
        pages: list[memoryview],
        from_device: int,
        corrupt: list[int],
    ) -> None:
        """Count a read's device pages; retire and zero its corrupt pages and raise
        ``CorruptPage`` for the first."""
        with self._mu:
            self._dev_read += from_device
            for i in corrupt:
                self._bad[blk + i] = (device.name, dblk + i)
            self._corrupt += len(corrupt)
        if corrupt:
            i = corrupt[0]
            for k in corrupt:
                pages[k][:] = bytes(self.page_size)  # nothing of a corrupt page is handed on
            log.error("swap tier: %d corrupt pages read from %s", len(corrupt), device.name)
            raise CorruptPage(
                device.name,
                dblk + i,
                blk + i,
                "authentication tag mismatch" if self.encrypt else "checksum mismatch",
            )

    def verify(self, blk: int, device: BlockDevice, dblk: int) -> CorruptPage | None:
        """Scrub one block: read it (or decompress its pool entry) and check it.

        Holds the tier lock across the read so no write of the block starts
        meanwhile; a block with a write in flight is skipped (its new data is
        checked by the next scrub). A mismatch makes the block bad and is
        returned. ``DeviceError`` from the device.
        """
        page = memoryview(bytearray(self.page_size))
        with self._mu:
            bad = self._bad.get(blk)
            if bad is not None:
                return CorruptPage(bad[0], bad[1], blk, "found corrupt before")
            entry = self._pool.get(blk)
            if entry is not None:
                payload = entry[0]
                if isinstance(payload, bytes):
                    assert self._codec is not None
                    self._codec.decompress_into(payload, page)
                return None
            if self._in_flight(blk):
                return None
            seal = self._seals.get(id(device))
            if seal is None:
                return None
            scratch = self._scratch.get("sealed", self.page_size) if seal.needs_scratch else page
            device.read_blocks(dblk, [scratch])
            self._dev_read += 1
            if seal.unseal(dblk, scratch, page):
                return None
            how = self._recover(device, seal, dblk, scratch, page)  # as a read does
            if how is not None:
                self._count_recovered(how)
                return None
            self._bad[blk] = (device.name, dblk)
            self._corrupt += 1
        return CorruptPage(
            device.name,
            dblk,
            blk,
            "authentication tag mismatch" if self.encrypt else "checksum mismatch",
        )

    # -- block life --------------------------------------------------------------

    def freed(self, blk: int, count: int) -> list[int]:
        """Blocks ``[blk, blk + count)`` were freed: drop their pool entries.

        Returns the blocks among them found corrupt, which the swap space
        marks bad instead of freeing. Called with the VM lock held; O(count).
        """
        retired: list[int] = []
        with self._mu:
            pool, bad = self._pool, self._bad
            for b in range(blk, blk + count):
                if b in pool:
                    self._drop(b)
                if bad and b in bad:
                    del bad[b]
                    retired.append(b)
        return retired

    def freed_blocks(self, blocks: Sequence[int]) -> list[int]:
        """``freed(b, 1)`` for every block of ``blocks``, under one lock: the blocks
        among them found corrupt, in the order given. VM lock held; O(len(blocks))."""
        retired: list[int] = []
        with self._mu:
            pool, bad = self._pool, self._bad
            if not pool and not bad:
                return retired
            for b in blocks:
                if b in pool:
                    self._drop(b)
                if bad and b in bad:
                    del bad[b]
                    retired.append(b)
        return retired

    def pool_blocks(self) -> list[int]:
        """Global blocks held in the pool (for tests and tools)."""
        with self._mu:
            return list(self._pool)

    def wait_writeback(self) -> None:
        """Wait until no writeback is in flight."""
        with self._cv:
            while self._writeback:
                self._cv.wait()

    # -- statistics and invariants ---------------------------------------------------

    def statistics(self) -> TierStatistics:
        """Counters and pool state. O(devices)."""
        with self._mu:
            stored = len(self._pool)
            meta = sum(seal.nbytes() for seal in self._seals.values())
            per_block = next((s.bytes_per_block for s in self._seals.values()), 0)
            data = self._data_bytes
            return TierStatistics(
                compress=self.compress,
                encrypt=self.encrypt,
                integrity=self.integrity,
                pool_capacity=self._capacity,
                pool_bytes=self._pool_bytes,
                stored_pages=stored,
                same_filled_pages=self._same,
                compressed_bytes=data,
                ratio=(stored * self.page_size / max(data + 8 * self._same, 1)) if stored else 0.0,
                stores=self._stores,
                rejects=self._rejects,
                writebacks=self._writebacks,
                writeback_runs=self._writeback_runs,
                writeback_errors=self._writeback_errors,
                hits=self._hits,
                device_pages_written=self._dev_written,
                device_pages_read=self._dev_read,
                corrupt_pages=self._corrupt,
                reread_ok=self._reread_ok,
                replica_ok=self._replica_ok,
                bad_pending=len(self._bad),
                meta_bytes=meta,
                meta_bytes_per_block=per_block,
            )

    def check(self, devices: Iterable[BlockDevice] = ()) -> None:
        """Assert the pool's accounting and that entries and metadata belong to
        ``devices`` (the swap space's); ``InvariantViolation`` listing each problem."""
        problems: list[str] = []
        known = {id(d) for d in devices}
        with self._mu:
            charged = sum(_charge(p) for p, _, _ in self._pool.values())
            data = sum(len(p) for p, _, _ in self._pool.values() if isinstance(p, bytes))
            same = sum(1 for p, _, _ in self._pool.values() if isinstance(p, int))
            if charged != self._pool_bytes:
                problems.append(f"pool bytes {self._pool_bytes}, entries charge {charged}")
            if (data, same) != (self._data_bytes, self._same):
                problems.append(
                    f"pool data {self._data_bytes} bytes / {self._same} same-filled, entries "
                    f"say {data} / {same}"
                )
            if self._codec is None and self._pool:
                problems.append("entries in the pool without compression")
            if known:
                for blk, (_, device, _) in self._pool.items():
                    if id(device) not in known:
                        problems.append(f"pool block {blk} is on {device.name}, not a swap device")
                        break
                for key in self._seals:
                    if key not in known:
                        problems.append("metadata kept for a device no longer in the space")
                        break
        if problems:
            raise InvariantViolation(problems)

    def name_owner(
        self, owner: Callable[[int], tuple[int, int] | None], err: CorruptPage
    ) -> CorruptPage:
        """``err`` naming the page ``owner(swap_block)`` says holds the block."""
        found = owner(err.swap_block)
        return err if found is None else err.naming(*found)

    def __repr__(self) -> str:
        return (
            f"SwapTier(compress={self.compress!r}, pool={self._pool_bytes}/{self._capacity}, "
            f"encrypt={self.encrypt}, integrity={self.integrity})"
        )
