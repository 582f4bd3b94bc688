"""A device's one-block read (``block_reader``) against ``read_blocks``: the same data,
counters and errors, for every device and every kind of buffer or request."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.devices.protocol import block_reader
from vmpager.errors import DeviceError

PAGE = 4096
NBLOCKS = 16


def _make(kind: str, tmp_path: Path) -> Any:
    if kind == "memory":
        return MemoryDevice(NBLOCKS, PAGE, name="ram")
    if kind == "faulty":
        return FaultyDevice(MemoryDevice(NBLOCKS, PAGE, name="ram"), seed=3)
    return FileDevice(tmp_path / f"{kind}.swap", NBLOCKS, direct=kind == "file-direct")


@pytest.fixture(params=["memory", "faulty", "file-direct", "file-cached"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """Two devices of one kind holding the same blocks: one read with ``block_reader``,
    the other with ``read_blocks``."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _make(request.param, tmp_path / "a")
    b = _make(request.param, tmp_path / "b")
    data = os.urandom(NBLOCKS * PAGE)
    for device in (a, b):
        device.write_blocks(0, [bytearray(data)])
    yield a, b
    a.close()
    b.close()


def _arena(nblocks: int = 2) -> memoryview:
    """Page-aligned buffers, as frames are."""
    return memoryview(mmap.mmap(-1, nblocks * PAGE))


def _outcome(device: Any, call: Any) -> tuple[str, str] | None:
    """The error ``call`` raises, type and message (the device's name left out)."""
    try:
        call()
    except (DeviceError, ValueError, TypeError) as error:
        return type(error).__name__, str(error).replace(device.name, "DEVICE")
    return None


def _counts(device: Any) -> tuple[int, ...]:
    s = device.statistics()
    return (s.read_ops, s.blocks_read, s.read_errors)


def test_the_file_and_memory_devices_have_a_one_block_read(tmp_path: Path) -> None:
    device = MemoryDevice(4, PAGE)
    assert block_reader(device) == device.read_block
    with FileDevice(tmp_path / "f.swap", 4) as file_device:
        assert block_reader(file_device) == file_device.read_block


@pytest.mark.parametrize("blk", [0, 5, NBLOCKS - 1])
def test_one_block_reads_the_same_data_and_counts_the_same(pair: tuple[Any, Any], blk: int) -> None:
    a, b = pair
    got, want = _arena(1), _arena(1)
    block_reader(a)(blk, got)
    b.read_blocks(blk, [want])
    assert bytes(got) == bytes(want)
    assert _counts(a) == _counts(b)


def test_buffers_that_are_not_frames_read_the_same(pair: tuple[Any, Any]) -> None:
    a, b = pair
    # Unaligned (a direct device bounces it), a bytearray, a view of another format.
    arena = _arena(3)
    cases = [
        (lambda: arena[100 : 100 + PAGE], lambda: _arena(3)[100 : 100 + PAGE]),
        (lambda: bytearray(PAGE), lambda: bytearray(PAGE)),
        (lambda: _arena(1).cast("Q"), lambda: _arena(1).cast("Q")),
    ]
    for blk, (make_a, make_b) in enumerate(cases):
        got, want = make_a(), make_b()
        block_reader(a)(blk, got)
        b.read_blocks(blk, [want])
        assert bytes(got) == bytes(want)
    assert _counts(a) == _counts(b)


@pytest.mark.parametrize(
    "blk, buffer",
    [
        (NBLOCKS, lambda: _arena(1)),  # past the end
        (-1, lambda: _arena(1)),
        (True, lambda: _arena(1)),  # not an int
        (0, lambda: _arena(2)),  # two blocks: fine for read_blocks, not past the end
        (NBLOCKS - 1, lambda: _arena(2)),  # two blocks running past the end
        (0, lambda: _arena(1)[:100]),  # not a whole block
        (0, lambda: memoryview(bytes(PAGE))),  # read-only
        (0, lambda: _arena(2)[::2]),  # not contiguous
    ],
)
def test_bad_requests_fail_alike(pair: tuple[Any, Any], blk: Any, buffer: Any) -> None:
    a, b = pair
    got = _outcome(a, lambda: block_reader(a)(blk, buffer()))
    want = _outcome(b, lambda: b.read_blocks(blk, [buffer()]))
    assert got == want
    assert _counts(a) == _counts(b)


def test_a_closed_device_fails_alike(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.close()
    b.close()
    got = _outcome(a, lambda: block_reader(a)(0, _arena(1)))
    assert got is not None
    assert got == _outcome(b, lambda: b.read_blocks(0, [_arena(1)]))


def test_injected_read_errors_reach_the_one_block_read() -> None:
    device = FaultyDevice(MemoryDevice(NBLOCKS, PAGE, name="ram"))
    device.fail_reads([3], errno.EIO)
    with pytest.raises(DeviceError) as info:
        block_reader(device)(3, _arena(1))
    assert (info.value.errno, info.value.block) == (errno.EIO, 3)
    assert device.statistics().read_errors == 1


def test_an_os_error_of_the_file_read_is_a_device_error_naming_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FileDevice(tmp_path / "f.swap", NBLOCKS) as device:

        def failing(*args: Any) -> int:
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(DeviceError) as info:
            device.read_block(7, _arena(1))
        assert (info.value.errno, info.value.device, info.value.block) == (
            errno.EIO,
            device.name,
            7,
        )
        assert device.statistics().read_errors == 1
        with pytest.raises(DeviceError) as again:
            device.read_blocks(7, [_arena(1)])
        assert str(again.value) == str(info.value)
        assert device.statistics().read_errors == 2


def test_a_short_file_read_is_read_again_the_careful_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FileDevice(tmp_path / "f.swap", NBLOCKS) as device:
        device.write_blocks(2, [bytearray(b"\x5a" * PAGE)])
        real = os.preadv
        calls: list[int] = []

        def short_once(fd: int, buffers: Any, offset: int) -> int:
            calls.append(offset)
            if len(calls) == 1:
                return 0
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", short_once)
        got = _arena(1)
        device.read_block(2, got)
        assert bytes(got) == b"\x5a" * PAGE
        assert len(calls) == 2
        s = device.statistics()
        assert (s.read_ops, s.blocks_read, s.read_errors) == (1, 1, 0)
