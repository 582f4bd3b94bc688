"""MemoryDevice specifics beyond the conformance suite."""

from __future__ import annotations

import os

import pytest

from vmpager.devices.memory import MemoryDevice


def test_fresh_blocks_read_as_zeros_and_names_are_unique() -> None:
    with MemoryDevice(4) as first, MemoryDevice(4) as second:
        back = bytearray(b"\xff" * 4 * 4096)
        first.read_blocks(0, [back])
        assert back == bytes(4 * 4096)
        assert first.name != second.name
        assert first.name.startswith("ram:")
    assert MemoryDevice(1, name="fast").name == "fast"


def test_discard_frees_whole_pages_only() -> None:
    with MemoryDevice(16, block_size=1024) as device:
        data = os.urandom(16 * 1024)
        device.write_blocks(0, [data])
        # Blocks 3..9 cover bytes 3072..10240: only the page 4096..8192 is whole.
        device.discard(3, 7)
        back = bytearray(16 * 1024)
        device.read_blocks(0, [back])
        assert back[4096:8192] == bytes(4096)
        assert back[:4096] == data[:4096]
        assert back[8192:] == data[8192:]


@pytest.mark.parametrize(
    ("args", "kind", "message"),
    [
        ((0,), ValueError, r"nblocks must be in \[1, inf\]"),
        ((4, 3000), ValueError, "power of two"),
        ((4.0,), TypeError, "nblocks must be an int"),
    ],
)
def test_bad_arguments(args: tuple[object, ...], kind: type[Exception], message: str) -> None:
    with pytest.raises(kind, match=message):
        MemoryDevice(*args)  # type: ignore[arg-type]
