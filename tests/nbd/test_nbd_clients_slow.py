"""A few-hundred-MiB image through real clients (slow: run with -m slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.testing.nbd import run_client

pytestmark = [pytest.mark.clients, pytest.mark.slow]

MIB = 1 << 20
IMAGE_BYTES = 384 * MIB


def test_large_sparse_image_round_trip(tmp_path: Path) -> None:
    """qemu-img convert in, compare, nbdcopy out: 384 MiB with 1 MiB holes every 3 MiB."""
    rng = np.random.default_rng(99)
    source = tmp_path / "src.img"
    with source.open("wb") as f:
        f.truncate(IMAGE_BYTES)
        for offset in range(0, IMAGE_BYTES, 3 * MIB):
            f.seek(offset)
            f.write(rng.bytes(2 * MIB))
    backend = MemoryBackend(IMAGE_BYTES)
    with NbdServer({"big": backend}, workers_per_connection=0) as srv:
        run_client(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), srv.url()],
            timeout_s=300,
        )
        run_client(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), srv.url()], timeout_s=300
        )
        assert backend.npages_allocated == IMAGE_BYTES // (3 * MIB) * (2 * MIB) // 4096
        copy = tmp_path / "copy.img"
        copy.write_bytes(b"")
        run_client(["nbdcopy", srv.url(), str(copy)], timeout_s=300)
        srv.check()
    with source.open("rb") as a, copy.open("rb") as b:
        while True:
            x, y = a.read(16 * MIB), b.read(16 * MIB)
            assert x == y
            if not x:
                break
