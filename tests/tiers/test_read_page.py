"""The one-page read of a fault (``SwapSpace.read_page``, ``SwapTier.read_page``)
against the general read (``SwapSpace.read`` of a one-buffer list): two spaces
holding the same pages, damaged the same way, must give the same data, the
same errors and the same counters, with every tier setting."""

from __future__ import annotations

import errno
import importlib.util
import mmap
import os
from collections.abc import Callable
from typing import Any

import pytest

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import CorruptPage, DeviceError
from vmpager.swap.space import SwapSpace
from vmpager.tiers.tier import SwapTier

PAGE = 4096
NPAGES = 12

TIERS: dict[str, dict[str, Any] | None] = {
    "no tier": None,
    "checksum": {"integrity": True},
    "no check": {"integrity": False},
    "encrypted": {"encrypt": True},
    "pool": {"compress": "lz4", "pool_capacity": 4 * PAGE},
}


def _available(settings: dict[str, Any] | None) -> bool:
    if settings is None:
        return True
    if settings.get("encrypt") and importlib.util.find_spec("cryptography") is None:
        return False
    return not (settings.get("compress") and importlib.util.find_spec("lz4") is None)


def _space(settings: dict[str, Any] | None, seed: int) -> tuple[SwapSpace, FaultyDevice, int]:
    space = SwapSpace(low_water=0, high_water=0)
    if settings is not None:
        space.attach_tier(SwapTier(PAGE, **settings))
    device = FaultyDevice(MemoryDevice(64, PAGE, name="ram"), seed=seed)
    space.swapon(device)
    got = space.alloc(NPAGES)
    assert got is not None and got[1] == NPAGES
    return space, device, got[0]


def _page(n: int) -> bytes:
    # Some pages compress (the pool keeps them), some are same-filled, some do not.
    if n % 3 == 0:
        return bytes([n]) * PAGE
    if n % 3 == 1:
        return n.to_bytes(2, "little") * 100 + bytes(PAGE - 200)
    return os.urandom(PAGE)


def _frame() -> memoryview:
    return memoryview(mmap.mmap(-1, PAGE))


def _outcome(space: SwapSpace, read: Callable[[], None]) -> tuple[Any, ...] | None:
    try:
        read()
    except CorruptPage as error:
        return ("CorruptPage", error.errno, error.device, error.block, error.swap_block, str(error))
    except DeviceError as error:
        return ("DeviceError", error.errno, error.device, error.block, str(error))
    except ValueError as error:
        return ("ValueError", str(error))
    return None


def _state(space: SwapSpace, device: FaultyDevice) -> tuple[Any, ...]:
    tier = space.tier
    return (
        None if tier is None else tier.statistics(),
        device.statistics(),
        space.statistics(),
    )


DAMAGE = ["none", "stored", "read once", "read always", "read error", "transient error"]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("tier", list(TIERS))
def test_the_one_page_read_agrees_with_the_general_read(tier: str, damage: str) -> None:
    settings = TIERS[tier]
    if not _available(settings):
        pytest.skip(f"{tier} needs an optional package")
    fast, fast_dev, blk = _space(settings, seed=7)
    slow, slow_dev, blk2 = _space(settings, seed=7)
    assert blk == blk2
    pages = [_page(n) for n in range(NPAGES)]
    for space in (fast, slow):
        space.write(blk, [bytearray(p) for p in pages])
    hit = [2, 5, 6]  # pages damaged
    for space, device in ((fast, fast_dev), (slow, slow_dev)):
        dblks = [space.locate(blk + k)[1] for k in hit]
        if damage == "stored":
            device.corrupt_stored(dblks, offset=11)
        elif damage == "read once":
            device.corrupt_reads(dblks, times=1)
        elif damage == "read always":
            device.corrupt_reads(dblks)
        elif damage == "read error":
            device.fail_reads(dblks, errno.EIO)
        elif damage == "transient error":
            device.fail_reads(dblks, errno.EAGAIN, times=1)
    for rounds in range(2):  # a corrupt block is known bad the second time
        for k in range(NPAGES):
            got, want = _frame(), _frame()
            a = _outcome(fast, lambda: fast.read_page(blk + k, got))  # noqa: B023
            b = _outcome(slow, lambda: slow.read(blk + k, [want]))  # noqa: B023
            assert a == b, (rounds, k)
            if damage == "none":
                assert a is None and bytes(got) == pages[k]
            elif a is None and settings is not None and settings.get("integrity", True):
                assert bytes(got) == pages[k], "a checked read hands on only good data"
            assert bytes(got) == bytes(want), (rounds, k)
            assert _state(fast, fast_dev) == _state(slow, slow_dev), (rounds, k)
    # Freeing retires the corrupt blocks alike.
    fast.free(blk, NPAGES)
    slow.free(blk, NPAGES)
    assert _state(fast, fast_dev) == _state(slow, slow_dev)
    fast.check()
    for space in (fast, slow):
        if space.tier is not None:
            space.tier.check([fast_dev if space is fast else slow_dev])


def test_the_one_page_read_checks_what_it_reads() -> None:
    space, device, blk = _space({"integrity": True}, seed=1)
    space.write(blk, [bytearray(_page(4))])
    device.corrupt_stored([space.locate(blk)[1]], offset=99)
    frame = _frame()
    with pytest.raises(CorruptPage) as info:
        space.read_page(blk, frame)
    assert info.value.swap_block == blk
    assert bytes(frame) == bytes(PAGE), "nothing of a corrupt page is handed on"
    stats = space.tier.statistics() if space.tier else None
    assert stats is not None and stats.corrupt_pages == 1 and stats.bad_pending == 1


@pytest.mark.parametrize(
    "blk, page",
    [
        (-1, lambda: _frame()),
        (10_000, lambda: _frame()),
        (True, lambda: _frame()),
        (0, lambda: memoryview(mmap.mmap(-1, 2 * PAGE))),
        (0, lambda: bytearray(PAGE)),
        (0, lambda: memoryview(bytes(PAGE))),
    ],
)
@pytest.mark.parametrize("tier", ["no tier", "checksum"])
def test_odd_requests_take_the_general_read(tier: str, blk: Any, page: Any) -> None:
    fast, fast_dev, _ = _space(TIERS[tier], seed=2)
    slow, slow_dev, _ = _space(TIERS[tier], seed=2)
    for space in (fast, slow):
        space.write(0, [bytearray(_page(1)), bytearray(_page(2))])

    def outcome(call: Callable[[], None]) -> Any:
        try:
            call()
        except (ValueError, TypeError, DeviceError) as error:
            return type(error).__name__, str(error)
        return None

    a = outcome(lambda: fast.read_page(blk, page()))
    b = outcome(lambda: slow.read(blk, [page()]))
    assert a == b
    assert _state(fast, fast_dev) == _state(slow, slow_dev)
