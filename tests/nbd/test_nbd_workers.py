"""workers_per_connection: one client's requests served concurrently, replies out of order."""

from __future__ import annotations

import threading

import pytest

from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd import protocol as p
from vmpager.testing.nbd import RawNbdClient, run_client

SIZE = 1 << 20


class RendezvousBackend(MemoryBackend):
    """Reads wait at a barrier: they succeed only if ``parties`` reads run at the same time."""

    def __init__(self, parties: int) -> None:
        super().__init__(SIZE)
        self.barrier = threading.Barrier(parties, timeout=5)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        self.barrier.wait()
        super().read_into(offset, buffer)


class OrderingBackend(MemoryBackend):
    """A read of the first page waits until a read of the second page has finished."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.second_done = threading.Event()

    def read_into(self, offset: int, buffer: memoryview) -> None:
        if offset == 0:
            assert self.second_done.wait(5), "the second read never ran"
        super().read_into(offset, buffer)
        if offset == 4096:
            self.second_done.set()


def connect(server: NbdServer, *, structured: bool = True) -> RawNbdClient:
    c = RawNbdClient(server.address)
    c.connect()
    c.go("", structured=structured)
    return c


def test_requests_of_one_client_run_concurrently() -> None:
    backend = RendezvousBackend(parties=4)
    with NbdServer({"d": backend}, workers_per_connection=4) as srv, connect(srv) as c:
        for cookie in range(4):
            c.request(p.NBD_CMD_READ, offset=cookie * 4096, length=4096, cookie=cookie)
        replies = [c.read_reply() for _ in range(4)]
    assert sorted(r.cookie for r in replies) == [0, 1, 2, 3]
    assert all(r.error == 0 and r.data == bytes(4096) for r in replies)


def test_replies_come_back_as_requests_finish() -> None:
    backend = OrderingBackend()
    backend.write(0, b"\x01" * 8192)
    with NbdServer({"d": backend}, workers_per_connection=2) as srv, connect(srv) as c:
        c.request(p.NBD_CMD_READ, offset=0, length=4096, cookie=1)
        c.request(p.NBD_CMD_READ, offset=4096, length=4096, cookie=2)
        first, second = c.read_reply(), c.read_reply()
    assert (first.cookie, second.cookie) == (2, 1)
    assert first.data == second.data == b"\x01" * 4096


def test_disc_waits_for_requests_in_flight() -> None:
    backend = OrderingBackend()
    with NbdServer({"d": backend}, workers_per_connection=2) as srv, connect(srv) as c:
        c.request(p.NBD_CMD_READ, offset=0, length=4096, cookie=1)
        c.request(p.NBD_CMD_WRITE, offset=8192, length=4, data=b"late", cookie=2)
        c.request(p.NBD_CMD_READ, offset=4096, length=4096, cookie=3)
        c.request(p.NBD_CMD_DISC)
        cookies = sorted(c.read_reply().cookie for _ in range(3))
        assert cookies == [1, 2, 3]
        assert c.is_closed_by_server()
    out = bytearray(4)
    backend.read_into(8192, memoryview(out))
    assert out == b"late"


def test_statistics_add_up_across_workers() -> None:
    backend = MemoryBackend(SIZE)
    with NbdServer({"d": backend}, workers_per_connection=3) as srv:
        with connect(srv, structured=False) as c:
            for cookie in range(60):
                c.request(
                    p.NBD_CMD_WRITE,
                    offset=cookie * 100,
                    length=100,
                    cookie=cookie,
                    data=b"w" * 100,
                )
            assert sorted(c.read_reply().cookie for _ in range(60)) == list(range(60))
        stats = srv.statistics()
        srv.check()
    assert (stats.writes, stats.bytes_written) == (60, 6000)


@pytest.mark.clients
def test_qemu_io_and_fio_with_workers(tmp_path: object) -> None:
    backend = MemoryBackend(16 << 20)
    with NbdServer({"d": backend}, workers_per_connection=4) as srv:
        run_client(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0x3c 1000 3M",
                "-c",
                "read -P 0x3c 1000 3M",
                "-c",
                "discard 1M 1M",
                "-c",
                "read -P 0 1M 1M",
                srv.url(),
            ]
        )
        run_client(
            [
                "fio",
                "--name=v",
                "--ioengine=nbd",
                f"--uri={srv.url()}",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=4M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--runtime=20",
                "--randrepeat=1",
            ],
            timeout_s=120,
        )
        srv.check()
