"""Mapped arrays against plain numpy arrays, the budget seen from outside, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vmpager.mapped.client import PagerProcess
from vmpager.testing.mapped import PS, memfd_bytes, region_rss, rollup

pytestmark = pytest.mark.timeout(120)

BUDGET = 256 * 1024  # the pager fixture's


def test_array_is_zero_filled_numpy_and_coherent_with_the_object(pager: PagerProcess) -> None:
    a = pager.array((300, 100), "int32", order="F")
    assert isinstance(a, np.ndarray) and a.flags.f_contiguous and a.flags.writeable
    assert not a.any()
    obj = pager.object_of(a[10:, 3])
    assert obj.size >= a.nbytes and pager.object_of(a) is obj
    a[5, 7] = 12345
    offset = (7 * 300 + 5) * 4
    assert np.frombuffer(obj.read(offset, 4), np.int32)[0] == 12345
    obj.write(offset, np.int32(-9).tobytes())
    assert a[5, 7] == -9
    pager.check()


def test_numpy_operations_on_arrays_larger_than_the_budget(pager: PagerProcess) -> None:
    rng = np.random.default_rng(1)
    n = 6 * BUDGET // 8  # each array is 6x the budget
    a = pager.array(n)
    b = pager.array(n)
    ref = rng.standard_normal(n)
    a[:] = ref
    assert a.sum() == ref.sum()
    assert np.array_equal(np.cumsum(a), np.cumsum(ref))
    np.copyto(b, a)
    assert np.array_equal(b, ref)
    b.sort()
    assert np.array_equal(b, np.sort(ref))
    m = a.reshape(-1, 384)[:384]
    assert np.allclose(m @ m.T, ref.reshape(-1, 384)[:384] @ ref.reshape(-1, 384)[:384].T)
    stats = pager.statistics()
    assert stats.pageout_pages > 0 and stats.pagein_pages > 0
    assert stats.resident_npages <= stats.nframes
    pager.check()


def test_budget_from_outside(pager: PagerProcess) -> None:
    pid = pager.pid
    before = rollup(pid)
    a = pager.array(4 * BUDGET // 8)
    base = a.__array_interface__["data"][0]
    for value in (1.0, 2.0):
        a[:] = value
        assert a.sum() == value * len(a)
        used = memfd_bytes(pid)
        after = rollup(pid)
        assert used <= BUDGET
        assert region_rss(base, a.nbytes) <= BUDGET
        # The pager's own memory: its frames (anonymous) and the memfd pages they
        # alias; the bound on both together is the budget (plus interpreter slack).
        grown = after["Anonymous"] - before["Anonymous"] + used
        assert grown <= BUDGET + (2 << 20), (before, after, used)
    pager.check()


def test_writes_through_the_object_and_the_array_meet(pager: PagerProcess) -> None:
    a = pager.array(8 * BUDGET // 8, "uint8")
    obj = pager.object_of(a)
    ref = np.zeros(len(a), np.uint8)
    rng = np.random.default_rng(2)
    for step in range(60):
        start = int(rng.integers(0, len(a) - 3 * PS))
        length = int(rng.integers(1, 3 * PS))
        data = rng.integers(0, 256, length, dtype=np.uint8)
        if step % 2:
            obj.write(start, data.tobytes())
        else:
            a[start : start + length] = data
        ref[start : start + length] = data
        probe = int(rng.integers(0, len(a) - PS))
        assert obj.read(probe, PS) == ref[probe : probe + PS].tobytes()
        assert np.array_equal(a[probe : probe + PS], ref[probe : probe + PS])
    assert np.array_equal(a, ref)
    pager.check()


def test_four_threads_on_one_array(pager: PagerProcess) -> None:
    n = 4 * BUDGET // 8
    a = pager.array(n, "int64")
    parts = np.array_split(np.arange(n), 4)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            idx = parts[k]
            for rnd in range(3):
                a[idx] = idx * (k + 1) + rnd
                a[idx[::7]] += 1  # fancy indexing: read-modify-write
                a[idx[::7]] -= 1
                assert np.array_equal(a[idx], idx * (k + 1) + rnd)
                # Read another thread's part too: whatever it holds must be one
                # of that thread's values, never zeros left by a lost page.
                other = parts[(k + 1) % 4]
                seen = a[other[::97]]
                base = other[::97] * ((k + 1) % 4 + 1)
                assert np.all((seen == 0) | ((seen - base) >= 0) & ((seen - base) <= 3))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(4):
        assert np.array_equal(a[parts[k]], parts[k] * (k + 1) + 2)
    pager.check()


def test_discard_and_clone(pager: PagerProcess) -> None:
    a = pager.array(3 * BUDGET // 8, "int64")
    obj = pager.object_of(a)
    a[:] = np.arange(len(a))
    snap = obj.clone()
    obj.discard(PS, 5 * PS + 24)
    assert not a[PS // 8 : (6 * PS + 24) // 8].any()
    assert a[(6 * PS + 24) // 8] == (6 * PS + 24) // 8
    a[0] = -1
    assert np.frombuffer(snap.read(0, 16), np.int64).tolist() == [0, 1]
    copy = np.frombuffer(snap.map(), np.int64)
    assert np.array_equal(copy, np.arange(len(a)))
    copy[3] = 7
    assert a[3] == 3 and copy[3] == 7
    pager.check()


def test_dropping_the_last_view_unmaps(pager: PagerProcess) -> None:
    import gc

    a = pager.array(2 * BUDGET // 8)
    a[:] = 3.0
    obj = pager.object_of(a)
    view = a[10:20]
    del a
    gc.collect()
    assert pager.info()["memfd_bytes"] > 0  # a slice still holds the mapping
    assert view.sum() == 30.0
    del view
    gc.collect()
    info = pager.info()
    assert info["memfd_bytes"] == 0 and info["bound_npages"] == 0
    assert np.frombuffer(obj.read(0, 8), np.float64)[0] == 3.0  # the object lives on
    again = np.frombuffer(obj.map(), np.float64)
    assert again[len(again) // 2] == 3.0
    pager.check()


def test_bound_page_cap_keeps_the_rest_inactive() -> None:
    from vmpager.testing.mapped import UNAVAILABLE

    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    with PagerProcess("256K", bound_limit=8) as pager:
        a = pager.array(BUDGET // 8 // 2, "int64")  # fits the budget, not the cap
        a[:] = np.arange(len(a))
        for _ in range(2):
            assert a.sum() == np.arange(len(a)).sum()
        info = pager.info()
        assert info["bound_npages"] <= 8 and info["memfd_bytes"] <= 8 * PS
        assert info["soft_faults"] > 0  # pages came back from the inactive queue
        assert pager.statistics().pagein_pages == 0  # ... without any I/O
        pager.check()


def test_a_write_through_the_array_is_seen_by_the_next_call(pager: PagerProcess) -> None:
    # The pager's call path reads frames without the VM lock: the faulting thread
    # must not run on before its page's frame is the shared page (once failed 9
    # times in 20 on a page faulted after a soft fault).
    for _ in range(20):
        obj = pager.allocate(16 * PS)
        obj.write(3 * PS + 5, b"hello")
        view = obj.map()
        assert bytes(view[3 * PS + 5 : 3 * PS + 10]) == b"hello"  # a soft fault
        a = np.frombuffer(view, np.uint8)
        a[100] = 7  # a new page, zero-filled
        assert obj.read(100, 1) == b"\x07"
        del a, view
        obj.close()


def test_streams_drop_clean_pages_and_keep_written_ones() -> None:
    """A read stream over more than memory gives up the clean pages it leaves behind
    without writing them (their swap copy is valid); pages written meanwhile, through
    the array or the object, keep their new contents."""
    from vmpager.testing.mapped import UNAVAILABLE

    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    budget = 4 << 20
    with PagerProcess("4M") as pager:
        n = 4 * budget // 8
        a = pager.array(n)
        obj = pager.object_of(a)
        ref = np.random.default_rng(3).standard_normal(n)
        a[:] = ref
        for _ in range(2):
            assert a.sum() == ref.sum()
        dropped = pager.info()["dropped"]
        assert dropped > n // 512 // 2  # most of the second sum's pages
        written = pager.statistics().pageout_pages
        assert a.sum() == ref.sum()
        # A read-only pass writes (almost) nothing back: the read-as-write mode the
        # fill left on is turned off by the probes of the first windows.
        assert pager.statistics().pageout_pages - written < n // 512 // 4
        a[:: 512 * 7] += 1.0  # a write fault in some pages (clean, maybe bound)
        ref[:: 512 * 7] += 1.0
        obj.write(8 * 5000, np.float64(42.0).tobytes())
        ref[5000] = 42.0
        assert a.sum() == ref.sum()
        assert np.array_equal(a, ref)
        assert memfd_bytes(pager.pid) <= budget
        pager.check()


def test_daemon_unbinds_the_bound_pages_it_deactivates_in_runs(pager: PagerProcess) -> None:
    """Bound pages the page daemon deactivates in one aging pass are unbound together,
    in runs of consecutive pages (fewer runs than pages), and keep every byte: the
    array and the object's calls agree afterwards."""
    npages = 40  # fits the 64-frame budget, all bound
    a = pager.array(npages * PS, "uint8")
    obj = pager.object_of(a)
    ref = np.random.default_rng(11).integers(0, 256, npages * PS, dtype=np.uint8)
    a[:] = ref  # binds every page, written
    before = pager.info()
    assert before["bound_npages"] == npages
    # Pressure through calls on another object: the daemon ages the active queue
    # until the array's pages reach zero activity and leave it.
    other = pager.allocate(256 * PS)
    for _ in range(6):
        for i in range(256):
            other.write(i * PS, bytes([i % 251 + 1]) * 64)
        if pager.info()["daemon_unbinds"] - before["daemon_unbinds"] >= npages // 2:
            break
    after = pager.info()
    unbound = after["daemon_unbinds"] - before["daemon_unbinds"]
    assert unbound >= npages // 2
    runs = after["unbind_runs"] - before["unbind_runs"]
    assert runs < unbound  # together, not one at a time
    assert after["bound_npages"] < npages
    assert obj.read(0, npages * PS) == ref.tobytes()  # through the VM's frames
    assert np.array_equal(a, ref)  # through the array: faults bind them again
    assert obj.read(0, npages * PS) == ref.tobytes()
    for i in (0, 100, 255):
        assert other.read(i * PS, 64) == bytes([i % 251 + 1]) * 64
    pager.check()
