"""Hostile and broken clients: the server answers with the right error or drops only that client.

Every test checks that another client is still served afterwards, and none
loses a write the server acknowledged.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from vmpager.errors import DeviceError
from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd import protocol as p
from vmpager.nbd.backend import ReadableBuffer
from vmpager.testing.nbd import RawNbdClient

SIZE = 1 << 20
HUGE = 0xFFFFFFFF


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(SIZE)


@pytest.fixture(params=[0, 2], ids=["inline", "workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def server(backend: MemoryBackend, workers: int) -> Iterator[NbdServer]:
    with NbdServer(
        {"disk": backend}, handshake_timeout_s=2.0, workers_per_connection=workers
    ) as srv:
        yield srv
        srv.check()


def connect(server: NbdServer, *, structured: bool = False) -> RawNbdClient:
    c = RawNbdClient(server.address)
    c.connect()
    c.go("disk", structured=structured)
    return c


def wait_idle(server: NbdServer, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.statistics().connections_active:
        if time.monotonic() > deadline:
            raise AssertionError(f"connections still active: {server.statistics()}")
        time.sleep(0.01)


def assert_still_serving(server: NbdServer) -> None:
    with connect(server) as c:
        c.request(p.NBD_CMD_WRITE, offset=SIZE - 2, length=2, data=b"ok", cookie=42)
        assert c.read_reply().error == 0
        c.request(p.NBD_CMD_READ, offset=SIZE - 2, length=2, cookie=43)
        assert c.read_reply(2).data == b"ok"


def read_backend(backend: MemoryBackend, offset: int, length: int) -> bytes:
    out = bytearray(length)
    backend.read_into(offset, memoryview(out))
    return bytes(out)


# -- handshake -----------------------------------------------------------------------------


def test_unknown_client_flags_drop_the_client(server: NbdServer) -> None:
    with RawNbdClient(server.address) as c:
        c.connect(client_flags=p.NBD_FLAG_C_FIXED_NEWSTYLE | 0x80)
        assert c.is_closed_by_server()
    wait_idle(server)
    assert server.statistics().protocol_errors == 1
    assert_still_serving(server)


def test_bad_option_magic_drops_the_client(server: NbdServer) -> None:
    with RawNbdClient(server.address) as c:
        c.connect()
        c.option(p.NBD_OPT_LIST, magic=0x1234)
        assert c.is_closed_by_server()
    assert_still_serving(server)


def test_huge_option_length_is_not_allocated(server: NbdServer) -> None:
    tracemalloc.start()
    try:
        with RawNbdClient(server.address) as c:
            c.connect()
            c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, HUGE) + b"x" * 100)
            assert c.is_closed_by_server()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert_still_serving(server)


def test_disconnect_during_handshake(server: NbdServer) -> None:
    for partial in (b"", b"\x00\x00", p.CLIENT_FLAGS.pack(1) + b"IHAVE"):
        with RawNbdClient(server.address) as c:
            c.recv_exact(p.HANDSHAKE.size)
            c.send(partial)
    wait_idle(server)
    assert_still_serving(server)


def test_stalled_handshake_times_out(backend: MemoryBackend) -> None:
    with NbdServer({"disk": backend}, handshake_timeout_s=0.2) as srv:
        with RawNbdClient(srv.address) as c:
            c.connect()
            assert c.is_closed_by_server(timeout_s=5.0)
        assert_still_serving(srv)


def test_connections_over_the_limit_are_refused(backend: MemoryBackend) -> None:
    with NbdServer({"disk": backend}, max_connections=1) as srv:
        with connect(srv) as first, RawNbdClient(srv.address) as second:
            assert second.is_closed_by_server()
            first.request(p.NBD_CMD_FLUSH)
            assert first.read_reply().error == 0
        wait_idle(srv)
        assert srv.statistics().connections_refused == 1
        assert_still_serving(srv)


# -- transmission: errors answered, connection kept ----------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_requests_past_the_end_get_the_errors_of_the_spec(
    server: NbdServer, backend: MemoryBackend, structured: bool
) -> None:
    with connect(server, structured=structured) as c:
        c.request(p.NBD_CMD_READ, offset=SIZE - 10, length=11, cookie=1)
        assert c.read_reply().error == p.NBD_EINVAL
        c.request(p.NBD_CMD_WRITE, offset=SIZE - 10, length=11, data=b"y" * 11, cookie=2)
        assert c.read_reply().error == p.NBD_ENOSPC
        c.request(p.NBD_CMD_WRITE_ZEROES, offset=SIZE, length=1, cookie=3)
        assert c.read_reply().error == p.NBD_ENOSPC
        c.request(p.NBD_CMD_TRIM, offset=0, length=SIZE + 1, cookie=4)
        assert c.read_reply().error == p.NBD_EINVAL
        c.request(p.NBD_CMD_CACHE, offset=2**64 - 1, length=HUGE, cookie=5)
        assert c.read_reply().error == p.NBD_EINVAL
        c.request(p.NBD_CMD_READ, offset=2**64 - 1, length=1, cookie=6)
        assert c.read_reply().error == p.NBD_EINVAL
        # The refused write's payload was consumed: the stream is still in step.
        c.request(p.NBD_CMD_READ, offset=SIZE - 10, length=10, cookie=7)
        reply = c.read_reply(10)
        assert (reply.cookie, reply.error, reply.data) == (7, 0, bytes(10))
    assert backend.npages_allocated == 0


def test_unknown_commands_and_flags_are_einval(server: NbdServer) -> None:
    with connect(server) as c:
        c.request(42, offset=0, length=0, cookie=1)
        c.request(p.NBD_CMD_READ, length=4, flags=0x80, cookie=2)
        c.request(p.NBD_CMD_READ, length=4, flags=p.NBD_CMD_FLAG_DF, cookie=3)  # not negotiated
        c.request(p.NBD_CMD_WRITE, length=4, flags=p.NBD_CMD_FLAG_NO_HOLE, data=b"abcd", cookie=4)
        c.request(p.NBD_CMD_TRIM, length=4, flags=p.NBD_CMD_FLAG_REQ_ONE, cookie=5)
        c.request(p.NBD_CMD_FLUSH, offset=1, cookie=6)
        c.request(p.NBD_CMD_BLOCK_STATUS, length=4096, cookie=7)  # no context selected
        replies = sorted((c.read_reply() for _ in range(7)), key=lambda r: r.cookie)
        # With worker threads replies may come in any order (the protocol allows it).
        assert [(r.cookie, r.error) for r in replies] == [(i, p.NBD_EINVAL) for i in range(1, 8)]
        c.request(p.NBD_CMD_READ, length=4, cookie=8)
        assert c.read_reply(4).data == bytes(4)
    assert server.statistics().error_replies == 7


def test_structured_errors_carry_a_message(server: NbdServer) -> None:
    with connect(server, structured=True) as c:
        c.request(p.NBD_CMD_READ, offset=SIZE, length=1, cookie=9)
        reply = c.read_reply()
    (chunk,) = reply.chunks
    assert chunk.type == p.NBD_REPLY_TYPE_ERROR and chunk.done and chunk.cookie == 9
    error, length = struct.unpack_from(">IH", chunk.payload)
    assert error == p.NBD_EINVAL
    assert b"past the end" in chunk.payload[6 : 6 + length]


@pytest.mark.parametrize(("structured", "error"), [(False, p.NBD_EINVAL), (True, p.NBD_EOVERFLOW)])
def test_huge_read_is_refused_without_allocating(
    backend: MemoryBackend, structured: bool, error: int
) -> None:
    big = MemoryBackend(1 << 40)
    with NbdServer({"disk": big}) as srv:
        tracemalloc.start()
        try:
            with connect(srv, structured=structured) as c:
                c.request(p.NBD_CMD_READ, offset=0, length=HUGE)
                assert c.read_reply().error == error
                c.request(p.NBD_CMD_READ, offset=0, length=8, cookie=2)
                assert c.read_reply(8).data == bytes(8)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20
        srv.check()


# -- transmission: connection dropped, nothing acknowledged lost ---------------------------


def test_huge_write_length_drops_the_client_without_allocating(
    server: NbdServer, backend: MemoryBackend
) -> None:
    tracemalloc.start()
    try:
        with connect(server) as c:
            c.request(p.NBD_CMD_WRITE, offset=0, length=HUGE, data=b"z" * 1000)
            assert c.is_closed_by_server()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert backend.npages_allocated == 0
    assert_still_serving(server)


def test_bad_request_magic_after_pipelined_writes(
    server: NbdServer, backend: MemoryBackend
) -> None:
    with connect(server) as c:
        batch = b""
        for i in range(20):
            batch += p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, i, i * 4096, 4096)
            batch += bytes([i + 1]) * 4096
        batch += p.REQUEST.pack(0xDEADBEEF, 0, p.NBD_CMD_WRITE, 99, 0, 4096) + b"\xff" * 4096
        c.send(batch)
        # Every request before the bad one is answered before the hang-up.
        acknowledged = sorted(c.read_reply().cookie for _ in range(20))
        assert acknowledged == list(range(20))
        assert c.is_closed_by_server()
    for i in acknowledged:
        assert read_backend(backend, i * 4096, 4096) == bytes([i + 1]) * 4096
    wait_idle(server)
    assert server.statistics().protocol_errors == 1
    assert_still_serving(server)


@pytest.mark.parametrize("sent", [10, 28, 28 + 2000])
def test_disconnect_in_the_middle_of_a_request(
    server: NbdServer, backend: MemoryBackend, sent: int
) -> None:
    request = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, 0, 4096) + b"\x01" * 4096
    with connect(server) as c:
        c.send(request[:sent])
    wait_idle(server)
    assert backend.npages_allocated == 0  # never acknowledged, never applied
    assert server.statistics().protocol_errors == 0
    assert_still_serving(server)


def test_client_resets_while_a_big_read_is_sent(server: NbdServer, backend: MemoryBackend) -> None:
    backend.write(0, b"\x07" * SIZE)
    for _ in range(3):
        c = connect(server)
        for cookie in range(8):
            c.request(p.NBD_CMD_READ, offset=0, length=SIZE, cookie=cookie)
        # SO_LINGER 0: close with a reset while the server is still sending.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    wait_idle(server)
    assert_still_serving(server)


class FaultyBackend(MemoryBackend):
    """Fails reads in the first page with EIO, writes at the last page with ENOSPC, trims oddly."""

    def read_into(self, offset: int, buffer: memoryview) -> None:
        if offset < 4096:
            raise DeviceError(errno.EIO, "faulty", offset // 4096)
        super().read_into(offset, buffer)

    def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        if offset >= self.size_bytes - 4096:
            raise OSError(errno.EDQUOT, "quota")
        super().write(offset, data, fua=fua)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise RuntimeError("bug in backend")


@pytest.mark.parametrize("structured", [False, True])
def test_backend_errors_become_error_replies(structured: bool, workers: int) -> None:
    backend = FaultyBackend(SIZE)
    backend.write(0, b"\x01" * 4096)  # data, so that the sparse read must read it
    with (
        NbdServer({"disk": backend}, workers_per_connection=workers) as srv,
        connect(srv, structured=structured) as c,
    ):
        c.request(p.NBD_CMD_READ, offset=0, length=100, cookie=1)
        assert c.read_reply().error == p.NBD_EIO
        c.request(p.NBD_CMD_READ, offset=0, length=128 * 1024, cookie=2)  # sparse-read path
        assert c.read_reply().error == p.NBD_EIO
        c.request(p.NBD_CMD_WRITE, offset=SIZE - 10, length=4, data=b"full", cookie=3)
        assert c.read_reply().error == p.NBD_ENOSPC
        c.request(p.NBD_CMD_TRIM, offset=0, length=4096, cookie=4)
        assert c.read_reply().error == p.NBD_EIO
        c.request(p.NBD_CMD_WRITE, offset=8192, length=4, data=b"fine", cookie=5)
        assert c.read_reply().error == 0
        c.request(p.NBD_CMD_READ, offset=8192, length=4, cookie=6)
        assert c.read_reply(4).data == b"fine"
        srv.check()


def test_garbage_client_among_good_ones_loses_no_acknowledged_write(
    server: NbdServer, backend: MemoryBackend
) -> None:
    nwriters = 4
    acknowledged: list[list[int]] = [[] for _ in range(nwriters)]

    def writer(index: int) -> None:
        with connect(server) as c:
            for j in range(50):
                block = index * 50 + j
                c.request(
                    p.NBD_CMD_WRITE,
                    offset=block * 4096,
                    length=4096,
                    cookie=block,
                    data=bytes([index + 1]) * 4096,
                )
                reply = c.read_reply()
                assert reply.error == 0
                acknowledged[index].append(reply.cookie)

    def vandal() -> None:
        for n in range(20):
            with connect(server) as c:
                c.send(bytes([n]) * 100)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(nwriters)]
    threads.append(threading.Thread(target=vandal))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for index in range(nwriters):
        assert len(acknowledged[index]) == 50
        for block in acknowledged[index]:
            assert read_backend(backend, block * 4096, 4096) == bytes([index + 1]) * 4096
    wait_idle(server)
    assert server.statistics().protocol_errors == 20


def test_close_with_connected_clients_returns_promptly(
    backend: MemoryBackend, workers: int
) -> None:
    srv = NbdServer({"disk": backend}, workers_per_connection=workers).start()
    idle = connect(srv)
    in_handshake = RawNbdClient(srv.address)
    busy = connect(srv)
    busy.request(p.NBD_CMD_WRITE, length=4, data=b"done")
    assert busy.read_reply().error == 0
    started = time.monotonic()
    srv.close()
    assert time.monotonic() - started < 3
    for c in (idle, in_handshake, busy):
        assert c.is_closed_by_server(timeout_s=2)
        c.close()
    assert srv.statistics().connections_active == 0
    assert read_backend(backend, 0, 4) == b"done"
    with pytest.raises(OSError), socket.create_connection(srv.address, timeout=1):  # type: ignore[arg-type]
        pass
