"""VM objects served over NBD: real clients against swap-backed disks under a small budget."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpager.nbd import NbdServer
from vmpager.nbd.vmdisk import VMObjectBackend
from vmpager.testing.nbd import require_client, run_client, serve_command
from vmpager.testing.worlds import small_vm

pytestmark = pytest.mark.clients

MIB = 1 << 20


@pytest.fixture
def vm_server() -> Iterator[tuple[NbdServer, object]]:
    # 2 MiB of memory behind a 48 MiB disk: everything pages through swap.
    vm, _ = small_vm(
        nframes=512,
        swap_nblocks=16384,
        daemon_thread=True,
        cluster_max_npages=16,
        readaround_npages=8,
    )
    with vm:
        obj = vm.allocate(48 * MIB)
        with NbdServer({"disk": VMObjectBackend(obj)}) as srv:
            yield srv, vm
            srv.check()
        vm.check()


def test_qemu_io_patterns_through_a_small_budget(vm_server: tuple[NbdServer, object]) -> None:
    require_client("qemu-io")
    server, vm = vm_server
    url = server.url("disk")
    cmds = [
        "write -P 0xab 0 16M",
        "write -P 0xcd 20M 8M",
        "write -P 0x11 123 4567",  # unaligned: read-modify-write
        "read -P 0xab 16384 16760832",
        "read -P 0xcd 20M 8M",
        "read -P 0x11 123 4567",
        "write -z 1M 64k",
        "read -P 0 1M 64k",
        "discard 2M 1M",
        "read -P 0 2M 1M",
        "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run_client([*args, url]).stdout
    assert "Pattern verification failed" not in out
    stats = vm.statistics()  # type: ignore[attr-defined]
    assert stats.pageout_pages > 0 and stats.pagein_pages > 0


def test_qemu_img_convert_compare_and_map_holes(
    vm_server: tuple[NbdServer, object], tmp_path: Path
) -> None:
    require_client("qemu-img")
    server, _ = vm_server
    url = server.url("disk")
    image = tmp_path / "src.img"
    with open(image, "wb") as f:
        f.truncate(48 * MIB)
        for off in (0, 5 * MIB, 17 * MIB + 4096, 40 * MIB):
            f.seek(off)
            f.write(os.urandom(3 * MIB))
    run_client(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url])
    out = run_client(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), url]).stdout
    assert "identical" in out
    extents = json.loads(run_client(["qemu-img", "map", "--output=json", "-f", "raw", url]).stdout)
    data = sum(e["length"] for e in extents if e["data"])
    # Only the written runs hold data; the rest (never written) are holes.
    assert 12 * MIB <= data <= 12 * MIB + 2 * 4096 * 4, extents


def test_vmpager_serve_cli_with_nbdinfo_and_nbdcopy(tmp_path: Path) -> None:
    require_client("nbdinfo")
    require_client("nbdcopy")
    sock = tmp_path / "nbd.sock"
    args = ["--size", "32M", "--memory", "4M", "--name", "d0", "--export", "d1:8M"]
    with serve_command([*args, "--unix", str(sock)]) as (line, _stderr):
        assert "serving 'd0'" in line, line
        uri = f"nbd+unix:///d0?socket={sock}"
        info = run_client(["nbdinfo", "--json", uri]).stdout
        assert json.loads(info)["exports"][0]["export-size"] == 32 * MIB
        listing = run_client(["nbdinfo", "--list", f"nbd+unix://?socket={sock}"]).stdout
        assert re.search(r"\bd1\b", listing)
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(24 * MIB) + bytes(8 * MIB))
        run_client(["nbdcopy", str(src), uri])
        back = tmp_path / "out.bin"
        run_client(["nbdcopy", uri, str(back)])
        assert back.read_bytes() == src.read_bytes()
