"""VM objects as NBD disks under real clients: images larger than memory, fio verify,
concurrent and misbehaving clients, holes after trim, and clones served beside their origin.

Every VM here pages to a real swap file (``FileDevice``, O_DIRECT) in the test's
temporary directory, with the page daemon thread running, and its memory
budget is a small fraction of the disk it serves, so requests fault pages in
and push them out while clients work.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vmpager.nbd import NbdServer
from vmpager.nbd import protocol as p
from vmpager.nbd.vmdisk import VMObjectBackend
from vmpager.testing.nbd import RawNbdClient, require_client, run_client
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

pytestmark = pytest.mark.clients

KIB = 1 << 10
MIB = 1 << 20
PAGE = 4096


@contextlib.contextmanager
def vm_disk(
    tmp_path: Path, *, memory_bytes: int, size_bytes: int, swap_bytes: int, **config: Any
) -> Iterator[tuple[VM, VMObject]]:
    """A VM paging to a swap file in ``tmp_path`` and one object of ``size_bytes``.

    ``VM.check()`` runs when the block ends without an exception.
    """
    cfg = replace(VMConfig(), **config)
    with VM(memory=memory_bytes, swap=[(str(tmp_path / "swap0"), swap_bytes)], config=cfg) as vm:
        yield vm, vm.allocate(size_bytes)
        vm.check()


def qemu_io(url: str, *commands: str, timeout_s: float = 60.0) -> str:
    """Run qemu-io commands on ``url``; fails on a non-zero exit or a failed pattern check."""
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    out = run_client([*args, url], timeout_s=timeout_s).stdout
    assert "fail" not in out.lower(), out
    return out


def hole_runs(backend: VMObjectBackend) -> list[tuple[int, int]]:
    """``(offset, length)`` of every hole the backend reports, merged."""
    runs: list[tuple[int, int]] = []
    offset = 0
    while offset < backend.size_bytes:
        for length, flags in backend.extents(offset, backend.size_bytes - offset):
            if flags & p.NBD_STATE_HOLE:
                if runs and runs[-1][0] + runs[-1][1] == offset:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length)
                else:
                    runs.append((offset, length))
            offset += length
    return runs


def nbdinfo_map(url: str) -> list[tuple[int, int, int]]:
    """``(offset, length, type)`` of the extents ``nbdinfo --map`` prints (type 3 = hole,zero),
    adjacent extents of one type merged (the client may ask in several pieces)."""
    out = run_client(["nbdinfo", "--map", "--json", url]).stdout
    merged: list[tuple[int, int, int]] = []
    for e in json.loads(out):
        offset, length, kind = int(e["offset"]), int(e["length"]), int(e["type"])
        if merged and merged[-1][2] == kind and sum(merged[-1][:2]) == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, kind)
        else:
            merged.append((offset, length, kind))
    return merged


# -- a large image through a small memory budget --------------------------------------------------


def make_sparse_image(path: Path, size_bytes: int, seed: int) -> list[tuple[int, int]]:
    """A raw file of random data runs (some unaligned) between holes; returns the runs."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    runs: list[tuple[int, int]] = []
    with path.open("wb") as f:
        f.truncate(size_bytes)
        offset = rng.randrange(0, 4) * MIB
        while offset < size_bytes:
            length = min(rng.randrange(1, 13) * MIB + rng.choice((0, 512, 4096, 12345)),
                         size_bytes - offset)  # fmt: skip
            f.seek(offset)
            f.write(gen.bytes(length))
            runs.append((offset, length))
            offset += length + rng.randrange(1, 9) * 512 * KIB
    return runs


