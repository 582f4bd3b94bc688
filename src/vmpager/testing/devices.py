"""The conformance suite every ``BlockDevice`` passes.

``check_block_device(make_device)`` runs every check; ``CONFORMANCE_CHECKS``
lists them one by one for ``pytest.mark.parametrize``::

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check):
        check(lambda nblocks: MemoryDevice(nblocks))

``make_device(nblocks)`` must return a fresh, open device of exactly
``nblocks`` blocks; each check closes the devices it made. Failures raise
``AssertionError`` with a message naming the device and what went wrong.
"""

from __future__ import annotations

import mmap
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from vmpager.devices.protocol import BlockDevice, DeviceStatistics

__all__ = ["CONFORMANCE_CHECKS", "DeviceFactory", "check_block_device"]

DeviceFactory = Callable[[int], BlockDevice]

#: Blocks in the devices most checks make: small, so the suite stays fast.
NBLOCKS = 24


@contextmanager
def _device(make_device: DeviceFactory, nblocks: int = NBLOCKS) -> Iterator[BlockDevice]:
    device = make_device(nblocks)
    try:
        yield device
    finally:
        device.close()


def _pattern(device: BlockDevice, blk: int, tag: int = 0) -> bytes:
    """Reproducible, block-specific content (different for every (blk, tag))."""
    return random.Random(blk * 1_000_003 + tag).randbytes(device.block_size)


def _read(device: BlockDevice, blk: int, nblocks: int) -> bytes:
    buffer = bytearray(nblocks * device.block_size)
    device.read_blocks(blk, [buffer])
    return bytes(buffer)


def _expect_error(kind: type[Exception], what: str, call: Callable[[], Any]) -> None:
    try:
        call()
    except kind:
        return
    except Exception as error:
        raise AssertionError(f"{what}: expected {kind.__name__}, got {error!r}") from error
    raise AssertionError(f"{what}: expected {kind.__name__}, nothing was raised")


def check_geometry(make_device: DeviceFactory) -> None:
    """Name, block size and size are as asked; the device is a ``BlockDevice``."""
    with _device(make_device) as device:
        assert isinstance(device, BlockDevice), f"{device!r} does not implement BlockDevice"
        assert device.nblocks == NBLOCKS, f"{device.name}: nblocks {device.nblocks} != {NBLOCKS}"
        size = device.block_size
        assert size >= 512 and size & (size - 1) == 0, f"{device.name}: block_size {size}"
        assert isinstance(device.name, str) and device.name, f"bad device name {device.name!r}"
        stats = device.statistics()
        assert isinstance(stats, DeviceStatistics), f"{device.name}: statistics() type"
        assert (stats.name, stats.block_size, stats.nblocks) == (device.name, size, NBLOCKS)
        counters = (
            stats.read_ops,
            stats.write_ops,
            stats.blocks_read,
            stats.blocks_written,
            stats.discard_ops,
            stats.flush_ops,
            stats.read_errors,
            stats.write_errors,
        )
        assert counters == (0,) * 8, f"{device.name}: a fresh device has counters {counters}"


