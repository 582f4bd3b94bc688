"""Batched calls: read_words / write_words / read_pages / write_pages (vm/batch.py).

Against plain numpy models: objects larger than memory on RAM swap and on a
real O_DIRECT swap file, with the daemon thread and without; duplicates keep
the last value; read errors raise and lose nothing; clones, file objects and
strategy requests take the fault path; bad arguments are refused by name; a
Hypothesis state machine mixes batched and single calls with page-outs and
``check()`` after every step.
"""

from __future__ import annotations

import threading
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmpager import VM, DeviceError
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import VMConfig

pytestmark = pytest.mark.timeout(120)

WORDS = PAGE // 8


def filled(npages: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, (npages, WORDS), dtype=np.uint64)


def batched_roundtrip(vm: VM, npages: int) -> None:
    """Fill through write_pages, then random words read and written back plus one."""
    obj = vm.allocate(npages * PAGE)
    model = filled(npages)
    obj.write_pages(np.arange(npages), model)
    rng = np.random.default_rng(2)
    for _ in range(6):
        pages = rng.integers(0, npages, 3 * npages // 4)
        words = rng.integers(0, WORDS, len(pages))
        offsets = pages * PAGE + words * 8
        got = obj.read_words(offsets)
        assert np.array_equal(got, model[pages, words])
        uniq, first = np.unique(offsets, return_index=True)
        obj.write_words(uniq, got[first] + np.uint64(1))
        model[pages[first], words[first]] += np.uint64(1)
        vm.check()
    assert np.array_equal(obj.read_pages(np.arange(npages)).view(np.uint64), model)
    # Whole pages in a scrambled order, some twice.
    order = rng.permutation(np.concatenate([np.arange(npages), np.arange(0, npages, 7)]))
    assert np.array_equal(obj.read_pages(order).view(np.uint64), model[order])
    vm.check()


def test_ram_swap_four_times_memory() -> None:
    vm, _ = small_vm(nframes=64, swap_nblocks=1024, batch_max_npages=48)
    with vm:
        batched_roundtrip(vm, 256)
        stats = vm.statistics()
        assert stats.pageins > 0 and stats.pageout_pages > 0


def test_daemon_thread_and_swap_file(tmp_path: Path) -> None:
    """The default policies, the daemon thread and a real O_DIRECT file."""
    device = FileDevice(tmp_path / "swap", 4096)
    with VM(memory=128 * PAGE, swap=[device]) as vm:
        batched_roundtrip(vm, 1024)
        stats = vm.statistics()
        assert stats.pageins > 0 and stats.pageout_pages > 0
        assert device.direct


def test_concurrent_reads_are_grouped_into_runs() -> None:
    """Pages paged out together come back in runs, several reads in flight."""
    vm, _ = small_vm(nframes=256, swap_nblocks=1024, cluster_max_npages=64)
    with vm:
        obj = vm.allocate(512 * PAGE)
        model = filled(512)
        obj.write_pages(np.arange(512), model)
        vm.pageout(256)
        before = vm.statistics()
        assert np.array_equal(obj.read_pages(np.arange(0, 128)).view(np.uint64), model[:128])
        after = vm.statistics()
        ios = after.pageins - before.pageins
        pages = after.pagein_pages - before.pagein_pages
        assert pages >= 100 and ios <= pages // 16  # runs, not single pages


def test_duplicates_keep_the_last_value() -> None:
    vm, _ = small_vm(nframes=16, swap_nblocks=128)
    with vm:
        obj = vm.allocate(32 * PAGE)
        obj.write_words([8, 16, 8, 8, 40 * PAGE // 8 * 0 + 24], [1, 2, 3, 4, 5])
        assert obj.read_words([8, 16, 24, 8]).tolist() == [4, 2, 5, 4]
        rows = np.stack([np.full(PAGE, v, dtype=np.uint8) for v in (7, 8, 9)])
        obj.write_pages([3, 5, 3], rows)
        pages = obj.read_pages([3, 5])
        assert (pages[0] == 9).all() and (pages[1] == 8).all()
        # Never-written pages read as zeros, and are not made resident dirty.
        assert obj.read_words([31 * PAGE]).tolist() == [0]
        assert not obj.read_pages([30]).any()
        vm.check()


def test_empty_calls() -> None:
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.allocate(4 * PAGE)
        assert obj.read_words([]).shape == (0,)
        assert obj.read_pages(np.array([], dtype=np.int64)).shape == (0, PAGE)
        obj.write_words([], [])
        obj.write_pages([], np.empty((0, PAGE), dtype=np.uint8))
        vm.check()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda o: o.read_words([4]), "offsets must be multiples of 8"),
        (lambda o: o.read_words([-8]), r"offsets must be in \[0, 32760\], got -8"),
        (lambda o: o.read_words([32768]), r"offsets must be in \[0, 32760\], got 32768"),
        (lambda o: o.read_words([[0]]), "offsets must be a 1-D sequence of integers"),
        (lambda o: o.read_words([0.0]), "offsets must be a 1-D sequence of integers"),
        (lambda o: o.read_words(np.array([2**64 - 8], dtype=np.uint64)), "offsets must be in"),
        (lambda o: o.write_words([0], [-1]), r"values must be in \[0, 2\*\*64\), got -1"),
        (lambda o: o.write_words([0, 8], [1]), "values must be 2 integers"),
        (lambda o: o.write_words([0], [1.5]), "values must be 1 integers"),
        (lambda o: o.read_pages([8]), r"pindices must be in \[0, 7\], got 8"),
        (lambda o: o.write_pages([0], np.zeros((1, 100), np.uint8)), "data must be 1 rows"),
        (lambda o: o.write_pages([0, 1], np.zeros((1, PAGE), np.uint8)), "data must be 2 rows"),
    ],
)
def test_bad_arguments_are_refused_by_name(call: object, message: str) -> None:
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.allocate(8 * PAGE)
        with pytest.raises((ValueError, TypeError), match=message):
            call(obj)  # type: ignore[operator]
        vm.check()


