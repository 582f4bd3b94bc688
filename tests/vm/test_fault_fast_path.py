"""The one-page page-in of a fault (``SwapPager._get_page``) against the run path
(``SwapPager._get_run``, the request through the kernel's transfer): two VMs
driven by the same program, one of them with the one-page path switched off,
must read the same data, raise the same errors (device errors, corrupt pages,
transient errors) and end with the same counters."""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import CorruptPage, DeviceError
from vmpager.pager.swap import SwapPager
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

PAGE = 4096
NPAGES = 24
NFRAMES = 8

pytestmark = pytest.mark.timeout(120)


def _vm(*, fast: bool, integrity: bool, seed: int) -> tuple[VM, FaultyDevice]:
    device = FaultyDevice(MemoryDevice(4 * NPAGES, PAGE, name="ram"), seed=seed)
    config = replace(VMConfig(), daemon_thread=False)
    vm = VM(memory=NFRAMES * PAGE, swap=[device], config=config, integrity=integrity)
    if not fast:
        pager = vm.swap_pager

        def by_run(obj: Any, page: Any) -> Any:
            return SwapPager._get_run(pager, obj, [page], 0)

        pager._get_page = by_run  # type: ignore[method-assign]
    return vm, device


def _content(pindex: int, version: int) -> bytes:
    return (pindex * 1000 + version).to_bytes(4, "little") * (PAGE // 4)


def _outcome(call: Any) -> Any:
    try:
        return ("ok", call())
    except CorruptPage as error:
        return ("corrupt", error.errno, error.block, error.object_id, error.offset, str(error))
    except DeviceError as error:
        return ("device", error.errno, error.block, error.transient, str(error))


OPS = st.lists(
    st.tuples(
        st.sampled_from(["read", "read", "read", "write", "partial", "damage", "fail", "clear"]),
        st.integers(0, NPAGES - 1),
        st.sampled_from([errno.EIO, errno.EAGAIN, 0]),
    ),
    max_size=50,
)


def _run(vm: VM, device: FaultyDevice, ops: list[tuple[str, int, int]]) -> list[Any]:
    trace: list[Any] = []
    with vm:
        obj = vm.allocate(NPAGES * PAGE)
        for p in range(NPAGES):
            obj.write(p * PAGE, _content(p, 0))
        vm.pageout()
        version = 1
        for op, p, err in ops:
            if op == "read":
                trace.append(_outcome(lambda: obj.read(p * PAGE, PAGE)))  # noqa: B023
            elif op == "write":
                data = _content(p, version)
                version += 1
                trace.append(_outcome(lambda: obj.write(p * PAGE, data)))  # noqa: B023
            elif op == "partial":
                trace.append(_outcome(lambda: obj.write(p * PAGE + 8, b"partial")))  # noqa: B023
            else:
                blk = vm.swap_pager.meta.lookup(obj.oid, p)
                if blk < 0:
                    trace.append(("not on swap", p))
                    continue
                _, dblk = vm.space.locate(blk)
                if op == "damage":
                    if err == errno.EAGAIN:
                        device.corrupt_reads([dblk], times=1)  # damage on the way only
                    else:
                        device.corrupt_stored([dblk], offset=p)
                elif op == "fail":
                    device.fail_reads([dblk], err or errno.EIO, times=None if err else 1)
                else:
                    device.clear_faults()
        vm.check()
        stats = vm.statistics()
        trace.append(("stats", stats))
        trace.append(("device", device.statistics()))
        tier = vm.tier
        trace.append(("tier", None if tier is None else tier.statistics()))
    return trace


@settings(max_examples=40, deadline=None)
@given(ops=OPS, integrity=st.booleans(), seed=st.integers(0, 3))
def test_the_one_page_page_in_agrees_with_the_run_path(
    ops: list[tuple[str, int, int]], integrity: bool, seed: int
) -> None:
    fast = _run(*_vm(fast=True, integrity=integrity, seed=seed), ops)
    slow = _run(*_vm(fast=False, integrity=integrity, seed=seed), ops)
    assert fast == slow


def test_a_fault_that_reads_one_page_takes_the_one_page_path() -> None:
    vm, _device = _vm(fast=True, integrity=True, seed=0)
    calls: list[int] = []
    pager = vm.swap_pager
    real = pager._get_page

    def counted(obj: Any, page: Any) -> Any:
        calls.append(page.pindex)
        return real(obj, page)

    pager._get_page = counted  # type: ignore[method-assign]
    with vm:
        obj = vm.allocate(NPAGES * PAGE)
        for p in range(NPAGES):
            obj.write(p * PAGE, _content(p, 0))
        vm.pageout()
        for p in (17, 3, 11):  # random faults: no read-around
            assert obj.read(p * PAGE, PAGE) == _content(p, 0)
        assert calls == [17, 3, 11]


def test_a_corrupt_page_fails_by_name_on_the_one_page_path() -> None:
    vm, device = _vm(fast=True, integrity=True, seed=0)
    with vm:
        obj = vm.allocate(NPAGES * PAGE)
        for p in range(NPAGES):
            obj.write(p * PAGE, _content(p, 0))
        vm.pageout()
        _, dblk = vm.space.locate(vm.swap_pager.meta.lookup(obj.oid, 9))
        device.corrupt_stored([dblk])
        for _ in range(2):
            with pytest.raises(CorruptPage) as info:
                obj.read(9 * PAGE, 10)
            assert (info.value.object_id, info.value.offset) == (obj.oid, 9 * PAGE)
            assert 9 not in obj.pages
        device.fail_reads([vm.space.locate(vm.swap_pager.meta.lookup(obj.oid, 4))[1]], errno.EIO)
        with pytest.raises(DeviceError) as failed:
            obj.read(4 * PAGE, 10)
        assert failed.value.errno == errno.EIO and not isinstance(failed.value, CorruptPage)
        assert vm.statistics().read_errors == 3
        assert obj.read(5 * PAGE, PAGE) == _content(5, 0)
        vm.check()
