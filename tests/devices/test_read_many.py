"""Reads several at once: ``FileDevice.read_many`` and ``SwapSpace.read_many``.

Every request reads what ``read_blocks`` would; bad requests are refused
before any I/O; unaligned buffers and short reads take the careful path; a
failed read is reported for its request alone; devices without a
``read_many`` of their own get one ``read_blocks`` per request.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.io.fanout import Fanout
from vmpager.swap.space import SwapSpace

BS = 4096


def block(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (BS // 4)


@pytest.fixture
def fanout() -> Callable[[Callable[[int], None], Sequence[int]], None]:
    f = Fanout(4)
    yield f.run  # type: ignore[misc]
    f.close()


def aligned(nblocks: int) -> list[memoryview]:
    arena = memoryview(mmap.mmap(-1, nblocks * BS))
    return [arena[i * BS : (i + 1) * BS] for i in range(nblocks)]


def test_file_device_reads_what_read_blocks_reads(tmp_path: Path, fanout: object) -> None:
    with FileDevice(tmp_path / "swap", 64) as dev:
        for blk in range(64):
            dev.write_blocks(blk, [block(blk)])
        bufs = aligned(12)
        # Single blocks, a run of three, and unaligned bytearrays (careful path).
        unaligned = [bytearray(BS + 1)[1:], bytearray(BS + 1)[1:]]
        requests = [(5, [bufs[0]]), (60, [bufs[1]]), (10, bufs[2:5]), (33, unaligned)]
        before = dev.statistics()
        errors = dev.read_many(requests, fanout)  # type: ignore[arg-type]
        assert errors == [None] * 4
        assert bytes(bufs[0]) == block(5) and bytes(bufs[1]) == block(60)
        assert [bytes(b) for b in bufs[2:5]] == [block(10), block(11), block(12)]
        assert [bytes(b) for b in unaligned] == [block(33), block(34)]
        after = dev.statistics()
        assert after.read_ops - before.read_ops == 4
        assert after.blocks_read - before.blocks_read == 7


def test_bad_request_is_refused_before_any_io(tmp_path: Path, fanout: object) -> None:
    with FileDevice(tmp_path / "swap", 8) as dev:
        bufs = aligned(2)
        before = dev.statistics()
        with pytest.raises(ValueError, match="run past the end"):
            dev.read_many([(0, [bufs[0]]), (7, bufs)], fanout)  # type: ignore[arg-type]
        assert dev.statistics().read_ops == before.read_ops


def test_swap_space_reports_each_failure_alone(tmp_path: Path, fanout: object) -> None:
    space = SwapSpace(layout="per_device")
    ram = FaultyDevice(MemoryDevice(32, BS))
    disk = FileDevice(tmp_path / "swap", 32)
    space.swapon(ram)
    space.swapon(disk)
    try:
        got = [space.alloc(32), space.alloc(32)]
        assert got[0] is not None and got[1] is not None
        first, second = got[0][0], got[1][0]
        for blk in list(range(first, first + 32)) + list(range(second, second + 32)):
            space.write(blk, [block(blk)])
        ram_blk = first if space.locate(first)[0] is ram else second
        file_blk = second if ram_blk == first else first
        ram.fail_reads([space.locate(ram_blk + 3)[1]], errno.EIO)
        bufs = aligned(4)
        requests = [(ram_blk + 3, [bufs[0]]), (ram_blk + 4, [bufs[1]]), (file_blk + 7, bufs[2:4])]
        errors = space.read_many(requests, fanout)  # type: ignore[arg-type]
        assert errors[0] is not None and errors[0].errno == errno.EIO
        assert errors[1:] == [None, None]
        assert bytes(bufs[1]) == block(ram_blk + 4)
        assert [bytes(b) for b in bufs[2:4]] == [block(file_blk + 7), block(file_blk + 8)]
        with pytest.raises(ValueError, match="crosses a stripe or device boundary"):
            space.read_many([(ram_blk + 31, aligned(2))], fanout)  # type: ignore[arg-type]
    finally:
        ram.close()
        disk.close()
