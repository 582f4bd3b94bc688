"""Every block device passes the shared conformance suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.devices.protocol import BlockDevice
from vmpager.testing.devices import CONFORMANCE_CHECKS, DeviceFactory, check_block_device

Check = Callable[[DeviceFactory], None]


@pytest.fixture(
    params=["file-direct", "file-cached", "file-temporary", "memory", "memory-512", "faulty"]
)
def make_device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeviceFactory]:
    counter = iter(range(1_000_000))

    def make(nblocks: int) -> BlockDevice:
        kind = request.param
        path = tmp_path / f"swap{next(counter)}"
        if kind == "file-direct":
            device = FileDevice(path, nblocks)
            assert device.direct, "O_DIRECT should work on the test file system"
            return device
        if kind == "file-cached":
            return FileDevice(path, nblocks, direct=False)
        if kind == "file-temporary":
            return FileDevice.temporary(nblocks, directory=tmp_path)
        if kind == "memory":
            return MemoryDevice(nblocks)
        if kind == "memory-512":
            return MemoryDevice(nblocks, block_size=512)
        return FaultyDevice(MemoryDevice(nblocks))

    yield make


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda check: check.__name__)
def test_conformance(check: Check, make_device: DeviceFactory) -> None:
    check(make_device)


def test_check_block_device_runs_everything(tmp_path: Path) -> None:
    made: list[int] = []

    def make(nblocks: int) -> BlockDevice:
        made.append(nblocks)
        return MemoryDevice(nblocks)

    check_block_device(make)
    assert len(made) >= len(CONFORMANCE_CHECKS)


class _ForgetfulDevice(MemoryDevice):
    """Drops every write to block 5: the suite must notice."""

    def write_blocks(self, blk, buffers):  # type: ignore[no-untyped-def]
        if blk <= 5 < blk + sum(len(memoryview(b).cast("B")) for b in buffers) // 4096:
            return
        super().write_blocks(blk, buffers)


class _LaxDevice(MemoryDevice):
    """Accepts requests past the end by clamping them: the suite must notice."""

    def read_blocks(self, blk, buffers):  # type: ignore[no-untyped-def]
        if blk >= self.nblocks:
            return
        super().read_blocks(blk, buffers)


@pytest.mark.parametrize("broken", [_ForgetfulDevice, _LaxDevice])
def test_suite_catches_broken_devices(broken: type[MemoryDevice]) -> None:
    with pytest.raises(AssertionError):
        check_block_device(lambda nblocks: broken(nblocks))
