"""Copy-on-write clones and object collapse (vm_object_shadow, vm_object_collapse).

``clone(obj)`` freezes the object's current contents in a new internal
backing object and puts two shadows in front of it: ``obj`` itself (the
user's handle keeps its identity) and the new clone. Both start empty; a
read that misses walks the chain to the backing object, a write copies the
page up into the shadow (fault.py). Backing objects are never written
again, so each side sees only its own writes.

When a backing object is left with a single shadow (the other was closed),
it is collapsed into that shadow: its pages and swap blocks move up where
the shadow has nothing of its own, following swap_pager_copy's rules: where
both have a block for a page the shadow's is kept and the backing's freed;
a page resident in the shadow wins; whatever is left of the backing object
is freed. Chains therefore stay as short as the number of live clones, and
closing any object leaves every other view intact.

All functions run with the VM lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmpager.vm.object import RESERVED_UNWRITTEN, RESERVED_WRITTEN, ObjectKind, VMObject

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel

__all__ = ["check_chains", "clone", "release_backing"]


def _wait_idle(vm: Kernel, obj: VMObject) -> None:
    """Wait until no page of ``obj`` is busy or being written."""
    while True:
        busy = next((p for p in obj.pages.values() if p.busy or p.writing), None)
        if busy is None:
            return
        vm.wait_page(busy)


def clone(vm: Kernel, obj: VMObject) -> VMObject:
    """Return a copy-on-write snapshot of ``obj``. O(resident pages + swapped chunks)."""
    _wait_idle(vm, obj)
    frozen = VMObject(vm, 0, obj.npages, "anonymous")
    vm.register_object(frozen)
    frozen.internal = True
    # Move the contents: pages and swap blocks now belong to the frozen object.
    frozen.pages = obj.pages
    for page in frozen.pages.values():
        page.obj = frozen
    obj.pages = {}
    if obj.swap_backed:
        vm.swap_pager.meta.transfer(obj.oid, frozen.oid, 0, obj.npages, lambda _: False)
        frozen.swap_backed = True
        obj.swap_backed = False
    vm.swap_pager.release_reservation(frozen, obj)
    # The frozen object takes obj's place in the chain.
    frozen.backing = obj.backing
    frozen.backing_offset = obj.backing_offset
    if obj.backing is not None:
        obj.backing.shadows.remove(obj)
        obj.backing.shadows.append(frozen)
    copy = VMObject(vm, 0, obj.npages, "anonymous")
    vm.register_object(copy)
    for shadow in (obj, copy):
        shadow.backing = frozen
        shadow.backing_offset = 0
        frozen.shadows.append(shadow)
    frozen.refcount = 2
    vm.counters.clones += 1
    return copy


def release_backing(vm: Kernel, obj: VMObject) -> None:
    """``obj`` is closing: drop its reference on its backing object.

    A backing object with no reference left is freed; a frozen (internal)
    one with a single shadow is collapsed into it. A pager's object (a file
    mapped privately) also counts its own maps and is never collapsed.
    """
    backing = obj.backing
    if backing is None:
        return
    obj.backing = None
    backing.shadows.remove(obj)
    backing.refcount -= 1
    if backing.refcount == 0:
        vm.destroy_object(backing)
    elif backing.refcount == 1 and backing.internal:
        collapse(vm, backing.shadows[0])


def collapse(vm: Kernel, shadow: VMObject) -> None:
    """Merge ``shadow``'s backing object (which has no other shadow) into ``shadow``."""
    backing = shadow.backing
    assert backing is not None and backing.refcount == 1 and backing.shadows == [shadow]
    _wait_idle(vm, backing)
    _wait_idle(vm, shadow)
    offset = shadow.backing_offset
    pager = vm.swap_pager
    meta = pager.meta
    npages = shadow.npages
    # 1. Backing pages the shadow hides (resident or with data on swap in the
    #    shadow, or outside its window) are dropped; their swap blocks go in
    #    step 2. A reserved block that was never written hides nothing.
    survivors = []
    for pindex, page in list(backing.pages.items()):
        d = pindex - offset
        if not 0 <= d < npages or d in shadow.pages or pager.has_page(shadow, d):
            vm.free_page(page)
        else:
            survivors.append(page)
    # 2. swap_pager_copy: the backing object's blocks move up where the shadow
    #    has neither a block nor a resident page; the others are freed. Where
    #    the shadow holds only an unwritten reservation, the backing's block
    #    (the data) takes the reserved block's place and stays reserved.
    state = shadow.reserve_state
    adopted: list[int] = []
    if state is not None and backing.swap_backed:
        for pindex, _blk in meta.pages(backing.oid):
            d = pindex - offset
            if 0 <= d < npages and state[d] == RESERVED_UNWRITTEN and d not in shadow.pages:
                meta.free(shadow.oid, d)
                adopted.append(d)
    if backing.swap_backed:
        meta.transfer(backing.oid, shadow.oid, offset, npages, lambda d: d in shadow.pages)
        shadow.swap_backed = True
        backing.swap_backed = False
    if state is not None:
        for d in adopted:
            state[d] = RESERVED_WRITTEN
    # 3. The surviving pages move up, each with its swap copy (if any) from step 2;
    #    one landing on an unwritten reservation has its data nowhere else.
    for page in survivors:
        del backing.pages[page.pindex]
        page.pindex -= offset
        page.obj = shadow
        shadow.pages[page.pindex] = page
        if state is not None and state[page.pindex] == RESERVED_UNWRITTEN:
            page.dirty = True
    # 4. The shadow takes the backing object's place in the chain.
    shadow.backing = backing.backing
    shadow.backing_offset = offset + backing.backing_offset
    if backing.backing is not None:
        backing.backing.shadows.remove(backing)
        backing.backing.shadows.append(shadow)
    backing.backing = None
    backing.shadows = []
    backing.refcount = 0
    vm.destroy_object(backing)
    vm.counters.collapses += 1


def check_chains(vm: Kernel, objects: dict[int, VMObject]) -> list[str]:
    """Invariants of the shadow chains."""
    problems: list[str] = []
    for obj in objects.values():
        if obj.internal or obj.kind is ObjectKind.ANONYMOUS:
            refcount_ok = obj.refcount == (len(obj.shadows) if obj.internal else 1)
        else:  # a pager's object (vnode): its maps and its shadows
            refcount_ok = obj.refcount >= max(1, len(obj.shadows))
        if not refcount_ok:
            problems.append(
                f"object {obj.oid}: refcount {obj.refcount} but {len(obj.shadows)} shadows"
            )
        for shadow in obj.shadows:
            if shadow.backing is not obj:
                problems.append(f"object {obj.oid}: shadow {shadow.oid} backs onto another")
        if obj.internal and obj.refcount < 2:
            problems.append(f"object {obj.oid}: backing object with one shadow not collapsed")
        depth = 0
        level = obj.backing
        while level is not None:
            if level.oid not in objects:
                problems.append(f"object {obj.oid}: backing object {level.oid} is gone")
                break
            if obj not in level.shadows and depth == 0:
                problems.append(f"object {obj.oid}: not among its backing's shadows")
            depth += 1
            if depth > len(objects):
                problems.append(f"object {obj.oid}: cycle in its shadow chain")
                break
            level = level.backing
    return problems
