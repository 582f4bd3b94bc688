"""Hard read errors: the caller is told which device and block, and nothing is faked.

A page whose only copy sits on a block the device cannot read raises
``DeviceError`` (errno, device name, block) on every read until the fault
clears; it never reads as zeros or as anything else, is never left resident
half-filled, and pages on other blocks, read-around neighbours included,
read normally.
"""

from __future__ import annotations

import errno

import pytest

from vmpager import DeviceError
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(60)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def swapped(vm: VM, npages: int) -> VMObject:
    obj = vm.allocate(npages * PAGE)
    for p in range(npages):
        obj.write(p * PAGE, page_bytes(p + 1))
    vm.pageout()
    assert not obj.pages
    return obj


def where(vm: VM, obj: VMObject, pindex: int) -> tuple[str, int]:
    device, dblk = vm.space.locate(vm.swap_pager.meta.lookup(obj.oid, pindex))
    return device.name, dblk


@pytest.mark.parametrize("window", [0, 2, 8])
def test_hard_read_error_names_device_and_block_and_spares_the_neighbours(window: int) -> None:
    vm, devices = small_vm(nframes=16, swap_nblocks=32, faulty=True, readaround_npages=window)
    with vm:
        obj = swapped(vm, 8)
        name, dblk = where(vm, obj, 5)
        devices[0].fail_reads([dblk], errno.EIO)
        for attempt in range(3):
            with pytest.raises(DeviceError) as info:
                obj.read(5 * PAGE + 10, 100)
            err = info.value
            assert err.errno == errno.EIO and not err.transient
            assert err.device == name and err.block == dblk, (attempt, err)
            assert name in str(err) and f"block {dblk}" in str(err)
            assert 5 not in obj.pages, "a page that could not be read must not be resident"
        for p in (0, 1, 2, 3, 4, 6, 7):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p + 1), p
        assert 5 not in obj.pages
        stats = vm.statistics()
        assert stats.read_errors >= 3
        vm.check()
        devices[0].clear_faults()
        assert obj.read(5 * PAGE, PAGE) == page_bytes(6)
        vm.check()


def test_a_partial_write_over_an_unreadable_page_fails_and_changes_nothing() -> None:
    vm, devices = small_vm(nframes=16, swap_nblocks=32, faulty=True, readaround_npages=0)
    with vm:
        obj = swapped(vm, 4)
        _, dblk = where(vm, obj, 2)
        devices[0].fail_reads([dblk], errno.EIO)
        with pytest.raises(DeviceError):
            obj.write(2 * PAGE + 100, b"partial")  # needs the old contents
        # A whole-page write needs no read: it replaces the unreadable copy.
        obj.write(1 * PAGE, page_bytes(77))
        devices[0].clear_faults()
        assert obj.read(2 * PAGE, PAGE) == page_bytes(3)
        assert obj.read(1 * PAGE, PAGE) == page_bytes(77)
        vm.check()


def test_whole_page_write_replaces_an_unreadable_page() -> None:
    vm, devices = small_vm(nframes=16, swap_nblocks=32, faulty=True, readaround_npages=0)
    with vm:
        obj = swapped(vm, 4)
        _, dblk = where(vm, obj, 2)
        devices[0].fail_reads([dblk], errno.EIO)
        obj.write(2 * PAGE, page_bytes(55))
        assert obj.read(2 * PAGE, PAGE) == page_bytes(55)
        vm.pageout()  # its new copy goes to another block
        assert where(vm, obj, 2)[1] != dblk
        assert obj.read(2 * PAGE, PAGE) == page_bytes(55)
        vm.check()


def test_transient_read_error_is_reported_then_reads_work() -> None:
    vm, devices = small_vm(
        reference=True, nframes=16, swap_nblocks=32, faulty=True, readaround_npages=2
    )
    with vm:
        obj = swapped(vm, 8)
        _, dblk = where(vm, obj, 3)
        devices[0].fail_reads([dblk], errno.EAGAIN, times=2)
        with pytest.raises(DeviceError) as info:
            obj.read(3 * PAGE, PAGE)
        assert info.value.transient
        assert obj.read(3 * PAGE, PAGE) == page_bytes(4)
        vm.check()


def test_read_errors_on_every_block_of_a_device_spare_the_other_device() -> None:
    vm, devices = small_vm(nframes=8, swap_nblocks=[32, 32], faulty=True)
    with vm:
        obj = swapped(vm, 24)
        devices[1].fail_reads(range(32), errno.EIO)
        good = bad = 0
        for p in range(24):
            name, _ = where(vm, obj, p)
            if name == devices[1].name:
                with pytest.raises(DeviceError, match=devices[1].name):
                    obj.read(p * PAGE, PAGE)
                bad += 1
            else:
                assert obj.read(p * PAGE, PAGE) == page_bytes(p + 1)
                good += 1
            vm.check()
        assert good and bad
        devices[1].clear_faults()
        for p in range(24):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p + 1)
        vm.check()
