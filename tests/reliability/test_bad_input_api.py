"""Bad input across the public API and the command line: clear errors, no damage.

Every call here is wrong in one way (negative, huge, unaligned, wrong type,
closed object, closed VM). Each must raise ``ValueError``/``TypeError``
naming the argument (and the allowed range where there is one) or
``ObjectClosed``, change nothing, and leave ``check()`` passing with all the
data written before intact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from vmpager import ObjectClosed, VMObject
from vmpager.cli import main
from vmpager.devices.memory import MemoryDevice
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(60)

SIZE = 4 * PAGE


@pytest.fixture
def world() -> Iterator[tuple[VM, VMObject, bytes]]:
    vm, _ = small_vm(nframes=8, swap_nblocks=32)
    obj = vm.allocate(SIZE)
    data = bytes(range(256)) * (SIZE // 256)
    obj.write(0, data)
    vm.pageout(2)
    yield vm, obj, data
    # Nothing the bad calls did may show: data intact, invariants hold.
    if not obj.closed:
        assert obj.read(0, SIZE) == data
    vm.check()
    vm.close()


R = r"must be in \[0, 16384\], got"  # the range message of an object of SIZE bytes

OBJECT_CASES: list[tuple[str, Callable[[VMObject], Any], type[Exception], str]] = [
    ("read negative offset", lambda o: o.read(-1, 1), ValueError, r"offset " + R + " -1"),
    ("read negative length", lambda o: o.read(0, -1), ValueError, r"length " + R + " -1"),
    ("read past the end", lambda o: o.read(SIZE - 1, 2), ValueError, r"length must be in \[0, 1\]"),
    ("read offset past the end", lambda o: o.read(SIZE + 1, 0), ValueError, r"offset " + R),
    ("read huge offset", lambda o: o.read(1 << 70, 1), ValueError, r"offset " + R),
    ("read huge length", lambda o: o.read(0, 1 << 70), ValueError, r"length " + R),
    ("read float offset", lambda o: o.read(0.0, 3), TypeError, r"offset must be an int, got float"),
    ("read float length", lambda o: o.read(0, 3.0), TypeError, r"length must be an int, got float"),
    ("read bool offset", lambda o: o.read(True, 3), TypeError, r"offset must be an int, got bool"),
    ("read None offset", lambda o: o.read(None, 1), TypeError, r"offset must be an int"),
    ("read str length", lambda o: o.read(0, "1"), TypeError, r"length must be an int, got str"),
    ("write negative offset", lambda o: o.write(-1, b"a"), ValueError, r"offset " + R + " -1"),
    ("write past the end", lambda o: o.write(SIZE - 1, b"ab"), ValueError, r"length"),
    ("write float offset", lambda o: o.write(1.0, b"a"), TypeError, r"offset must be an int"),
    ("write str data", lambda o: o.write(0, "text"), TypeError, r"data must be bytes-like"),
    ("write None data", lambda o: o.write(0, None), TypeError, r"bytes-like"),
    ("write int data", lambda o: o.write(0, 5), TypeError, r"bytes-like"),
    ("write list data", lambda o: o.write(0, [1, 2]), TypeError, r"bytes-like"),
    (
        "write strided data",
        lambda o: o.write(0, np.arange(10, dtype=np.uint8)[::2]),
        TypeError,
        r"contiguous",
    ),
    ("readinto bytes", lambda o: o.readinto(0, b"abc"), TypeError, r"buffer must be writable"),
    ("readinto None", lambda o: o.readinto(0, None), TypeError, r"bytes-like"),
    ("readinto past the end", lambda o: o.readinto(SIZE, bytearray(1)), ValueError, r"length"),
    ("discard negative length", lambda o: o.discard(0, -1), ValueError, r"length " + R),
    ("discard past the end", lambda o: o.discard(PAGE, SIZE), ValueError, r"length"),
    ("discard str offset", lambda o: o.discard("0", 1), TypeError, r"offset must be an int"),
    ("reserve negative", lambda o: o.reserve(-1), ValueError, r"offset " + R),
    ("reserve too long", lambda o: o.reserve(0, SIZE + 1), ValueError, r"length " + R),
    (
        "strategy unaligned",
        lambda o: o.strategy_read(1, bytearray(PAGE)),
        ValueError,
        r"whole pages of 4096 bytes",
    ),
    (
        "strategy short",
        lambda o: o.strategy_write(0, b"x"),
        ValueError,
        r"whole pages of 4096 bytes",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [c[1:] for c in OBJECT_CASES],
    ids=[c[0] for c in OBJECT_CASES],
)
def test_object_calls_with_bad_arguments(
    world: tuple[VM, VMObject, bytes],
    call: Callable[[VMObject], Any],
    exc: type[Exception],
    message: str,
) -> None:
    _, obj, _ = world
    with pytest.raises(exc, match=message):
        call(obj)


def test_numpy_integers_are_accepted_where_ints_are(world: tuple[VM, VMObject, bytes]) -> None:
    _, obj, data = world
    assert obj.read(np.int64(10), np.int32(5)) == data[10:15]
    assert obj.read(np.uint16(PAGE - 2), 4) == data[PAGE - 2 : PAGE + 2]


VM_CASES: list[tuple[str, Callable[[VM], Any], type[Exception], str]] = [
    ("allocate zero", lambda vm: vm.allocate(0), ValueError, r"size must be in \[1, "),
    ("allocate negative", lambda vm: vm.allocate(-1), ValueError, r"size must be in \[1, "),
    ("allocate huge", lambda vm: vm.allocate(1 << 61), ValueError, r"size must be in \[1, "),
    ("allocate float", lambda vm: vm.allocate(1.5), TypeError, r"size must be an int or"),
    ("allocate bool", lambda vm: vm.allocate(True), TypeError, r"size must be an int or"),
    ("allocate None", lambda vm: vm.allocate(None), TypeError, r"size must be an int or"),
    ("allocate bad unit", lambda vm: vm.allocate("12Q"), ValueError, r"size: unknown unit 'Q'"),
    ("allocate fraction", lambda vm: vm.allocate("1.3K"), ValueError, r"not a whole number"),
    ("allocate garbage", lambda vm: vm.allocate("lots"), ValueError, r"size: cannot parse"),
    ("pageout negative", lambda vm: vm.pageout(-1), ValueError, r"npages must be in \[0, inf\]"),
    ("pageout str", lambda vm: vm.pageout("1"), TypeError, r"npages must be an int, got str"),
    ("async max None", lambda vm: vm.set_swap_async_max(None), TypeError, r"swap_async_max"),
    ("async max str", lambda vm: vm.set_swap_async_max("3"), TypeError, r"swap_async_max"),
    ("swapon int", lambda vm: vm.swapon(123), TypeError, r"swap entries must be"),
    ("swapon None", lambda vm: vm.swapon(None), TypeError, r"swap entries must be"),
    (
        "swapon negative size",
        lambda vm: vm.swapon("/tmp/vmpager-never-made", -1),
        ValueError,
        r"swap size of /tmp/vmpager-never-made must be in \[4096, inf\]",
    ),
    (
        "swapon bad unit",
        lambda vm: vm.swapon("/tmp/vmpager-never-made", "1Q"),
        ValueError,
        r"unknown unit 'Q'",
    ),
    (
        "swapon wrong block size",
        lambda vm: vm.swapon(MemoryDevice(8, 8192, name="big")),
        ValueError,
        r"block_size 8192",
    ),
    ("swapoff unknown", lambda vm: vm.swapoff("nope"), ValueError, r"device must name a swap"),
    ("swapoff bool", lambda vm: vm.swapoff(True), TypeError, r"device must be"),
    ("swapoff float", lambda vm: vm.swapoff(0.0), TypeError, r"device must be"),
    ("map_file bad mode", lambda vm: vm.map_file("/etc/hostname", "w"), ValueError, r"mode"),
    ("map_device int", lambda vm: vm.map_device(123), TypeError, r"buffer"),
]


@pytest.mark.parametrize(
    ("call", "exc", "message"), [c[1:] for c in VM_CASES], ids=[c[0] for c in VM_CASES]
)
def test_vm_calls_with_bad_arguments(
    world: tuple[VM, VMObject, bytes],
    call: Callable[[VM], Any],
    exc: type[Exception],
    message: str,
) -> None:
    vm, _, _ = world
    before = vm.statistics()
    with pytest.raises(exc, match=message):
        call(vm)
    after = vm.statistics()
    assert after.objects == before.objects
    assert after.swap_total_blocks == before.swap_total_blocks


def test_a_duplicate_swap_device_is_refused() -> None:
    vm, devices = small_vm(nframes=8, swap_nblocks=32)
    with vm:
        with pytest.raises(ValueError, match="already in use"):
            vm.swapon(devices[0])
        assert len(vm.swapinfo()) == 1
        vm.check()


CONSTRUCTOR_CASES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("memory negative", {"memory": -1}, ValueError, r"memory must be in \["),
    ("memory tiny", {"memory": 100}, ValueError, r"memory must be in \[16384"),
    ("memory float", {"memory": 1.5}, TypeError, r"memory must be an int"),
    ("memory garbage", {"memory": "lots"}, ValueError, r"memory: cannot parse"),
    ("page size odd", {"page_size": 5000}, ValueError, r"page_size must be a power of two"),
    ("page size small", {"page_size": 512}, ValueError, r"page_size must be in \[4096"),
    ("page size bool", {"page_size": True}, TypeError, r"page_size must be an int"),
    ("swap a string", {"swap": "/tmp/x:1M"}, TypeError, r"swap must be a list"),
    ("swap entry int", {"swap": [5]}, TypeError, r"swap entries must be"),
    ("swap size bad", {"swap": ["/tmp/vmpager-never-made:-5"]}, ValueError, r"cannot parse"),
    ("layout", {"layout": "zigzag"}, ValueError, r"layout must be 'per_device' or 'stripe'"),
]


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [c[1:] for c in CONSTRUCTOR_CASES],
    ids=[c[0] for c in CONSTRUCTOR_CASES],
)
def test_vm_constructor_with_bad_arguments(
    kwargs: dict[str, Any], exc: type[Exception], message: str
) -> None:
    args: dict[str, Any] = {"memory": "1M", "swap": []}
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        VM(**args)


# -- closed objects and a closed VM -----------------------------------------------------------


CLOSED_OBJECT_CALLS: list[tuple[str, Callable[[VMObject], Any]]] = [
    ("read", lambda o: o.read(0, 1)),
    ("write", lambda o: o.write(0, b"a")),
    ("readinto", lambda o: o.readinto(0, bytearray(1))),
    ("discard", lambda o: o.discard(0, 1)),
    ("clone", lambda o: o.clone()),
    ("reserve", lambda o: o.reserve(0, 1)),
    ("strategy_read", lambda o: o.strategy_read(0, bytearray(PAGE))),
    ("strategy_write", lambda o: o.strategy_write(0, bytes(PAGE))),
    ("strategy_delete", lambda o: o.strategy_delete(0, PAGE)),
]


@pytest.mark.parametrize(
    "call", [c[1] for c in CLOSED_OBJECT_CALLS], ids=[c[0] for c in CLOSED_OBJECT_CALLS]
)
def test_use_after_close(
    world: tuple[VM, VMObject, bytes], call: Callable[[VMObject], Any]
) -> None:
    vm, obj, _ = world
    other = vm.allocate(PAGE)
    other.write(0, b"keep")
    obj.close()
    obj.close()  # double close: no effect
    with pytest.raises(ObjectClosed, match=rf"VM object {obj.oid} is closed"):
        call(obj)
    assert other.read(0, 4) == b"keep"
    assert vm.statistics().objects == 1
    # ObjectClosed is also a ValueError for callers that only catch those.
    with pytest.raises(ValueError):
        call(obj)


def test_vm_use_after_close() -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=32)
    obj = vm.allocate(PAGE)
    obj.write(0, b"data")
    vm.close()
    vm.close()  # double close: no effect
    for call in (
        lambda: vm.allocate(PAGE),
        lambda: vm.pageout(),
        lambda: vm.swapon("/tmp/vmpager-never-made", "1M"),
        lambda: vm.swapoff(0),
        lambda: vm.map_file("/etc/hostname"),
        lambda: obj.read(0, 1),
        lambda: obj.write(0, b"x"),
        lambda: obj.clone(),
    ):
        with pytest.raises(ObjectClosed):
            call()
    # Looking is still allowed after close: statistics and check for post-mortems.
    assert vm.statistics().objects == 0
    vm.check()


def test_context_managers_close_once() -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=32)
    with vm:
        with vm.allocate(PAGE) as obj:
            obj.write(0, b"x")
        assert obj.closed
        obj.close()
    with pytest.raises(ObjectClosed):
        vm.allocate(PAGE)


# -- the command line --------------------------------------------------------------------------


CLI_CASES: list[tuple[list[str], str]] = [
    (["run", "--size", "-5"], r"--size: cannot parse size '-5'"),
    (["run", "--size", "12Q"], r"--size: unknown unit 'Q'"),
    (["run", "--size", "4097"], r"--size must be a multiple of 4096"),
    (["run", "--memory", "lots"], r"--memory: cannot parse"),
    (["run", "--memory", "1K"], r"--memory must be in \[16384"),
    (["run", "--pattern", "zigzag"], r"invalid choice: 'zigzag'"),
    (["run", "--accesses", "many"], r"invalid int value"),
    (["swapinfo", "--memory", "-1"], r"--memory: cannot parse"),
    (["frobnicate"], r"invalid choice"),
    ([], r"required: command"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip(), "no message"
    import re

    assert re.search(message, err), err
