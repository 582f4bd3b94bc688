"""``SwapTier.read_many`` with nothing in the pool and no bad block (the batched
calls' page-in) against the general way (pool planning, per-request counts):
two spaces holding the same pages, damaged the same way, must give the same
data, errors and counters."""

from __future__ import annotations

import errno
import importlib.util
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import CorruptPage, DeviceError
from vmpager.swap.space import SwapSpace
from vmpager.tiers.tier import SwapTier

PAGE = 4096
NPAGES = 40


def _in_turn(fn: Callable[[int], None], indices: Sequence[int]) -> None:
    for i in indices:
        fn(i)


def _space(settings: dict[str, Any], *, general: bool) -> tuple[SwapSpace, list[FaultyDevice]]:
    space = SwapSpace(low_water=0, high_water=0)
    tier = SwapTier(PAGE, **settings)
    if general:
        tier._read_many_through = lambda *args: None  # type: ignore[method-assign]
    space.attach_tier(tier)
    devices = [FaultyDevice(MemoryDevice(NPAGES, PAGE, name=f"ram{k}"), seed=k) for k in (0, 1)]
    for device in devices:
        space.swapon(device)
    return space, devices


def _outcome(error: DeviceError | None) -> Any:
    if error is None:
        return None
    if isinstance(error, CorruptPage):
        return ("corrupt", error.device, error.block, error.swap_block, str(error))
    return ("device", error.errno, error.device, error.block, str(error))


def _state(space: SwapSpace, devices: list[FaultyDevice]) -> Any:
    assert space.tier is not None
    return space.tier.statistics(), [d.statistics() for d in devices], space.statistics()


@pytest.mark.parametrize(
    "settings",
    [{"integrity": True}, {"integrity": False}, {"encrypt": True}],
    ids=["checksum", "no check", "encrypted"],
)
@pytest.mark.parametrize("damage", ["none", "stored", "read once", "read always", "read error"])
def test_read_many_without_a_pool_agrees_with_the_general_way(
    settings: dict[str, Any], damage: str
) -> None:
    if settings.get("encrypt") and importlib.util.find_spec("cryptography") is None:
        pytest.skip("needs cryptography")
    fast, fast_devices = _space(settings, general=False)
    slow, slow_devices = _space(settings, general=True)
    contents = {}
    runs: list[tuple[int, int]] = []
    for space in (fast, slow):
        runs = []
        while (got := space.alloc(3)) is not None:
            runs.append(got)
    for blk, n in runs:
        data = [os.urandom(PAGE) for _ in range(n)]
        contents[blk] = data
        for space in (fast, slow):
            space.write(blk, [bytearray(p) for p in data])
    victims = [runs[1][0], runs[4][0] + 1, runs[-1][0]]
    for space in (fast, slow):
        for blk in victims:
            device, dblk = space.locate(blk)
            assert isinstance(device, FaultyDevice)
            if damage == "stored":
                device.corrupt_stored([dblk], offset=5)
            elif damage == "read once":
                device.corrupt_reads([dblk], times=1)
            elif damage == "read always":
                device.corrupt_reads([dblk])
            elif damage == "read error":
                device.fail_reads([dblk], errno.EIO)
    for _ in range(2):  # known-bad blocks the second time round
        frames = {}
        results = []
        for space in (fast, slow):
            arena = memoryview(mmap.mmap(-1, NPAGES * 2 * PAGE))
            requests = []
            at = 0
            for blk, n in runs:
                # Half as one buffer per page, half as one buffer for the run.
                if blk % 2:
                    buffers = [arena[(at + k) * PAGE : (at + k + 1) * PAGE] for k in range(n)]
                else:
                    buffers = [arena[at * PAGE : (at + n) * PAGE]]
                requests.append((blk, buffers))
                at += n
            results.append([_outcome(e) for e in space.read_many(requests, _in_turn)])
            frames[id(space)] = bytes(arena[: at * PAGE])
        assert results[0] == results[1]
        assert frames[id(fast)] == frames[id(slow)]
        assert _state(fast, fast_devices) == _state(slow, slow_devices)
        if damage == "none":
            assert results[0] == [None] * len(runs)
            assert frames[id(fast)] == b"".join(b"".join(contents[blk]) for blk, _ in runs)
    assert fast.tier is not None
    fast.tier.check(fast_devices)


@pytest.mark.parametrize("tier", [False, True])
@pytest.mark.parametrize("ndevices", [1, 2])
@pytest.mark.parametrize(
    "blk, nbytes, kind",
    [
        (-1, PAGE, "view"),
        (True, PAGE, "view"),
        (NPAGES - 1, 2 * PAGE, "view"),  # crosses the end of the first device
        (NPAGES, PAGE, "view"),  # the gap after it
        (10_000, PAGE, "view"),
        (3, PAGE, "bytearray"),
        (3, 3 * PAGE, "view"),
    ],
)
def test_bad_batched_requests_fail_as_a_read_does(
    tier: bool, ndevices: int, blk: Any, nbytes: int, kind: str
) -> None:
    space = SwapSpace(low_water=0, high_water=0)
    if tier:
        space.attach_tier(SwapTier(PAGE, integrity=True))
    for k in range(ndevices):
        space.swapon(MemoryDevice(NPAGES, PAGE, name=f"ram{k}"))
    space.alloc(NPAGES)

    def buffers() -> list[Any]:
        if kind == "bytearray":
            return [bytearray(nbytes)]
        return [memoryview(mmap.mmap(-1, nbytes))]

    def outcome(call: Callable[[], Any]) -> Any:
        try:
            call()
        except (ValueError, TypeError) as error:
            return type(error).__name__, str(error)
        except DeviceError:
            pass  # a block never written fails its check: not what is tested here
        return ("ok",)

    many = outcome(lambda: space.read_many([(blk, buffers())], _in_turn))
    one = outcome(lambda: space.read(blk, buffers()))
    if one[0] == "ok":
        assert many[0] == "ok"
    else:
        assert many == one