def test_write_pages_takes_other_dtypes_as_bytes() -> None:
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.allocate(4 * PAGE)
        rows = np.arange(2 * WORDS, dtype=np.uint64).reshape(2, WORDS)
        obj.write_pages([1, 2], rows)
        assert np.array_equal(obj.read_pages([1, 2]).view(np.uint64), rows)


def test_read_error_raises_and_loses_nothing() -> None:
    vm, devices = small_vm(nframes=16, swap_nblocks=256, faulty=True)
    with vm:
        obj = vm.allocate(64 * PAGE)
        model = filled(64)
        obj.write_pages(np.arange(64), model)
        vm.pageout(16)
        vm.pageout(16)
        swapped = [p for p in range(64) if p not in obj.pages]
        assert swapped
        victim = swapped[len(swapped) // 2]
        devices[0].fail_reads([vm.swap_pager.meta.lookup(obj.oid, victim)])
        with pytest.raises(DeviceError):
            obj.read_words(np.arange(64) * PAGE)
        vm.check()
        devices[0].clear_faults()
        assert np.array_equal(obj.read_pages(np.arange(64)).view(np.uint64), model)
        vm.check()


def test_clone_and_file_objects_take_the_fault_path(tmp_path: Path) -> None:
    vm, _ = small_vm(nframes=16, swap_nblocks=256)
    with vm:
        obj = vm.allocate(40 * PAGE)
        model = filled(40)
        obj.write_pages(np.arange(40), model)
        clone = obj.clone()
        clone.write_words([0, PAGE], [11, 12])
        assert clone.read_words([0, PAGE, 2 * PAGE]).tolist() == [11, 12, int(model[2, 0])]
        assert obj.read_words([0, PAGE]).tolist() == [int(model[0, 0]), int(model[1, 0])]
        assert np.array_equal(clone.read_pages(np.arange(2, 40)).view(np.uint64), model[2:])
        vm.check()
        path = tmp_path / "data"
        path.write_bytes(model[:8].tobytes())
        fobj = vm.map_file(path, "r+")
        assert np.array_equal(fobj.read_pages(np.arange(8)).view(np.uint64), model[:8])
        fobj.write_words([8], [99])
        fobj.close()
        assert np.frombuffer(path.read_bytes(), dtype=np.uint64)[1] == 99
        vm.check()


def test_threads_batching_disjoint_ranges_with_the_daemon() -> None:
    cfg = VMConfig(batch_max_npages=64)
    with VM(memory=96 * PAGE, swap=[MemoryDevice(2048, PAGE)], config=cfg) as vm:
        objs = [vm.allocate(256 * PAGE) for _ in range(3)]
        models = [filled(256, seed=i) for i in range(3)]
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                obj, model = objs[i], models[i]
                obj.write_pages(np.arange(256), model)
                rng = np.random.default_rng(i)
                for _ in range(20):
                    pages = np.unique(rng.integers(0, 256, 100))
                    values = obj.read_words(pages * PAGE)
                    assert np.array_equal(values, model[pages, 0])
                    obj.write_words(pages * PAGE, values + np.uint64(1))
                    model[pages, 0] += np.uint64(1)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for obj, model in zip(objs, models, strict=True):
            assert np.array_equal(obj.read_pages(np.arange(256)).view(np.uint64), model)
        vm.check()


class BatchModel(RuleBasedStateMachine):
    """Batched and single calls on one object against a numpy model."""

    NPAGES = 24

    def __init__(self) -> None:
        super().__init__()
        self.vm, _ = small_vm(nframes=10, swap_nblocks=96, batch_max_npages=5)
        self.obj = self.vm.allocate(self.NPAGES * PAGE)
        self.model = np.zeros((self.NPAGES, WORDS), dtype=np.uint64)

    def teardown(self) -> None:
        self.vm.close()

    pages = st.lists(st.integers(0, NPAGES - 1), max_size=30)

    @rule(pages=pages, word=st.integers(0, WORDS - 1), value=st.integers(0, 2**64 - 1))
    def write_words(self, pages: list[int], word: int, value: int) -> None:
        offsets = np.array(pages, dtype=np.int64) * PAGE + word * 8
        values = (np.arange(len(pages), dtype=np.uint64) + np.uint64(value)).astype(np.uint64)
        self.obj.write_words(offsets, values)
        for p, v in zip(pages, values.tolist(), strict=True):
            self.model[p, word] = v

    @rule(pages=pages, word=st.integers(0, WORDS - 1))
    def read_words(self, pages: list[int], word: int) -> None:
        offsets = np.array(pages, dtype=np.int64) * PAGE + word * 8
        assert self.obj.read_words(offsets).tolist() == self.model[pages, word].tolist()

    @rule(pages=pages, fill=st.integers(0, 255))
    def write_pages(self, pages: list[int], fill: int) -> None:
        rows = np.full((len(pages), PAGE), fill, dtype=np.uint8)
        rows[:, 0] = np.arange(len(pages), dtype=np.uint8)
        self.obj.write_pages(pages, rows)
        for p, row in zip(pages, rows, strict=True):
            self.model[p] = row.view(np.uint64)

    @rule(pages=pages)
    def read_pages(self, pages: list[int]) -> None:
        got = self.obj.read_pages(pages).view(np.uint64)
        assert np.array_equal(got, self.model[pages])

    @rule(page=st.integers(0, NPAGES - 1), value=st.integers(0, 2**64 - 1))
    def single_write(self, page: int, value: int) -> None:
        self.obj.write(page * PAGE + 8, value.to_bytes(8, "little"))
        self.model[page, 1] = value

    @rule(page=st.integers(0, NPAGES - 1))
    def single_read(self, page: int) -> None:
        assert self.obj.read(page * PAGE, PAGE) == self.model[page].tobytes()

    @rule(page=st.integers(0, NPAGES - 1))
    def discard(self, page: int) -> None:
        self.obj.discard(page * PAGE, PAGE)
        self.model[page] = 0

    @rule(npages=st.integers(1, 10))
    def pageout(self, npages: int) -> None:
        self.vm.pageout(npages)

    @invariant()
    def consistent(self) -> None:
        self.vm.check()


TestBatchModel = BatchModel.TestCase
TestBatchModel.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("stream", [True, False])
def test_consecutive_batched_writes_leave_their_past_to_the_daemon(stream: bool) -> None:
    """A written chunk continuing the last one hands back what is a window behind."""
    vm, _ = small_vm(
        nframes=64,
        swap_nblocks=256,
        batch_max_npages=8,
        sequential_readahead=stream,
        readahead_max_npages=4,
    )
    with vm:
        obj = vm.allocate(32 * PAGE)
        for first in (0, 8, 16):  # three chunks of one call each, in order
            pages = np.arange(first, first + 8)
            obj.write_words(pages * PAGE, pages.astype(np.uint64))
        head = [p.pindex for p in list(vm.queues.inactive)[:8]]
        if stream:
            # The third chunk gave back the 8 pages 4 behind its start: 4..11.
            assert sorted(head) == list(range(4, 12))
            assert not any(obj.pages[p].referenced for p in head)
        else:
            assert not head  # nothing deactivated without the stream rule
        assert obj.read_words(np.arange(24) * PAGE).tolist() == list(range(24))
        vm.check()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_read_depth", 0, r"config.batch_read_depth must be .*1"),
        ("batch_read_depth", 257, r"config.batch_read_depth must be .*256"),
        ("batch_max_npages", 0, r"config.batch_max_npages must be"),
    ],
)
def test_bad_batch_config_is_refused_by_name(field: str, value: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VM(memory=64 * PAGE, swap=[MemoryDevice(64, PAGE)], config=VMConfig(**{field: value}))


def test_file_and_device_objects_keep_their_own_rules(tmp_path: Path) -> None:
    """Read-only mappings refuse batched writes; device memory is written itself."""
    vm, _ = small_vm(nframes=16, swap_nblocks=64)
    with vm:
        path = tmp_path / "data"
        path.write_bytes(bytes(4 * PAGE))
        ro = vm.map_file(path, "r")
        with pytest.raises(PermissionError):
            ro.write_words([0], [1])
        with pytest.raises(PermissionError):
            ro.write_pages([0], np.zeros((1, PAGE), np.uint8))
        assert ro.read_words([0, 8]).tolist() == [0, 0]
        memory = bytearray(3 * PAGE + 100)  # a partial last page
        dev = vm.map_device(memory)
        dev.write_words([0, PAGE, 8, 0], [5, 6, 7, 8])
        words = np.frombuffer(memory, dtype=np.uint64, count=3 * WORDS)
        assert words[[0, 1, WORDS]].tolist() == [8, 7, 6]
        assert dev.read_words([0, 8, PAGE]).tolist() == [8, 7, 6]
        last = dev.read_pages([3])[0]
        assert not last.any()  # 100 zero bytes, then past the end
        dev.write_pages([1, 1], np.stack([np.full(PAGE, 1, np.uint8), np.full(PAGE, 2, np.uint8)]))
        assert memory[PAGE : 2 * PAGE] == bytes([2]) * PAGE
        vm.check()
        ro.close()
