"""FileDevice: creation, sizing, O_DIRECT and its fallback, errors, and the page cache."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import vmpager.devices.file as file_module
from vmpager.devices.file import FileDevice
from vmpager.errors import DeviceError
from vmpager.testing.pagecache import cached_pages

BLOCK = 4096


# --- page-cache residency -------------------------------------------------


def _mincore_pages(path: Path) -> int | None:
    return cached_pages(path)


def _fincore_pages(path: Path) -> int | None:
    if shutil.which("fincore") is None:
        return None
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return int(result.stdout.split()[0]) // mmap.PAGESIZE


@pytest.fixture(params=["mincore", "fincore"])
def resident_pages(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Path], int]:
    """A page-cache probe, proven to see pages that a plain buffered write leaves behind."""
    probe: Callable[[Path], int | None] = (
        _mincore_pages if request.param == "mincore" else _fincore_pages
    )
    canary = tmp_path / "canary"
    canary.write_bytes(os.urandom(16 * mmap.PAGESIZE))
    seen = probe(canary)
    if seen is None:
        pytest.skip(f"{request.param} is not available here")
    if seen < 16:
        pytest.skip(f"{request.param} does not see page-cache pages here (saw {seen}/16)")

    def pages(path: Path) -> int:
        count = probe(path)
        assert count is not None
        return count

    return pages


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "cached"])
def test_swapped_pages_stay_out_of_the_page_cache(
    tmp_path: Path, resident_pages: Callable[[Path], int], direct: bool
) -> None:
    path = tmp_path / "swap"
    with FileDevice(path, 64, direct=direct) as device:
        assert device.direct is direct
        data = os.urandom(16 * BLOCK)
        device.write_blocks(0, [data])
        device.write_blocks(32, [data[: 8 * BLOCK], data[8 * BLOCK :]])
        assert resident_pages(path) == 0
        back = bytearray(16 * BLOCK)
        device.read_blocks(32, [back])
        assert back == data
        assert resident_pages(path) == 0


# --- creation and sizing --------------------------------------------------


def test_created_file_is_sparse_private_and_sized(tmp_path: Path) -> None:
    path = tmp_path / "swap"
    with FileDevice(path, 100) as device:
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == 100 * BLOCK
        assert info.st_blocks == 0, "a fresh swap file must be sparse"
        assert (device.nblocks, device.block_size, device.name) == (100, BLOCK, str(path))


def test_existing_file_used_whole_or_in_part(tmp_path: Path) -> None:
    path = tmp_path / "swap"
    path.write_bytes(b"\x01" * (10 * BLOCK + 100))
    with FileDevice(path) as device:
        assert device.nblocks == 10
    with FileDevice(path, 4, create=False) as device:
        assert device.nblocks == 4
        device.write_blocks(3, [b"\x02" * BLOCK])
    contents = path.read_bytes()
    assert len(contents) == 10 * BLOCK + 100, "opening must not resize an existing file"
    assert contents[3 * BLOCK : 4 * BLOCK] == b"\x02" * BLOCK
    assert contents[4 * BLOCK :] == b"\x01" * (6 * BLOCK + 100)


def test_too_small_file_is_refused_with_its_size(tmp_path: Path) -> None:
    path = tmp_path / "swap"
    path.write_bytes(bytes(3 * BLOCK))
    with pytest.raises(ValueError, match=r"size 12288 bytes .*too small.*nblocks=4"):
        FileDevice(path, 4)
    small = tmp_path / "tiny"
    small.write_bytes(bytes(100))
    with pytest.raises(ValueError, match="smaller than one block"):
        FileDevice(small)


def test_missing_file_without_create_or_size(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileDevice(tmp_path / "absent", 4, create=False)
    with pytest.raises(ValueError, match="nblocks is required"):
        FileDevice(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_not_a_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file or a block device"):
        FileDevice(fifo, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nblocks": 0}, r"nblocks must be in \[1, inf\]"),
        ({"nblocks": 4, "block_size": 1000}, "power of two"),
        ({"nblocks": 4, "block_size": 256}, r"block_size must be in \[512"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FileDevice(tmp_path / "swap", **kwargs)
    assert not (tmp_path / "swap").exists()


def test_temporary_file_is_unlinked_and_private(tmp_path: Path) -> None:
    with FileDevice.temporary(8, directory=tmp_path) as device:
        assert list(tmp_path.iterdir()) == []
        info = os.fstat(device.fileno())
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == 8 * BLOCK
        device.write_blocks(7, [b"x" * BLOCK])
        back = bytearray(BLOCK)
        device.read_blocks(7, [back])
        assert back == b"x" * BLOCK


# --- O_DIRECT, alignment and its fallback ---------------------------------


def test_direct_fallback_when_the_file_system_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fcntl = fcntl.fcntl

    def refuse_direct(fd: int, command: int, arg: int = 0) -> Any:
        if command == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", refuse_direct)
    with FileDevice(tmp_path / "swap", 8) as device:
        assert not device.direct
        flags = real_fcntl(device.fileno(), fcntl.F_GETFL)
        assert not flags & os.O_DIRECT


def test_direct_fallback_when_the_probe_read_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_preadv = os.preadv

    def refuse_direct_read(fd: int, buffers: Sequence[Any], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refuse_direct_read)
    with FileDevice(tmp_path / "swap", 8) as device:
        assert not device.direct
        assert not fcntl.fcntl(device.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        device.write_blocks(0, [b"y" * BLOCK])
        back = bytearray(BLOCK)
        device.read_blocks(0, [back])
        assert back == b"y" * BLOCK


def test_aligned_buffers_are_not_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bounced: list[int] = []
    real_bounce = file_module._Bounce

    def counting_bounce(views: list[memoryview], misaligned: list[int]) -> Any:
        bounced.append(len(misaligned))
        return real_bounce(views, misaligned)

    monkeypatch.setattr(file_module, "_Bounce", counting_bounce)
    arena = mmap.mmap(-1, 8 * BLOCK)
    view = memoryview(arena)
    try:
        with FileDevice(tmp_path / "swap", 16) as device:
            assert device.direct
            view[:] = os.urandom(8 * BLOCK)
            device.write_blocks(2, [view[:BLOCK], view[4 * BLOCK : 7 * BLOCK]])
            device.read_blocks(2, [view[BLOCK : 2 * BLOCK], view[5 * BLOCK : 8 * BLOCK]])
            assert bounced == []
            unaligned = bytearray(2 * BLOCK + 1)
            device.write_blocks(0, [memoryview(unaligned)[1:], view[:BLOCK]])
            assert bounced == [1]
    finally:
        view.release()
        arena.close()


# --- short transfers and OS errors ----------------------------------------


def test_short_transfers_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call moves at most 1.5 blocks: requests still complete with one logical op."""
    calls = {"read": 0, "write": 0}
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def trimmed(buffers: Sequence[Any], limit: int) -> list[memoryview]:
        out: list[memoryview] = []
        for buffer in buffers:
            view = memoryview(buffer)
            if limit <= 0:
                break
            out.append(view[:limit])
            limit -= len(out[-1])
        return out

    def short_preadv(fd: int, buffers: Sequence[Any], offset: int) -> int:
        calls["read"] += 1
        return real_preadv(fd, trimmed(buffers, 3 * BLOCK // 2), offset)

    def short_pwritev(fd: int, buffers: Sequence[Any], offset: int) -> int:
        calls["write"] += 1
        return real_pwritev(fd, trimmed(buffers, 3 * BLOCK // 2), offset)

    with FileDevice(tmp_path / "swap", 16, direct=False) as device:
        monkeypatch.setattr(os, "preadv", short_preadv)
        monkeypatch.setattr(os, "pwritev", short_pwritev)
        data = os.urandom(6 * BLOCK)
        device.write_blocks(5, [data[:BLOCK], data[BLOCK:]])
        back = [bytearray(2 * BLOCK), bytearray(4 * BLOCK)]
        device.read_blocks(5, back)
        assert b"".join(back) == data
        assert calls == {"read": 4, "write": 4}
        stats = device.statistics()
        assert (stats.read_ops, stats.write_ops, stats.blocks_read) == (1, 1, 6)


def test_os_errors_become_device_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int, buffers: Sequence[Any], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    with FileDevice(tmp_path / "swap", 16) as device:
        monkeypatch.setattr(os, "pwritev", failing)
        with pytest.raises(DeviceError) as caught:
            device.write_blocks(7, [bytes(BLOCK)])
        assert (caught.value.errno, caught.value.device, caught.value.block) == (
            errno.EIO,
            str(tmp_path / "swap"),
            7,
        )
        assert not caught.value.transient
        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(DeviceError):
            device.read_blocks(3, [bytearray(BLOCK)])
        stats = device.statistics()
        assert (stats.read_errors, stats.write_errors, stats.read_ops, stats.write_ops) == (
            1,
            1,
            0,
            0,
        )


def test_end_of_file_is_a_device_error(tmp_path: Path) -> None:
    path = tmp_path / "swap"
    with FileDevice(path, 16) as device:
        os.truncate(path, 4 * BLOCK)
        with pytest.raises(DeviceError, match="unexpected end of file") as caught:
            device.read_blocks(8, [bytearray(BLOCK)])
        assert caught.value.errno == errno.EIO


def test_discard_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "swap"
    with FileDevice(path, 64) as device:
        device.write_blocks(0, [os.urandom(64 * BLOCK)])
        device.flush()
        allocated = path.stat().st_blocks * 512
        assert allocated >= 64 * BLOCK
        device.discard(0, 32)
        assert path.stat().st_blocks * 512 <= allocated - 32 * BLOCK
        back = bytearray(BLOCK)
        device.read_blocks(0, [back])
        assert back == bytes(BLOCK)