def expected_holes(runs: list[tuple[int, int]], size_bytes: int) -> list[tuple[int, int]]:
    """Whole pages of the image that no data run touches, as merged runs."""
    holes: list[tuple[int, int]] = []
    pos = 0
    for offset, length in [*runs, (size_bytes, 0)]:
        start = -(-pos // PAGE) * PAGE
        end = offset // PAGE * PAGE
        if end > start:
            holes.append((start, end - start))
        pos = offset + length
    return holes


def test_qemu_img_convert_and_compare_256m_image_through_16m_of_memory(tmp_path: Path) -> None:
    require_client("qemu-img")
    size = 256 * MIB
    image = tmp_path / "src.img"
    runs = make_sparse_image(image, size, seed=256)
    assert 100 * MIB < sum(n for _, n in runs) < 200 * MIB
    with vm_disk(tmp_path, memory_bytes=16 * MIB, size_bytes=size, swap_bytes=512 * MIB) as (
        vm,
        obj,
    ):
        # Junk first, so that the image's holes must be cleared, not just skipped.
        junk = b"\xee" * MIB
        for offset in range(0, 64 * MIB, MIB):
            obj.write(offset, junk)
        backend = VMObjectBackend(obj)
        with NbdServer({"disk": backend}) as server:
            url = server.url()
            run_client(
                ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url],
                timeout_s=300,
            )
            out = run_client(
                ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), url], timeout_s=300
            ).stdout
            assert "identical" in out, out
            # qemu-img clears the source's holes with may-unmap write-zeroes: they
            # are discarded pages here, and block status says so.
            assert hole_runs(backend) == expected_holes(runs, size)
            # A changed byte in a page that lives on swap is found.
            offset, length = runs[len(runs) // 2]
            obj.write(offset + length // 2, b"\x00\x01\x02")
            result = run_client(
                ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), url],
                check=False,
                timeout_s=300,
            )
            assert result.returncode == 1, result.stdout + result.stderr
            server.check()
        stats = vm.statistics()
        assert stats.pageout_pages >= (size - 16 * MIB) // PAGE // 2
        assert stats.pagein_pages > 0
        assert stats.resident_npages <= vm.frames.nframes


# -- fio ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 4])
def test_fio_random_write_verify_two_jobs_on_a_paging_disk(tmp_path: Path, workers: int) -> None:
    require_client("fio")
    with (
        vm_disk(tmp_path, memory_bytes=2 * MIB, size_bytes=16 * MIB, swap_bytes=64 * MIB) as (
            vm,
            obj,
        ),
        NbdServer({"disk": VMObjectBackend(obj)}, workers_per_connection=workers) as server,
    ):
        result = run_client(
            [
                "fio",
                "--name=verify",
                "--ioengine=nbd",
                f"--uri={server.url()}",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--numjobs=2",
                "--size=8M",
                "--offset_increment=8M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--runtime=30",
                "--randrepeat=1",
                "--output-format=json",
            ],
            timeout_s=120,
        )
        jobs = json.loads(result.stdout[result.stdout.index("{") :])["jobs"]
        assert len(jobs) == 2
        for job in jobs:
            assert job["error"] == 0, job
            assert job["write"]["total_ios"] == 8 * MIB // PAGE
            assert job["read"]["total_ios"] == 8 * MIB // PAGE  # verify read everything back
        server.check()
        assert server.statistics().connections_accepted >= 2
    stats = vm.statistics()
    assert stats.pageout_pages > 0 and stats.pagein_pages > 0


# -- concurrent clients ---------------------------------------------------------------------------


