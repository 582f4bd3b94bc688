"""vmpager.memmap: a file as a numpy array within a memory budget."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

import vmpager
from vmpager.mapped import flush
from vmpager.testing.mapped import UNAVAILABLE

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE)),
]

N = 256 * 1024  # int64 items: 2 MiB, 8x the budget
BUDGET = "256K"


def _file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(3).integers(0, 1 << 40, N)
    path = tmp_path / "data.bin"
    data.tofile(path)
    return path, data


def test_r_plus_changes_reach_the_file(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    a = vmpager.memmap(path, "int64", mode="r+", memory=BUDGET)
    assert a.shape == (N,) and int(a.sum()) == int(data.sum())
    a[::1000] += 1
    data[::1000] += 1
    a[-3:] = [7, 8, 9]
    data[-3:] = [7, 8, 9]
    flush(a)
    assert np.array_equal(np.fromfile(path, np.int64), data)
    a[5] = -1
    data[5] = -1
    del a
    gc.collect()  # the last view gone: the pager flushes and stops
    assert np.array_equal(np.fromfile(path, np.int64), data)


def test_r_is_read_only_and_c_never_writes_the_file(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    r = vmpager.memmap(path, "int64", (N // 2,), mode="r", memory=BUDGET)
    assert np.array_equal(r, data[: N // 2])
    with pytest.raises(ValueError, match="read-only"):
        r[0] = 1
    c = vmpager.memmap(path, "int64", mode="c", memory=BUDGET)
    c[:] = 0
    assert not c.any()
    del r, c
    gc.collect()
    assert np.array_equal(np.fromfile(path, np.int64), data)


def test_w_plus_creates_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "new.bin"
    w = vmpager.memmap(path, "float32", (512, 300), mode="w+", memory=BUDGET)
    w[:, 7] = 2.5
    del w
    gc.collect()
    back = np.fromfile(path, np.float32).reshape(512, 300)
    assert (back[:, 7] == 2.5).all() and back.sum() == 2.5 * 512
    with pytest.raises(ValueError, match="mode"):
        vmpager.memmap(path, mode="a")
    with pytest.raises(ValueError, match="bytes"):
        vmpager.memmap(path, "float32", (513, 300), mode="r")
    with pytest.raises(ValueError, match="shape is required"):
        vmpager.memmap(tmp_path / "x.bin", mode="w+")
