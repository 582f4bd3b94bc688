"""A multi-GiB sparse file through a small budget, and concurrent readers.

The big file is sparse (made with truncate), so the test is fast: it reads a
sample of pages and scans a few tens of MiB sequentially.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from vmpager.testing.worlds import PAGE, small_vm

GIB = 1 << 30


def test_sparse_multi_gib_file_through_a_small_budget(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    size = 6 * GIB + 1234
    with open(path, "wb") as f:
        f.truncate(size)
    npages = -(-size // PAGE)
    rng = random.Random(11)
    marked = {p: rng.randbytes(64) for p in rng.sample(range(npages - 1), 64)}
    fd = os.open(path, os.O_WRONLY)
    try:
        for pindex, mark in marked.items():
            os.pwrite(fd, mark, pindex * PAGE + 100)
    finally:
        os.close(fd)
    # The page daemon frees well ahead (free target 24 of 64 frames), which
    # leaves read-ahead frames to take.
    vm, _ = small_vm(nframes=64, swap_nblocks=16, readaround_npages=8, free_target_nframes=24)
    with vm:
        obj = vm.map_file(path, "r+")
        assert obj.size == size
        sample = list(marked) + rng.sample(range(npages), 200) + [npages - 1]
        for pindex in sample:
            got = obj.read(pindex * PAGE, min(PAGE, size - pindex * PAGE))
            mark = marked.get(pindex)
            expected = bytearray(len(got))
            if mark is not None:
                expected[100:164] = mark
            assert got == bytes(expected), pindex
        vm.check()
        # A sequential scan of 48 MiB starting in the middle: read-ahead at work.
        start = 3 * GIB
        buf = bytearray(1 << 20)
        before = vm.vnode_pager.statistics()
        for i in range(48):
            offset = start + i * len(buf)
            obj.readinto(offset, buf)
            expected = bytearray(len(buf))
            for pindex, mark in marked.items():
                at = pindex * PAGE + 100 - offset
                if 0 <= at < len(buf):
                    expected[at : at + 64] = mark
            assert buf == expected, offset
        after = vm.vnode_pager.statistics()
        npages_scanned = 48 * (1 << 20) // PAGE
        assert after.pagein_pages - before.pagein_pages >= npages_scanned
        # Clustered reads; in this daemon-less world the scan frees frames only
        # when none is left, and the last few faults before that read one page.
        assert after.pageins - before.pageins <= npages_scanned // 3
        assert vm.statistics().resident_npages <= 64
        # Writes far apart, then flush: the file has them and stays sparse.
        writes = {p: rng.randbytes(32) for p in rng.sample(range(npages - 1), 40)}
        for pindex, data in writes.items():
            obj.write(pindex * PAGE + 7, data)
        obj.flush()
        vm.check()
    assert os.path.getsize(path) == size
    assert os.stat(path).st_blocks * 512 < 64 << 20
    with open(path, "rb") as f:
        for pindex, data in writes.items():
            f.seek(pindex * PAGE + 7)
            assert f.read(32) == data


def test_concurrent_readers_and_a_writer(tmp_path: Path) -> None:
    npages = 96
    path = tmp_path / "shared"
    data = random.Random(5).randbytes(npages * PAGE)
    path.write_bytes(data)
    vm, _ = small_vm(nframes=12, swap_nblocks=16, daemon_thread=True)
    failures: list[BaseException] = []
    written = {p: bytes([p % 251 + 1]) * 16 for p in range(0, npages, 7)}

    with vm:
        obj = vm.map_file(path, "r+")

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(1500):
                    pindex = rng.randrange(npages)
                    if pindex in written:
                        continue  # being rewritten by the writer
                    off = pindex * PAGE + rng.randrange(PAGE - 64)
                    got = obj.read(off, 64)
                    assert got == data[off : off + 64], (seed, pindex)
            except BaseException as exc:
                failures.append(exc)

        def writer() -> None:
            try:
                for pindex, mark in written.items():
                    obj.write(pindex * PAGE, mark)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a thread did not finish within 60 s"
        assert not failures, failures
        obj.flush()
        vm.check()
    expected = bytearray(data)
    for pindex, mark in written.items():
        expected[pindex * PAGE : pindex * PAGE + 16] = mark
    assert path.read_bytes() == bytes(expected)
