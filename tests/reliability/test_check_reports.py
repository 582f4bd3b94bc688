"""``VM.check()`` names every broken invariant precisely.

Each case corrupts one piece of a consistent VM, checks that
``InvariantViolation.problems`` holds the expected message (naming the page,
frame, block or object involved), then undoes the damage so the VM closes
cleanly. A last case breaks several things at once: every one is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from vmpager import InvariantViolation
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject
from vmpager.vm.page import QUEUE_ACTIVE, QUEUE_INACTIVE, QUEUE_NONE
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(60)

Undo = Callable[[], None]


def world() -> tuple[VM, VMObject, VMObject]:
    """Object a: 8 pages, 4 resident; object b: 8 pages all on swap."""
    vm, _ = small_vm(nframes=16, swap_nblocks=64, readaround_npages=0)
    a = vm.allocate(8 * PAGE)
    b = vm.allocate(8 * PAGE)
    for p in range(8):
        a.write(p * PAGE, bytes([p + 1]) * PAGE)
        b.write(p * PAGE, bytes([p + 101]) * PAGE)
    vm.pageout()
    for p in range(4):
        a.read(p * PAGE, 1)
    vm.check()
    return vm, a, b


def resident_frame_on_free_list(vm: VM, a: VMObject, b: VMObject) -> Undo:
    page = a.pages[1]
    vm.frames.free(page.frame)

    def undo() -> None:
        vm.frames._free.remove(page.frame)
        vm.frames._is_free[page.frame] = 0

    return undo


def two_pages_one_frame(vm: VM, a: VMObject, b: VMObject) -> Undo:
    p0, p1 = a.pages[0], a.pages[1]
    saved = p1.frame
    p1.frame = p0.frame

    def undo() -> None:
        p1.frame = saved

    return undo


def writing_but_clean(vm: VM, a: VMObject, b: VMObject) -> Undo:
    page = a.pages[2]
    page.writing = True

    def undo() -> None:
        page.writing = False

    return undo


def idle_on_no_queue(vm: VM, a: VMObject, b: VMObject) -> Undo:
    page = a.pages[3]
    queue = page.queue
    vm.queues.remove(page)

    def undo() -> None:
        if queue == QUEUE_ACTIVE:
            vm.queues.activate(page)
        else:
            vm.queues.deactivate(page)

    return undo


def queue_tag_wrong(vm: VM, a: VMObject, b: VMObject) -> Undo:
    page = a.pages[0]
    tag = page.queue
    page.queue = QUEUE_INACTIVE if tag == QUEUE_ACTIVE else QUEUE_ACTIVE

    def undo() -> None:
        page.queue = tag

    return undo


def page_filed_under_another_index(vm: VM, a: VMObject, b: VMObject) -> Undo:
    page = a.pages.pop(2)
    a.pages[6] = page

    def undo() -> None:
        del a.pages[6]
        a.pages[2] = page

    return undo


def page_index_outside_object(vm: VM, a: VMObject, b: VMObject) -> Undo:
    page = a.pages.pop(3)
    page.pindex = 99
    a.pages[99] = page

    def undo() -> None:
        del a.pages[99]
        page.pindex = 3
        a.pages[3] = page

    return undo


def block_allocated_but_unowned(vm: VM, a: VMObject, b: VMObject) -> Undo:
    got = vm.space.alloc(1)
    assert got is not None

    def undo() -> None:
        vm.space.free(got[0], 1)

    return undo


def block_owned_but_free(vm: VM, a: VMObject, b: VMObject) -> Undo:
    """Block counts agree, but a page owns a free block and a used block has no owner."""
    blk = vm.swap_pager.meta.lookup(b.oid, 5)
    vm.space.free(blk, 1)
    got = vm.space.alloc(1)
    assert got is not None and got[0] != blk

    def undo() -> None:
        vm.space.free(got[0], 1)
        vm.space._slots[0].state[blk] = 1  # type: ignore[union-attr]
        vm.space._slots[0].used += 1  # type: ignore[union-attr]
        vm.space._used += 1
        vm.space._free -= 1
        assert vm.space._slots[0].blist is not None  # type: ignore[union-attr]
        vm.space._slots[0].blist.fill(blk, 1)  # type: ignore[union-attr]

    return undo


def blocks_of_a_gone_object(vm: VM, a: VMObject, b: VMObject) -> Undo:
    del vm.kernel.objects[b.oid]

    def undo() -> None:
        vm.kernel.objects[b.oid] = b

    return undo


def frame_listed_free_twice(vm: VM, a: VMObject, b: VMObject) -> Undo:
    frame = vm.frames._free[-1]
    vm.frames._free.append(frame)

    def undo() -> None:
        vm.frames._free.pop()

    return undo


def pager_map_overused(vm: VM, a: VMObject, b: VMObject) -> Undo:
    pmap = vm.pagermap
    saved = pmap._in_use
    pmap._in_use = pmap.size_npages + 5

    def undo() -> None:
        pmap._in_use = saved

    return undo


def clone_refcount_wrong(vm: VM, a: VMObject, b: VMObject) -> Undo:
    c = a.clone()
    backing = a.backing
    assert backing is not None
    backing.refcount += 1

    def undo() -> None:
        backing.refcount -= 1
        c.close()

    return undo


CASES: list[tuple[Callable[[VM, VMObject, VMObject], Undo], str]] = [
    (resident_frame_on_free_list, r"page \d+:1: its frame \d+ is on the free list"),
    (two_pages_one_frame, r"page \d+:1: frame \d+ also holds <Page \d+:0 "),
    (writing_but_clean, r"page \d+:2: being written but clean"),
    (idle_on_no_queue, r"page \d+:3: idle but on no queue"),
    (queue_tag_wrong, r"<Page \d+:0 .*> is on the (in)?active queue but tagged \d"),
    (page_filed_under_another_index, r"page \d+:6: recorded as <Page \d+:2 "),
    (page_index_outside_object, r"page \d+:99: index outside the object \(8 pages\)"),
    (block_allocated_but_unowned, r"swap: 17 blocks allocated but 16 owned by pages"),
    (block_owned_but_free, r"swap: block \d+ of page \d+:5 is not allocated"),
    (blocks_of_a_gone_object, r"swap: blocks owned by object \d+, which is gone"),
    (frame_listed_free_twice, r"frame free list holds a frame twice"),
    (pager_map_overused, r"pager map general pool use \d+ out of range"),
    (clone_refcount_wrong, r"object \d+: refcount 3 but 2 shadows"),
]


@pytest.mark.parametrize(("corrupt", "message"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_check_names_the_broken_invariant(
    corrupt: Callable[[VM, VMObject, VMObject], Undo], message: str
) -> None:
    vm, a, b = world()
    undo = corrupt(vm, a, b)
    with pytest.raises(InvariantViolation) as info:
        vm.check()
    problems = info.value.problems
    assert any(re.search(message, p) for p in problems), problems
    assert str(len(problems)) in str(info.value)
    undo()
    vm.check()
    vm.close()


def test_check_reports_every_problem_at_once() -> None:
    vm, a, b = world()
    undos = [
        writing_but_clean(vm, a, b),
        idle_on_no_queue(vm, a, b),
        block_allocated_but_unowned(vm, a, b),
        pager_map_overused(vm, a, b),
    ]
    with pytest.raises(InvariantViolation) as info:
        vm.check()
    text = "\n".join(info.value.problems)
    for pattern in (
        "being written but clean",
        "idle but on no queue",
        "blocks allocated but",
        "pager map general pool use",
    ):
        assert pattern in text, text
    for undo in reversed(undos):
        undo()
    vm.check()
    vm.close()


def test_check_is_clean_on_a_busy_consistent_vm() -> None:
    vm, a, b = world()
    for p in range(8):
        b.write(p * PAGE + 7, b"z")
    c = a.clone()
    c.write(0, b"c")
    vm.pageout(3)
    vm.check()
    assert not [p for p in a.pages.values() if p.queue == QUEUE_NONE and not p.busy]
    vm.close()