def test_concurrent_qemu_io_clients_on_disjoint_ranges(tmp_path: Path) -> None:
    require_client("qemu-io")
    nclients = 6
    region = 4 * MIB
    with (
        vm_disk(
            tmp_path, memory_bytes=2 * MIB, size_bytes=nclients * region, swap_bytes=64 * MIB
        ) as (vm, obj),
        NbdServer({"disk": VMObjectBackend(obj)}) as server,
    ):
        procs = []
        for i in range(nclients):
            base = i * region
            a, b = 0x10 + i, 0x80 + i
            commands = [
                f"write -P {a} {base} 2M",
                f"write -P {b} {base + 2 * MIB + 1000} 700000",  # unaligned at both ends
                f"read -P {a} {base} 2M",
                f"read -P {b} {base + 2 * MIB + 1000} 700000",
                f"read -P 0 {base + 2 * MIB} 1000",
                f"write -z {base + MIB} 64k",
                f"read -P 0 {base + MIB} 64k",
                f"read -P {a} {base + MIB + 64 * KIB} 512k",
            ]
            args = ["qemu-io", "-f", "raw"]
            for command in commands:
                args += ["-c", command]
            procs.append(
                subprocess.Popen(
                    [*args, server.url()],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr
            assert "fail" not in stdout.lower(), stdout
        # Each region as its client left it, read through the VM directly.
        for i in range(nclients):
            base = i * region
            expected = bytearray(region)
            expected[: 2 * MIB] = bytes([0x10 + i]) * (2 * MIB)
            expected[MIB : MIB + 64 * KIB] = bytes(64 * KIB)
            expected[2 * MIB + 1000 : 2 * MIB + 1000 + 700000] = bytes([0x80 + i]) * 700000
            assert obj.read(base, region) == bytes(expected), f"region {i}"
        assert server.statistics().connections_accepted >= nclients
        server.check()
    assert vm.statistics().pagein_pages > 0


# -- clients that vanish mid-request --------------------------------------------------------------


def _connect(server: NbdServer) -> RawNbdClient:
    address = server.address
    assert isinstance(address, tuple)
    client = RawNbdClient((address[0], address[1]))
    client.connect()
    client.go("disk")
    return client


def _good_client(
    server: NbdServer, base: int, length: int, seed: int, model: bytearray, errors: list[str]
) -> None:
    """Writes, then reads back, in ``[base, base + length)``; ``model`` gets every acked write."""
    rng = random.Random(seed)
    try:
        with _connect(server) as client:
            for cookie in range(1, 121):
                n = rng.choice((PAGE, 3 * PAGE, 1000, 20000))
                offset = rng.randrange(0, length - n)
                data = rng.randbytes(n)
                client.request(
                    p.NBD_CMD_WRITE, offset=base + offset, length=n, cookie=cookie, data=data
                )
                reply = client.read_reply()
                assert reply.cookie == cookie and reply.error == 0, reply
                model[offset : offset + n] = data  # acknowledged: must survive
                if cookie % 10 == 0:
                    start = rng.randrange(0, length - 64 * KIB)
                    client.request(
                        p.NBD_CMD_READ, offset=base + start, length=64 * KIB, cookie=cookie
                    )
                    got = client.read_reply(64 * KIB)
                    assert got.error == 0 and got.data == model[start : start + 64 * KIB], start
            client.request(p.NBD_CMD_DISC)
    except BaseException as exc:  # reported by the main thread
        errors.append(f"good client {seed}: {exc!r}")


def _bad_client(server: NbdServer, kind: str, offset: int, rng: random.Random) -> None:
    """One connection that leaves in the middle of something."""
    with _connect(server) as client:
        if kind == "partial header":
            header = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, offset, 64 * KIB)
            client.send(header[: rng.randrange(1, len(header))])
        elif kind == "partial payload":
            client.request(
                p.NBD_CMD_WRITE,
                offset=offset,
                length=64 * KIB,
                data=b"\xbb" * rng.randrange(1, 64 * KIB),
            )
        elif kind == "unread reads":
            for cookie in range(8):
                client.request(
                    p.NBD_CMD_READ,
                    offset=rng.randrange(0, 8 * MIB - 256 * KIB),
                    length=256 * KIB,
                    cookie=cookie,
                )
        else:
            raise AssertionError(kind)


@pytest.mark.parametrize("workers", [0, 4])
def test_clients_that_disconnect_mid_request_lose_no_acknowledged_write(
    tmp_path: Path, workers: int
) -> None:
    region = 2 * MIB
    with (
        vm_disk(tmp_path, memory_bytes=MIB, size_bytes=8 * MIB, swap_bytes=32 * MIB) as (vm, obj),
        NbdServer({"disk": VMObjectBackend(obj)}, workers_per_connection=workers) as server,
    ):
        models = [bytearray(region) for _ in range(2)]
        errors: list[str] = []
        good = [
            threading.Thread(
                target=_good_client, args=(server, i * region, region, 100 + i, models[i], errors)
            )
            for i in range(2)
        ]
        for thread in good:
            thread.start()
        # Meanwhile: connections that vanish mid-header, mid-payload and with
        # reads (of pages that may be on swap) still in flight. Partial writes
        # aim at the third region, which must stay untouched.
        rng = random.Random(7)
        kinds = ["partial header", "partial payload", "unread reads"] * 8
        rng.shuffle(kinds)
        for kind in kinds:
            _bad_client(server, kind, 2 * region + rng.randrange(0, region - 64 * KIB), rng)
        for thread in good:
            thread.join(60)
            assert not thread.is_alive()
        assert errors == []
        # A fresh client sees every acknowledged write and nothing of the partial ones.
        with _connect(server) as client:
            for i, model in enumerate([*models, bytearray(region)]):
                client.request(p.NBD_CMD_READ, offset=i * region, length=region, cookie=i)
                reply = client.read_reply(region)
                assert reply.error == 0
                assert reply.data == bytes(model), f"region {i}"
        server.check()
        stats = server.statistics()
        assert stats.connections_accepted == 2 + len(kinds) + 1
    assert vm.statistics().pagein_pages > 0


# -- holes ----------------------------------------------------------------------------------------


def test_nbdinfo_map_shows_trimmed_ranges_of_a_vm_disk_as_holes(tmp_path: Path) -> None:
    require_client("nbdinfo")
    require_client("qemu-io")
    with vm_disk(tmp_path, memory_bytes=MIB, size_bytes=16 * MIB, swap_bytes=32 * MIB) as (
        vm,
        obj,
    ):
        backend = VMObjectBackend(obj)
        with NbdServer({"disk": backend}) as server:
            url = server.url()
            qemu_io(url, "write -P 0x5a 0 8M")
            vm.sync()
            used_before = vm.statistics().swap_used_blocks
            assert used_before > 0  # most of the 8 MiB lives on swap now
            qemu_io(
                url,
                "discard 1M 1M",  # whole pages: dropped
                "discard 4M 512k",
                "write -z -u 6M 256k",  # may-unmap write-zeroes: dropped too
            )
            # A trim inside two pages (qemu would not send it unaligned) zeroes
            # their parts and leaves them allocated.
            with _connect(server) as client:
                client.request(p.NBD_CMD_TRIM, offset=7 * MIB + 100, length=6000)
                assert client.read_reply().error == 0
            qemu_io(
                url,
                "read -P 0 1M 1M",
                "read -P 0x5a 2M 2M",
                "read -P 0 4M 512k",
                "read -P 0 6M 256k",
                "read -P 0x5a 7M 100",
                "read -P 0 7340132 6000",
                "read -P 0x5a 7346132 1042476",  # to 8M
            )
            holes = [(1 * MIB, MIB), (4 * MIB, 512 * KIB), (6 * MIB, 256 * KIB)]
            expected: list[tuple[int, int, int]] = []
            pos = 0
            for offset, length in [*holes, (8 * MIB, 8 * MIB)]:
                expected += [(pos, offset - pos, 0), (offset, length, 3)]
                pos = offset + length
            assert nbdinfo_map(url) == expected
            # Trimmed pages gave their swap back.
            assert vm.statistics().swap_used_blocks < used_before
            server.check()


# -- clones ---------------------------------------------------------------------------------------


def test_clone_served_as_second_export_keeps_the_snapshot_while_the_origin_changes(
    tmp_path: Path,
) -> None:
    require_client("qemu-io")
    require_client("nbdinfo")
    with vm_disk(tmp_path, memory_bytes=MIB, size_bytes=16 * MIB, swap_bytes=64 * MIB) as (
        vm,
        obj,
    ):
        disk = VMObjectBackend(obj)
        with NbdServer({"disk": disk}) as server:
            qemu_io(server.url(), "write -P 0x11 0 8M")
        snapshot = obj.clone()
        with NbdServer({"disk": disk, "snap": VMObjectBackend(snapshot)}) as server:
            disk_url, snap_url = server.url("disk"), server.url("snap")
            writer = subprocess.Popen(
                [
                    "qemu-io", "-f", "raw",
                    "-c", "write -P 0x22 0 4M",
                    "-c", "discard 4M 2M",
                    "-c", "write -P 0x33 10M 2M",
                    "-c", "write -P 0x44 7M 3000",
                    disk_url,
                ],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            # While the origin changes, the snapshot reads as it was, twice over.
            for _ in range(2):
                qemu_io(snap_url, "read -P 0x11 0 8M", "read -P 0 8M 8M")
            stdout, stderr = writer.communicate(timeout=60)
            assert writer.returncode == 0 and "fail" not in stdout.lower(), stdout + stderr
            qemu_io(
                disk_url,
                "read -P 0x22 0 4M",
                "read -P 0 4M 2M",
                "read -P 0x11 6M 1M",
                "read -P 0x44 7M 3000",
                "read -P 0x11 7343032 1045576",  # 7M + 3000 .. 8M
                "read -P 0 8M 2M",
                "read -P 0x33 10M 2M",
            )
            qemu_io(snap_url, "read -P 0x11 0 8M", "read -P 0 8M 8M")
            assert nbdinfo_map(snap_url) == [(0, 8 * MIB, 0), (8 * MIB, 8 * MIB, 3)]
            # Writes through the snapshot stay there.
            qemu_io(snap_url, "write -P 0x55 12M 1M")
            qemu_io(disk_url, "read -P 0x33 11M 1M", "read -P 0 12M 1M")
            server.check()
        expected = bytearray(16 * MIB)
        expected[0 : 4 * MIB] = b"\x22" * (4 * MIB)
        expected[6 * MIB : 8 * MIB] = b"\x11" * (2 * MIB)
        expected[7 * MIB : 7 * MIB + 3000] = b"\x44" * 3000
        expected[10 * MIB : 12 * MIB] = b"\x33" * (2 * MIB)
        assert obj.read(0, 16 * MIB) == bytes(expected)
        vm.check()
        # Closing the snapshot collapses the chain; the origin keeps its data.
        snapshot.close()
        assert obj.backing is None
        assert obj.read(0, 16 * MIB) == bytes(expected)
        assert vm.statistics().clones == 1
