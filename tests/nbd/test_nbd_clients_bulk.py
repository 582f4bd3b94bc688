"""Real NBD clients moving whole images: qemu-img map/convert/compare, nbdcopy, fio, concurrency."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd.protocol import NBD_STATE_HOLE
from vmpager.testing.nbd import require_client, run_client

pytestmark = pytest.mark.clients

MIB = 1 << 20
IMAGE_BYTES = 64 * MIB


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(IMAGE_BYTES)


@pytest.fixture
def server(backend: MemoryBackend) -> Iterator[NbdServer]:
    with NbdServer({"img": backend}) as srv:
        yield srv
        srv.check()


@pytest.fixture(scope="module")
def sparse_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int]]]:
    """A 64 MiB sparse raw file: random data in scattered runs, holes elsewhere.

    Returns the path and the data runs ``(offset, length)``.
    """
    rng = random.Random(20240611)
    path = tmp_path_factory.mktemp("img") / "src.img"
    runs: list[tuple[int, int]] = []
    with path.open("wb") as f:
        f.truncate(IMAGE_BYTES)
        offset = 0
        while offset < IMAGE_BYTES:
            offset += rng.randrange(1, 17) * 256 * 1024  # hole of 256 KiB .. 4 MiB
            length = rng.randrange(1, 9) * 128 * 1024 + rng.choice((0, 512, 4096))
            length = min(length, IMAGE_BYTES - offset)
            if length <= 0:
                break
            f.seek(offset)
            f.write(rng.randbytes(length))
            runs.append((offset, length))
            offset += length
    return path, runs


def image_bytes(backend: MemoryBackend) -> bytes:
    out = bytearray(backend.size_bytes)
    backend.read_into(0, memoryview(out))
    return bytes(out)


def hole_pages(backend: MemoryBackend) -> set[int]:
    pages: set[int] = set()
    offset = 0
    for length, flags in backend.extents(0, backend.size_bytes):
        if flags & NBD_STATE_HOLE:
            pages.update(range(offset // 4096, (offset + length) // 4096))
        offset += length
    return pages


def expected_hole_pages(runs: list[tuple[int, int]]) -> set[int]:
    data = set()
    for offset, length in runs:
        data.update(range(offset // 4096, -(-(offset + length) // 4096)))
    return set(range(IMAGE_BYTES // 4096)) - data


def test_qemu_img_map_shows_never_written_and_trimmed_ranges_as_holes(
    server: NbdServer, backend: MemoryBackend
) -> None:
    run_client(
        ["qemu-io", "-f", "raw", "-c", "write -P 9 0 8M", "-c", "discard 2M 1M", server.url()]
    )
    result = run_client(["qemu-img", "map", "--output=json", "-f", "raw", server.url()])
    entries = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(result.stdout)]
    assert entries == [
        (0, 2 * MIB, True, False),
        (2 * MIB, MIB, False, True),
        (3 * MIB, 5 * MIB, True, False),
        (8 * MIB, IMAGE_BYTES - 8 * MIB, False, True),
    ]


def test_qemu_img_convert_and_compare_sparse_image(
    server: NbdServer, backend: MemoryBackend, sparse_image: tuple[Path, list[tuple[int, int]]]
) -> None:
    path, runs = sparse_image
    # Pre-fill the target so that holes must be written as zeros, not just skipped.
    backend.write(0, b"\xee" * IMAGE_BYTES)
    run_client(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(path), server.url()],
        timeout_s=120,
    )
    run_client(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), server.url()])
    assert image_bytes(backend) == path.read_bytes()
    # qemu-img zeroes source holes with may-unmap write-zeroes: they become holes here.
    assert hole_pages(backend) == expected_hole_pages(runs)
    backend.check()


def test_qemu_img_compare_detects_a_difference(
    server: NbdServer, backend: MemoryBackend, sparse_image: tuple[Path, list[tuple[int, int]]]
) -> None:
    path, runs = sparse_image
    backend.write(0, path.read_bytes())
    run_client(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), server.url()])
    offset = runs[len(runs) // 2][0] + 1
    backend.write(offset, b"\x00\x01")
    result = run_client(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), server.url()], check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr


def test_nbdcopy_into_and_out_of_the_server(
    server: NbdServer,
    backend: MemoryBackend,
    sparse_image: tuple[Path, list[tuple[int, int]]],
    tmp_path: Path,
) -> None:
    path, runs = sparse_image
    run_client(["nbdcopy", str(path), server.url()], timeout_s=120)
    assert image_bytes(backend) == path.read_bytes()
    assert hole_pages(backend) >= expected_hole_pages(runs)
    out = tmp_path / "out.img"
    out.write_bytes(b"")
    run_client(["nbdcopy", server.url(), str(out)], timeout_s=120)
    assert out.read_bytes() == path.read_bytes()
    stats = server.statistics()
    assert stats.block_status > 0  # nbdcopy skipped holes by asking for them
    assert stats.protocol_errors == 0


def test_fio_random_write_verify(server: NbdServer) -> None:
    require_client("fio")
    result = run_client(
        [
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={server.url()}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--runtime=20",
            "--randrepeat=1",
            "--output-format=json",
        ],
        timeout_s=120,
    )
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == 8 * MIB // 4096
    assert job["read"]["total_ios"] == 8 * MIB // 4096  # the verify pass read everything back


def test_several_qemu_io_clients_at_once(server: NbdServer, backend: MemoryBackend) -> None:
    require_client("qemu-io")
    nclients = 6
    procs = []
    for i in range(nclients):
        base = i * 4 * MIB
        commands = [f"write -P {i + 1} {base} 2M", f"write -P {i + 101} {base + 2 * MIB} 1M"]
        commands += [f"read -P {i + 1} {base} 2M", f"read -P {i + 101} {base + 2 * MIB} 1M"]
        args = ["qemu-io", "-f", "raw"]
        for command in commands:
            args += ["-c", command]
        procs.append(
            subprocess.Popen(
                [*args, server.url()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert "fail" not in stdout.lower(), stdout
    data = image_bytes(backend)
    for i in range(nclients):
        base = i * 4 * MIB
        assert data[base : base + 2 * MIB] == bytes([i + 1]) * (2 * MIB)
        assert data[base + 2 * MIB : base + 3 * MIB] == bytes([i + 101]) * MIB
        assert data[base + 3 * MIB : base + 4 * MIB] == bytes(MIB)
    assert server.statistics().connections_accepted >= nclients
