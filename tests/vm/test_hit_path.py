"""The hit paths of ``VMObject.read`` and ``VMObject.write`` keep the slow path's semantics.

The read copies without the lock and keeps the copy only if the page stayed;
the write takes the lock itself (acquire/release) and makes a clean page dirty
in place unless the read reserve is reached. These tests check what those
shortcuts must not change: the contents against a model while the page daemon
pages the same pages out and in (a race on a tiny budget), the dirty count,
the ``referenced`` bit, the read reserve, closed objects and argument errors.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpager import ObjectClosed
from vmpager.testing.worlds import PAGE, small_vm

pytestmark = pytest.mark.timeout(180)

NPAGES = 16


def _clean_resident(nframes: int = 8) -> tuple[object, object]:
    """A VM and an object whose page 0 is resident and clean (paged back in)."""
    vm, _ = small_vm(nframes, 64)
    obj = vm.allocate(NPAGES * PAGE)
    for p in range(NPAGES):
        obj.write(p * PAGE, bytes([p + 1]) * PAGE)
    assert 0 not in obj.pages  # paged out by the later writes
    assert obj.read(0, 1) == b"\x01"
    return vm, obj


def test_write_hit_makes_a_clean_page_dirty_and_counts_it() -> None:
    vm, obj = _clean_resident()
    with vm:
        page = obj.pages[0]
        assert not page.dirty
        before = obj.kernel.ndirty
        page.referenced = False
        assert obj.write(8, b"abcdefgh") == 8
        assert obj.pages[0] is page and page.dirty and page.referenced
        assert obj.kernel.ndirty == before + 1
        assert obj.read(0, 16) == b"\x01" * 8 + b"abcdefgh"
        vm.check()


def test_read_hit_sets_referenced() -> None:
    vm, obj = _clean_resident()
    with vm:
        page = obj.pages[0]
        page.referenced = False
        assert obj.read(5, 3) == b"\x01\x01\x01"
        assert page.referenced


def test_write_hit_at_the_read_reserve_leaves_the_reserve_clean() -> None:
    # Every frame but the reserve holds a dirty page; a write to a clean page
    # must not dirty the reserve: the slow path launders first.
    vm, _ = small_vm(8, 64)
    with vm:
        obj = vm.allocate(NPAGES * PAGE)
        kernel = obj.kernel
        for p in range(NPAGES):
            obj.write(p * PAGE, bytes([p + 1]) * PAGE)
        for p in range(NPAGES):
            assert obj.read(p * PAGE, 1) == bytes([p + 1])
            obj.write(p * PAGE + 1, b"x")
            free = kernel.frames.free_nframes
            dirty_room = kernel.frames.nframes - kernel.ndirty
            assert free > kernel.read_reserve or dirty_room >= kernel.read_reserve
            vm.check()
        for p in range(NPAGES):
            assert obj.read(p * PAGE, 2) == bytes([p + 1]) + b"x"


def test_closed_object_and_bad_arguments() -> None:
    vm, obj = _clean_resident()
    with vm:
        with pytest.raises(ValueError, match="offset"):
            obj.write(-1, b"a")
        with pytest.raises(ValueError, match="length"):
            obj.write(NPAGES * PAGE - 1, b"ab")
        with pytest.raises(TypeError, match="str"):
            obj.write(0, "a")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="offset"):
            obj.read(-PAGE, 1)
        with pytest.raises(ValueError, match="length"):
            obj.read(0, -1)
        obj.close()
        with pytest.raises(ObjectClosed):
            obj.write(0, b"a")
        with pytest.raises(ObjectClosed):
            obj.read(0, 1)


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, NPAGES - 1), st.integers(0, PAGE // 8 - 1)),
        min_size=50,
        max_size=400,
    )
)
def test_hit_paths_race_the_page_daemon(ops: list[tuple[int, int]]) -> None:
    """8-byte read-modify-writes (the access loop) on a tiny budget while another
    thread's writes make the daemon thread page the same pages out and in: every
    word ends as the model says, and the invariants (dirty count included) hold."""
    vm, _ = small_vm(6, 256, daemon_thread=True)
    with vm:
        obj = vm.allocate(NPAGES * PAGE)
        other = vm.allocate(NPAGES * PAGE)
        model: dict[int, int] = {}
        stop = threading.Event()
        errors: list[BaseException] = []

        def pressure() -> None:
            try:
                i = 0
                while not stop.is_set():
                    other.write((i % NPAGES) * PAGE, i.to_bytes(8, "little"))
                    i += 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=pressure)
        thread.start()
        try:
            for pindex, word in ops:
                offset = pindex * PAGE + word * 8
                value = int.from_bytes(obj.read(offset, 8), "little")
                assert value == model.get(offset, 0)
                obj.write(offset, (value + 1).to_bytes(8, "little"))
                model[offset] = value + 1
        finally:
            stop.set()
            thread.join()
        assert not errors
        for offset, value in model.items():
            assert int.from_bytes(obj.read(offset, 8), "little") == value
        vm.check()