def check_single_block_round_trip(make_device: DeviceFactory) -> None:
    """One block written at the start, middle and end reads back, also into an mmap."""
    with _device(make_device) as device:
        for blk in (0, 1, NBLOCKS // 2, NBLOCKS - 1):
            device.write_blocks(blk, [_pattern(device, blk)])
        for blk in (0, 1, NBLOCKS // 2, NBLOCKS - 1):
            assert _read(device, blk, 1) == _pattern(device, blk), f"{device.name}: block {blk}"
            arena = mmap.mmap(-1, device.block_size)
            view = memoryview(arena)
            try:
                device.read_blocks(blk, [view])
                assert view.tobytes() == _pattern(device, blk), f"{device.name}: mmap {blk}"
            finally:
                view.release()
                arena.close()


def check_vectored_round_trip(make_device: DeviceFactory) -> None:
    """Runs of several buffers of mixed types read back through a different split."""
    with _device(make_device) as device:
        size = device.block_size
        arena = mmap.mmap(-1, 8 * size)
        view = memoryview(arena)
        try:
            for blk, shape in (
                (0, (1, 2, 1)),
                (5, (3,)),
                (9, (1, 1, 1, 1, 1)),
                (NBLOCKS - 6, (2, 4)),
            ):
                total = sum(shape)
                data = b"".join(_pattern(device, b, tag=7) for b in range(blk, blk + total))
                buffers: list[bytes | bytearray | memoryview] = []
                offset = 0
                for index, count in enumerate(shape):
                    piece = data[offset : offset + count * size]
                    kind = index % 3
                    if kind == 0:
                        buffers.append(piece)
                    elif kind == 1:
                        buffers.append(bytearray(piece))
                    else:
                        view[: len(piece)] = piece
                        buffers.append(view[: len(piece)])
                    offset += count * size
                device.write_blocks(blk, buffers)
                assert _read(device, blk, total) == data, f"{device.name}: run at {blk} {shape}"
                singles = [bytearray(size) for _ in range(total)]
                device.read_blocks(blk, singles)
                assert b"".join(singles) == data, f"{device.name}: per-block read at {blk}"
                view[: total * size] = bytes(total * size)
                device.read_blocks(blk, [view[: total * size]])
                assert view[: total * size].tobytes() == data, f"{device.name}: mmap read {blk}"
            whole = b"".join(_pattern(device, b, tag=9) for b in range(NBLOCKS))
            device.write_blocks(0, [whole])
            assert _read(device, 0, NBLOCKS) == whole, f"{device.name}: whole-device run"
        finally:
            view.release()
            arena.close()


def check_buffer_types(make_device: DeviceFactory) -> None:
    """Views of numpy arrays of any dtype and shape work when they are contiguous."""
    with _device(make_device) as device:
        size = device.block_size
        words = np.arange(2 * size // 8, dtype=np.uint64).reshape(2, -1)
        device.write_blocks(3, [words.data])
        into = np.zeros(2 * size, dtype=np.uint8)
        device.read_blocks(3, [into.data])
        assert into.tobytes() == words.tobytes(), f"{device.name}: numpy round trip"
        strided = np.zeros(2 * size, dtype=np.uint8)[::2]
        _expect_error(
            ValueError,
            f"{device.name}: non-contiguous buffer",
            lambda: device.read_blocks(0, [strided.data]),
        )


def check_unaligned_buffers(make_device: DeviceFactory) -> None:
    """Buffers at odd memory addresses round trip like aligned ones."""
    with _device(make_device) as device:
        size = device.block_size
        for shift in (1, 512, 8):
            source = bytearray(3 * size + shift)
            data = b"".join(_pattern(device, b, tag=shift) for b in range(4, 7))
            source[shift:] = data
            aligned = bytearray(_pattern(device, 7, tag=shift))
            device.write_blocks(4, [memoryview(source)[shift:], aligned])
            target = bytearray(4 * size + shift)
            device.read_blocks(
                4,
                [
                    memoryview(target)[shift : shift + 3 * size],
                    memoryview(target)[shift + 3 * size :],
                ],
            )
            assert bytes(target[shift:]) == data + bytes(aligned), (
                f"{device.name}: unaligned round trip (shift {shift})"
            )
            assert bytes(target[:shift]) == bytes(shift), f"{device.name}: wrote before buffer"


def check_many_buffers(make_device: DeviceFactory) -> None:
    """A request of more single-block buffers than one system call takes (IOV_MAX 1024)."""
    nblocks = 1030
    with _device(make_device, nblocks) as device:
        size = device.block_size
        data = [random.Random(b).randbytes(size) for b in range(nblocks)]
        device.write_blocks(0, data)
        back = [bytearray(size) for _ in range(nblocks)]
        device.read_blocks(0, back)
        bad = [b for b in range(nblocks) if back[b] != data[b]]
        assert not bad, f"{device.name}: {len(bad)} blocks differ, first {bad[:5]}"


def check_overwrite_keeps_neighbours(make_device: DeviceFactory) -> None:
    """Rewriting blocks changes exactly those blocks; the latest write wins."""
    with _device(make_device) as device:
        for blk in range(NBLOCKS):
            device.write_blocks(blk, [_pattern(device, blk)])
        device.write_blocks(10, [_pattern(device, 10, tag=1) + _pattern(device, 11, tag=1)])
        device.write_blocks(11, [_pattern(device, 11, tag=2)])
        for blk in range(NBLOCKS):
            tag = {10: 1, 11: 2}.get(blk, 0)
            assert _read(device, blk, 1) == _pattern(device, blk, tag), (
                f"{device.name}: block {blk} after overwrites"
            )


def check_unwritten_blocks_readable(make_device: DeviceFactory) -> None:
    """Blocks never written read without error (any content) and fill the buffers."""
    with _device(make_device) as device:
        buffer = bytearray(b"\xa5") * (NBLOCKS * device.block_size)
        device.read_blocks(0, [buffer])
        assert len(buffer) == NBLOCKS * device.block_size
        device.read_blocks(NBLOCKS - 1, [bytearray(device.block_size)])


def check_bad_requests(make_device: DeviceFactory) -> None:
    """Bad requests raise ValueError/TypeError, change nothing and count nothing."""
    with _device(make_device) as device:
        size, last = device.block_size, NBLOCKS - 1
        device.write_blocks(last, [_pattern(device, last)])
        before = device.statistics()
        one = bytearray(size)
        cases: list[tuple[type[Exception], str, Callable[[], Any]]] = [
            (ValueError, "read past the end", lambda: device.read_blocks(NBLOCKS, [one])),
            (
                ValueError,
                "write past the end",
                lambda: device.write_blocks(last, [bytes(2 * size)]),
            ),
            (
                ValueError,
                "read crossing the end",
                lambda: device.read_blocks(last, [one, bytearray(size)]),
            ),
            (ValueError, "negative block", lambda: device.read_blocks(-1, [one])),
            (ValueError, "negative block write", lambda: device.write_blocks(-1, [bytes(size)])),
            (ValueError, "short buffer", lambda: device.write_blocks(0, [bytes(size - 1)])),
            (
                ValueError,
                "long buffer",
                lambda: device.read_blocks(0, [bytearray(size + size // 2)]),
            ),
            (ValueError, "empty buffer", lambda: device.write_blocks(0, [b""])),
            (ValueError, "no buffers", lambda: device.read_blocks(0, [])),
            (TypeError, "float block", lambda: device.read_blocks(1.0, [one])),  # type: ignore[arg-type]
            (TypeError, "str block", lambda: device.write_blocks("0", [bytes(size)])),  # type: ignore[arg-type]
            (TypeError, "read into bytes", lambda: device.read_blocks(0, [bytes(size)])),  # type: ignore[list-item]
            (TypeError, "bare buffer", lambda: device.write_blocks(0, bytes(size))),  # type: ignore[arg-type]
            (ValueError, "discard past the end", lambda: device.discard(last, 2)),
            (ValueError, "discard negative block", lambda: device.discard(-1, 1)),
            (ValueError, "discard no blocks", lambda: device.discard(0, 0)),
        ]
        for kind, what, call in cases:
            _expect_error(kind, f"{device.name}: {what}", call)
        assert _read(device, last, 1) == _pattern(device, last), (
            f"{device.name}: a rejected write changed the last block"
        )
        after = device.statistics()
        assert (after.read_ops, after.write_ops, after.discard_ops) == (
            before.read_ops + 1,
            before.write_ops,
            before.discard_ops,
        ), f"{device.name}: rejected requests were counted: {before} -> {after}"
        assert (after.read_errors, after.write_errors) == (before.read_errors, before.write_errors)


def check_discard(make_device: DeviceFactory) -> None:
    """Discard leaves blocks outside the range alone; the range reads and writes again."""
    with _device(make_device) as device:
        for blk in range(NBLOCKS):
            device.write_blocks(blk, [_pattern(device, blk)])
        device.discard(3, 5)
        device.discard(NBLOCKS - 1, 1)
        _read(device, 3, 5)
        for blk in (*range(3), *range(8, NBLOCKS - 1)):
            assert _read(device, blk, 1) == _pattern(device, blk), (
                f"{device.name}: block {blk} changed by a discard of another range"
            )
        device.write_blocks(4, [_pattern(device, 4, tag=3)])
        assert _read(device, 4, 1) == _pattern(device, 4, tag=3), f"{device.name}: after discard"
        device.discard(0, NBLOCKS)


def check_flush(make_device: DeviceFactory) -> None:
    """Flush succeeds, with and without writes since the last one, and keeps the data."""
    with _device(make_device) as device:
        device.flush()
        device.write_blocks(2, [_pattern(device, 2)])
        device.flush()
        assert _read(device, 2, 1) == _pattern(device, 2), f"{device.name}: data after flush"


def check_close(make_device: DeviceFactory) -> None:
    """After close every request raises ValueError; close is idempotent; stats still work."""
    device = make_device(NBLOCKS)
    device.write_blocks(0, [_pattern(device, 0)])
    device.close()
    device.close()
    size = device.block_size
    for what, call in (
        ("read", lambda: device.read_blocks(0, [bytearray(size)])),
        ("write", lambda: device.write_blocks(0, [bytes(size)])),
        ("discard", lambda: device.discard(0, 1)),
        ("flush", device.flush),
    ):
        _expect_error(ValueError, f"{device.name}: {what} after close", call)
    assert device.statistics().write_ops == 1, f"{device.name}: statistics after close"


def check_statistics(make_device: DeviceFactory) -> None:
    """Each request moves its counters by exactly its size."""
    with _device(make_device) as device:
        size = device.block_size
        before = device.statistics()
        device.write_blocks(0, [bytes(size), bytes(size)])
        device.write_blocks(5, [bytes(size)])
        device.read_blocks(0, [bytearray(2 * size)])
        device.discard(0, 1)
        device.flush()
        after = device.statistics()
        deltas = {
            field: getattr(after, field) - getattr(before, field)
            for field in (
                "read_ops",
                "write_ops",
                "blocks_read",
                "blocks_written",
                "discard_ops",
                "flush_ops",
                "read_errors",
                "write_errors",
            )
        }
        expected = {
            "read_ops": 1,
            "write_ops": 2,
            "blocks_read": 2,
            "blocks_written": 3,
            "discard_ops": 1,
            "flush_ops": 1,
            "read_errors": 0,
            "write_errors": 0,
        }
        assert deltas == expected, f"{device.name}: counter deltas {deltas} != {expected}"


def check_concurrent_disjoint_ranges(make_device: DeviceFactory) -> None:
    """Threads using disjoint ranges at once see only their own data."""
    nthreads, per_thread, rounds = 4, 4, 10
    with _device(make_device, nthreads * per_thread) as device:
        size = device.block_size
        failures: list[str] = []

        def worker(index: int) -> None:
            first = index * per_thread
            try:
                for round_ in range(rounds):
                    data = [_pattern(device, first + b, tag=round_) for b in range(per_thread)]
                    device.write_blocks(first, data)
                    back = [bytearray(size) for _ in range(per_thread)]
                    device.read_blocks(first, back)
                    if [bytes(b) for b in back] != data:
                        failures.append(f"thread {index} round {round_}: wrong data")
            except Exception as error:
                failures.append(f"thread {index}: {error!r}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, f"{device.name}: {failures}"
        assert device.statistics().write_ops == nthreads * rounds, f"{device.name}: lost counts"


CONFORMANCE_CHECKS: tuple[Callable[[DeviceFactory], None], ...] = (
    check_geometry,
    check_single_block_round_trip,
    check_vectored_round_trip,
    check_buffer_types,
    check_unaligned_buffers,
    check_many_buffers,
    check_overwrite_keeps_neighbours,
    check_unwritten_blocks_readable,
    check_bad_requests,
    check_discard,
    check_flush,
    check_close,
    check_statistics,
    check_concurrent_disjoint_ranges,
)


def check_block_device(make_device: DeviceFactory) -> None:
    """Run every conformance check against devices made by ``make_device(nblocks)``."""
    for check in CONFORMANCE_CHECKS:
        check(make_device)
