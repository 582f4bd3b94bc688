"""Real NBD clients against NbdServer: nbdinfo (handshake, flags, list, map) and qemu-io."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd.backend import ReadableBuffer
from vmpager.testing.nbd import run_client

pytestmark = pytest.mark.clients

MIB = 1 << 20


class RecordingBackend(MemoryBackend):
    """A MemoryBackend that remembers the ``fua`` flag of every write-like call."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(size_bytes)
        self.fua_calls: list[tuple[str, int, int]] = []

    def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        if fua:
            self.fua_calls.append(("write", offset, len(memoryview(data))))
        super().write(offset, data, fua=fua)


@pytest.fixture
def backend() -> MemoryBackend:
    return RecordingBackend(16 * MIB)


@pytest.fixture(params=["tcp", "unix", "tcp-workers"])
def server(
    request: pytest.FixtureRequest, backend: MemoryBackend, tmp_path: Path
) -> Iterator[NbdServer]:
    exports = {"disk": backend, "small": MemoryBackend(MIB)}
    kwargs: dict[str, object] = {"descriptions": {"disk": "test disk"}}
    if request.param == "unix":
        kwargs["unix_path"] = tmp_path / "nbd.sock"
    if request.param == "tcp-workers":
        kwargs["workers_per_connection"] = 3
    with NbdServer(exports, **kwargs) as srv:  # type: ignore[arg-type]
        yield srv
        srv.check()


def qemu_io(
    server: NbdServer, *commands: str, export: str = "disk", cache: str = "writethrough"
) -> str:
    args = ["qemu-io", "-f", "raw", "-t", cache]
    for command in commands:
        args += ["-c", command]
    result = run_client([*args, server.url(export)])
    # qemu-io reports pattern mismatches on stdout but may still exit 0.
    assert "fail" not in result.stdout.lower(), result.stdout
    assert "fail" not in result.stderr.lower(), result.stderr
    return result.stdout


def read_backend(backend: MemoryBackend, offset: int, length: int) -> bytes:
    out = bytearray(length)
    backend.read_into(offset, memoryview(out))
    return bytes(out)


def test_nbdinfo_reports_handshake_size_and_flags(server: NbdServer) -> None:
    info = json.loads(run_client(["nbdinfo", "--json", server.url("disk")]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["description"] == "test disk"
    assert export["export-size"] == 16 * MIB
    assert "base:allocation" in export["contexts"]
    for flag in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_multi_conn",
        "can_df",
    ):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MIB


def test_nbdinfo_empty_name_selects_default_export(server: NbdServer) -> None:
    info = json.loads(run_client(["nbdinfo", "--json", server.url("")]).stdout)
    assert info["exports"][0]["export-size"] == 16 * MIB


def test_nbdinfo_list_shows_every_export(server: NbdServer) -> None:
    info = json.loads(run_client(["nbdinfo", "--list", "--json", server.url()]).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in info["exports"]}
    assert sizes == {"disk": 16 * MIB, "small": MIB}


def test_nbdinfo_unknown_export_fails(server: NbdServer) -> None:
    result = run_client(["nbdinfo", server.url("nope")], check=False)
    assert result.returncode != 0


def test_nbdinfo_map_reports_holes_exactly(server: NbdServer, backend: MemoryBackend) -> None:
    backend.write(MIB, b"\x01" * 8192)
    backend.write(4 * MIB + 4096, b"\x02" * 4096)
    extents = json.loads(run_client(["nbdinfo", "--map", "--json", server.url("disk")]).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in extents]
    assert got == [
        (0, MIB, 3),
        (MIB, 8192, 0),
        (MIB + 8192, 3 * MIB - 8192 + 4096, 3),
        (4 * MIB + 4096, 4096, 0),
        (4 * MIB + 8192, 12 * MIB - 8192, 3),
    ]


def test_qemu_io_pattern_write_and_read(server: NbdServer, backend: MemoryBackend) -> None:
    qemu_io(
        server,
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0x11 3M 64k",
        "read -P 0x11 3M 64k",
        "read -P 0 1M 2M",
    )
    assert read_backend(backend, 0, MIB) == b"\xab" * MIB
    assert read_backend(backend, 3 * MIB, 65536) == b"\x11" * 65536
    assert read_backend(backend, MIB, 2 * MIB) == bytes(2 * MIB)


def test_qemu_io_sees_data_written_by_backend(server: NbdServer, backend: MemoryBackend) -> None:
    backend.write(5 * MIB, b"\x77" * 12288)
    qemu_io(server, "read -P 0x77 5M 12k", "read -P 0 5132k 4k")


def test_qemu_io_unaligned_writes_are_read_modify_write(
    server: NbdServer, backend: MemoryBackend
) -> None:
    rng = random.Random(7)
    model = bytearray(2 * MIB)
    commands = []
    for _ in range(12):
        offset = rng.randrange(0, 2 * MIB - 20000)
        length = rng.randrange(1, 20000)
        byte = rng.randrange(1, 256)
        model[offset : offset + length] = bytes([byte]) * length
        commands.append(f"write -P {byte} {offset} {length}")
    for _ in range(12):
        offset = rng.randrange(0, 2 * MIB - 20000)
        length = rng.randrange(1, 20000)
        chunk = model[offset : offset + length]
        if len(set(chunk)) == 1:
            commands.append(f"read -P {chunk[0]} {offset} {length}")
    qemu_io(server, *commands)
    assert read_backend(backend, 0, 2 * MIB) == model


def test_qemu_io_write_zeroes_and_discard_leave_holes(
    server: NbdServer, backend: MemoryBackend
) -> None:
    qemu_io(
        server,
        "write -P 0xcd 0 4M",
        "write -z -u 1M 64k",  # may unmap: a hole
        "write -z 2M 64k",  # no unmap: allocated zeros
        "discard 3M 128k",
        "read -P 0 1M 64k",
        "read -P 0 2M 64k",
        "read -P 0 3M 128k",
        "read -P 0xcd 3200k 64k",
    )
    extents = backend.extents(0, 4 * MIB)
    assert extents == [
        (MIB, 0),
        (65536, 3),
        (MIB - 65536, 0),
        (65536, 2),
        (MIB - 65536, 0),
        (131072, 3),
        (MIB - 131072, 0),
    ]


def test_qemu_io_flush_reaches_backend(server: NbdServer, backend: MemoryBackend) -> None:
    before = backend.statistics().flush_ops
    qemu_io(server, "write -P 1 0 4k", "flush")
    assert backend.statistics().flush_ops > before


def test_qemu_io_fua_write_reaches_backend(server: NbdServer, backend: RecordingBackend) -> None:
    # Under writeback caching only the write asked with -f carries FUA; writethrough
    # (qemu-io's default) makes every write FUA.
    qemu_io(server, "write -f -P 3 8k 4k", "write -P 4 16k 4k", cache="writeback")
    assert backend.fua_calls == [("write", 8192, 4096)]
    qemu_io(server, "write -P 5 32k 4k")
    assert backend.fua_calls[-1] == ("write", 32768, 4096)


def test_small_second_export_is_separate(server: NbdServer, backend: MemoryBackend) -> None:
    qemu_io(server, "write -P 0x42 0 64k", export="small")
    assert read_backend(backend, 0, 65536) == bytes(65536)
    qemu_io(server, "read -P 0x42 0 64k", export="small")
