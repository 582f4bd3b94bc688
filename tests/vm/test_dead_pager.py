"""Closed objects: the dead pager answers for them, on every path."""

from __future__ import annotations

import numpy as np
import pytest

from vmpager import ObjectClosed
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.deadpager import DEAD_PAGER
from vmpager.vm.page import Page
from vmpager.vm.pagerops import PagerResult


def test_a_closed_object_has_the_dead_pager_and_its_pages_and_swap_are_gone() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=32)
    with vm:
        obj = vm.allocate(8 * PAGE)
        for i in range(8):
            obj.write(i * PAGE, bytes([i + 1]) * PAGE)  # more than memory: some go to swap
        live = obj.pager
        assert live is vm.swap_pager and not obj.closed
        assert vm.statistics().swap_used_blocks > 0
        obj.close()
        assert obj.pager is DEAD_PAGER and obj.closed
        assert not obj.pages
        assert vm.statistics().swap_used_blocks == 0
        vm.check()


@pytest.mark.parametrize(
    "access",
    [
        lambda o: o.read(0, 8),
        lambda o: o.read(PAGE - 4, 8),  # two pages
        lambda o: o.read(0, 0),
        lambda o: o.readinto(0, bytearray(8)),
        lambda o: o.write(0, b"x"),
        lambda o: o.write(0, memoryview(b"x" * 2 * PAGE)),
        lambda o: o.discard(0, PAGE),
        lambda o: o.read_words([0]),
        lambda o: o.write_words([0], [1]),
        lambda o: o.read_pages([0]),
        lambda o: o.write_pages([0], np.zeros((1, PAGE), dtype=np.uint8)),
        lambda o: o.clone(),
        lambda o: o.reserve(0, PAGE),
        lambda o: o.strategy_read(0, bytearray(PAGE)),
        lambda o: o.strategy_write(0, bytes(PAGE)),
        lambda o: o.strategy_delete(0, PAGE),
    ],
)
def test_every_access_to_a_closed_object_raises_object_closed_naming_it(access: object) -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=32)
    with vm:
        obj = vm.allocate(4 * PAGE)
        obj.write(0, b"data")
        obj.close()
        with pytest.raises(ObjectClosed, match=rf"VM object {obj.oid} is closed"):
            access(obj)  # type: ignore[operator]
        assert not obj.pages  # nothing was faulted in for it
        vm.check()


def test_the_dead_pager_refuses_reads_and_fails_writes_leaving_pages_dirty() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=32)
    with vm:
        obj = vm.allocate(2 * PAGE)
        obj.close()
        for call in (
            lambda: DEAD_PAGER.has_page(obj, 0),
            lambda: DEAD_PAGER.has_pages(obj, 0, 2),
            lambda: DEAD_PAGER.page_run(obj, 0, 1, 1),
            lambda: DEAD_PAGER.get_pages(obj, [], 0),
            lambda: DEAD_PAGER.read_runs(obj, []),
        ):
            with pytest.raises(ObjectClosed):
                call()
        page = Page(obj, 0, 0)
        page.busy = False
        page.dirty = page.writing = True
        assert DEAD_PAGER.put_pages(obj, [page], sync=True) == [PagerResult.FAIL]
        assert page.dirty and not page.writing
        page.dirty = False  # it never was resident: out of the dirty count again
        assert DEAD_PAGER.readaround_npages(obj, 0, 8) == 0
        assert not DEAD_PAGER.batches_pageout(obj)
        DEAD_PAGER.free_space(obj, 0, 2)
        DEAD_PAGER.unswapped(obj, 0)
        DEAD_PAGER.dealloc(obj)


def test_a_file_object_closed_names_its_path(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "f.bin"
    path.write_bytes(b"x" * (2 * PAGE))
    vm, _ = small_vm(nframes=4, swap_nblocks=32)
    with vm:
        obj = vm.map_file(path, "r+")
        obj.close()
        assert obj.closed
        for access in (lambda: obj.read(0, 8), lambda: obj.write(0, b"y"), obj.flush):
            with pytest.raises(ObjectClosed, match=r"f\.bin\) is closed"):
                access()
        vm.check()
