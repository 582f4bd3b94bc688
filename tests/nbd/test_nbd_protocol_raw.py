"""NbdServer byte by byte: the handshake options and every transmission command."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd import protocol as p
from vmpager.testing.nbd import RawNbdClient

SIZE = 1 << 20


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(SIZE)


@pytest.fixture
def server(backend: MemoryBackend) -> Iterator[NbdServer]:
    exports = {"disk": backend, "other": MemoryBackend(8192)}
    with NbdServer(exports, descriptions={"disk": "the disk"}) as srv:
        yield srv
        srv.check()


@pytest.fixture
def client(server: NbdServer) -> Iterator[RawNbdClient]:
    with RawNbdClient(server.address) as c:
        c.connect()
        yield c


def info_items(replies: list[tuple[int, bytes]]) -> dict[int, bytes]:
    return {
        struct.unpack_from(">H", data)[0]: data[2:]
        for reply, data in replies
        if reply == p.NBD_REP_INFO
    }


# -- handshake -----------------------------------------------------------------------------


def test_greeting_advertises_fixed_newstyle_and_no_zeroes(server: NbdServer) -> None:
    with RawNbdClient(server.address) as c:
        c.connect()
        assert c.handshake_flags == p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES


def test_unknown_option_gets_unsup_and_negotiation_goes_on(client: RawNbdClient) -> None:
    client.option(99, b"whatever")
    assert client.read_option_replies() == [(p.NBD_REP_ERR_UNSUP, b"option 99 not supported")]
    client.option(p.NBD_OPT_STARTTLS)
    assert client.read_option_replies()[0][0] == p.NBD_REP_ERR_UNSUP
    client.go("disk")
    assert client.size_bytes == SIZE


def test_list_returns_exports_in_order_then_ack(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_LIST)
    replies = client.read_option_replies()
    assert [r for r, _ in replies] == [p.NBD_REP_SERVER, p.NBD_REP_SERVER, p.NBD_REP_ACK]
    names = []
    for _, data in replies[:2]:
        (length,) = struct.unpack_from(">I", data)
        names.append(data[4 : 4 + length].decode())
    assert names == ["disk", "other"]
    assert replies[0][1].endswith(b"the disk")


def test_list_with_data_is_invalid(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_LIST, b"x")
    assert client.read_option_replies()[0][0] == p.NBD_REP_ERR_INVALID


def test_info_returns_requested_items_and_stays_in_negotiation(client: RawNbdClient) -> None:
    client.option(
        p.NBD_OPT_INFO,
        client.info_data("", [p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION, p.NBD_INFO_BLOCK_SIZE]),
    )
    replies = client.read_option_replies()
    assert replies[-1][0] == p.NBD_REP_ACK
    items = info_items(replies)
    assert items[p.NBD_INFO_NAME] == b"disk"  # the canonical name of the default export
    assert items[p.NBD_INFO_DESCRIPTION] == b"the disk"
    assert struct.unpack(">III", items[p.NBD_INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    size, flags = struct.unpack(">QH", items[p.NBD_INFO_EXPORT])
    assert size == SIZE
    assert flags & p.NBD_FLAG_HAS_FLAGS and flags & p.NBD_FLAG_SEND_FLUSH
    assert not flags & p.NBD_FLAG_SEND_DF  # structured replies were not negotiated
    client.go("other")
    assert client.size_bytes == 8192


def test_info_for_unknown_export_is_err_unknown(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_INFO, client.info_data("missing"))
    assert client.read_option_replies() == [(p.NBD_REP_ERR_UNKNOWN, b"no export named 'missing'")]
    client.option(p.NBD_OPT_GO, client.info_data("missing"))
    assert client.read_option_replies()[0][0] == p.NBD_REP_ERR_UNKNOWN


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 100) + b"disk" + b"\x00\x00",  # name length beyond the data
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + b"\x00\x01",  # 2 requests, 1 sent
        struct.pack(">I", 2) + b"\xff\xfe" + b"\x00\x00",  # not UTF-8
    ],
)
def test_malformed_info_is_invalid_and_recoverable(client: RawNbdClient, data: bytes) -> None:
    client.option(p.NBD_OPT_GO, data)
    assert client.read_option_replies()[0][0] == p.NBD_REP_ERR_INVALID
    client.go("disk")
    assert client.size_bytes == SIZE


def test_abort_is_acknowledged_then_closed(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_ABORT)
    assert client.read_option_replies() == [(p.NBD_REP_ACK, b"")]
    assert client.is_closed_by_server()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission(server: NbdServer, no_zeroes: bool) -> None:
    flags = p.NBD_FLAG_C_FIXED_NEWSTYLE | (p.NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)
    with RawNbdClient(server.address) as c:
        c.connect(flags)
        c.option(p.NBD_OPT_EXPORT_NAME, b"")
        size, tflags = p.EXPORT_NAME_REPLY.unpack(c.recv_exact(10))
        assert size == SIZE
        assert tflags & p.NBD_FLAG_CAN_MULTI_CONN
        if not no_zeroes:
            assert c.recv_exact(124) == bytes(124)
        c.request(p.NBD_CMD_WRITE, offset=5, length=3, data=b"abc", cookie=77)
        c.request(p.NBD_CMD_READ, offset=4, length=5, cookie=78)
        assert c.read_reply().cookie == 77
        reply = c.read_reply(5)
        assert (reply.cookie, reply.error, reply.data) == (78, 0, b"\x00abc\x00")


def test_export_name_for_unknown_export_hangs_up(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_EXPORT_NAME, b"missing")
    assert client.is_closed_by_server()


def test_structured_reply_with_data_is_invalid(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_STRUCTURED_REPLY, b"x")
    assert client.read_option_replies()[0][0] == p.NBD_REP_ERR_INVALID


def test_set_meta_context_needs_structured_replies(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_SET_META_CONTEXT, client.meta_data("disk", [p.BASE_ALLOCATION]))
    assert client.read_option_replies()[0][0] == p.NBD_REP_ERR_INVALID


@pytest.mark.parametrize(
    ("queries", "found"),
    [
        ([], True),
        (["base:"], True),
        (["base:allocation"], True),
        (["x-other:thing"], False),
        (["base:nonesuch"], False),
    ],
)
def test_list_meta_context(client: RawNbdClient, queries: list[str], found: bool) -> None:
    client.option(p.NBD_OPT_STRUCTURED_REPLY)
    client.read_option_replies()
    client.option(p.NBD_OPT_LIST_META_CONTEXT, client.meta_data("disk", queries))
    replies = client.read_option_replies()
    contexts = [data[4:] for reply, data in replies if reply == p.NBD_REP_META_CONTEXT]
    assert contexts == ([b"base:allocation"] if found else [])
    assert replies[-1] == (p.NBD_REP_ACK, b"")


def test_set_meta_context_selects_only_exact_names(client: RawNbdClient) -> None:
    client.option(p.NBD_OPT_STRUCTURED_REPLY)
    client.read_option_replies()
    client.option(p.NBD_OPT_SET_META_CONTEXT, client.meta_data("disk", ["base:", "x-a:b"]))
    assert client.read_option_replies() == [(p.NBD_REP_ACK, b"")]
    client.option(p.NBD_OPT_SET_META_CONTEXT, client.meta_data("disk", ["base:allocation"]))
    replies = client.read_option_replies()
    assert replies[0][0] == p.NBD_REP_META_CONTEXT
    assert replies[0][1][4:] == b"base:allocation"


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00",
        struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 50) + b"base:",  # query too long
        struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 4) + b"base",  # no colon
        struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0) + b"junk",  # trailing bytes
    ],
)
def test_malformed_meta_context_is_invalid(client: RawNbdClient, data: bytes) -> None:
    client.option(p.NBD_OPT_STRUCTURED_REPLY)
    client.read_option_replies()
    client.option(p.NBD_OPT_LIST_META_CONTEXT, data)
    assert client.read_option_replies()[0][0] == p.NBD_REP_ERR_INVALID


def test_meta_context_for_another_export_does_not_enable_block_status(
    client: RawNbdClient,
) -> None:
    client.option(p.NBD_OPT_STRUCTURED_REPLY)
    client.read_option_replies()
    client.option(p.NBD_OPT_SET_META_CONTEXT, client.meta_data("other", [p.BASE_ALLOCATION]))
    client.read_option_replies()
    client.go("disk")
    client.request(p.NBD_CMD_BLOCK_STATUS, offset=0, length=4096)
    assert client.read_reply().error == p.NBD_EINVAL


# -- transmission --------------------------------------------------------------------------


def connect(server: NbdServer, *, structured: bool = False, meta: bool = False) -> RawNbdClient:
    c = RawNbdClient(server.address)
    c.connect()
    c.go("disk", structured=structured, meta=meta)
    return c


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_requests_are_all_answered_in_order(
    server: NbdServer, backend: MemoryBackend, structured: bool
) -> None:
    with connect(server, structured=structured) as c:
        batch = b""
        for i in range(300):
            data = bytes([i % 251]) * 1000
            batch += p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 2 * i, i * 1000, 1000)
            batch += data
            batch += p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_READ, 2 * i + 1, i * 1000, 1000)
        c.send(batch)
        for i in range(300):
            reply = c.read_reply()
            assert (reply.cookie, reply.error) == (2 * i, 0)
            reply = c.read_reply(1000)
            assert (reply.cookie, reply.error) == (2 * i + 1, 0)
            assert reply.data == bytes([i % 251]) * 1000
    assert server.statistics().writes == 300


def test_large_write_and_read(server: NbdServer, backend: MemoryBackend) -> None:
    data = bytes(range(256)) * 3000  # larger than the receive buffer
    with connect(server, structured=True) as c:
        c.request(p.NBD_CMD_WRITE, offset=1234, length=len(data), data=data)
        assert c.read_reply().error == 0
        c.request(p.NBD_CMD_READ, offset=1234, length=len(data), flags=p.NBD_CMD_FLAG_DF)
        reply = c.read_reply()
        assert reply.data == data
        assert len(reply.chunks) == 1 and reply.chunks[0].done


def test_structured_read_sends_holes(server: NbdServer, backend: MemoryBackend) -> None:
    backend.write(65536, b"\x05" * 4096)
    with connect(server, structured=True) as c:
        c.request(p.NBD_CMD_READ, offset=0, length=3 * 65536)
        reply = c.read_reply()
    assert [(ch.type, ch.done) for ch in reply.chunks] == [
        (p.NBD_REPLY_TYPE_OFFSET_HOLE, False),
        (p.NBD_REPLY_TYPE_OFFSET_DATA, False),
        (p.NBD_REPLY_TYPE_OFFSET_HOLE, True),
    ]
    assert reply.data == bytes(65536) + b"\x05" * 4096 + bytes(2 * 65536 - 4096)


def test_zero_length_structured_read_is_a_done_chunk(server: NbdServer) -> None:
    with connect(server, structured=True) as c:
        c.request(p.NBD_CMD_READ, offset=10, length=0, cookie=5)
        reply = c.read_reply()
    assert [(ch.type, ch.done, ch.cookie) for ch in reply.chunks] == [
        (p.NBD_REPLY_TYPE_NONE, True, 5)
    ]


def test_flush_trim_cache_write_zeroes(server: NbdServer, backend: MemoryBackend) -> None:
    backend.write(0, b"\x01" * 65536)
    with connect(server) as c:
        c.request(p.NBD_CMD_FLUSH)
        c.request(p.NBD_CMD_TRIM, offset=0, length=8192, cookie=2)
        c.request(p.NBD_CMD_CACHE, offset=0, length=65536, cookie=3)
        c.request(p.NBD_CMD_WRITE_ZEROES, offset=8192, length=8192, cookie=4)
        c.request(
            p.NBD_CMD_WRITE_ZEROES,
            offset=16384,
            length=8192,
            cookie=5,
            flags=p.NBD_CMD_FLAG_NO_HOLE | p.NBD_CMD_FLAG_FAST_ZERO | p.NBD_CMD_FLAG_FUA,
        )
        assert [(r.cookie, r.error) for r in (c.read_reply() for _ in range(5))] == [
            (1, 0),
            (2, 0),
            (3, 0),
            (4, 0),
            (5, 0),
        ]
    assert backend.extents(0, 65536) == [(16384, 3), (8192, 2), (65536 - 24576, 0)]
    stats = backend.statistics()
    assert (stats.flush_ops, stats.cache_ops, stats.trim_ops, stats.zero_ops) == (1, 1, 1, 2)


def test_block_status_reports_extents(server: NbdServer, backend: MemoryBackend) -> None:
    backend.write(8192, b"\x01" * 4096)
    with connect(server, meta=True) as c:
        c.request(p.NBD_CMD_BLOCK_STATUS, offset=0, length=SIZE)
        (chunk,) = c.read_reply().chunks
        c.request(p.NBD_CMD_BLOCK_STATUS, offset=100, length=1000, flags=p.NBD_CMD_FLAG_REQ_ONE)
        (one,) = c.read_reply().chunks
    assert chunk.type == p.NBD_REPLY_TYPE_BLOCK_STATUS and chunk.done
    values = struct.unpack(f">I{(len(chunk.payload) - 4) // 4}I", chunk.payload)
    assert values == (1, 8192, 3, 4096, 0, SIZE - 12288, 3)
    assert struct.unpack(">III", one.payload)[1:] == (1000, 3)


def test_fast_zero_refused_when_backend_is_not_fast(backend: MemoryBackend) -> None:
    class SlowZeroBackend(MemoryBackend):
        @property
        def fast_zero(self) -> bool:
            return False

    slow = SlowZeroBackend(SIZE)
    slow.write(0, b"\x09" * 4096)
    with NbdServer({"disk": slow}) as srv, connect(srv) as c:
        c.request(p.NBD_CMD_WRITE_ZEROES, length=4096, flags=p.NBD_CMD_FLAG_FAST_ZERO)
        assert c.read_reply().error == p.NBD_ENOTSUP
        c.request(p.NBD_CMD_WRITE_ZEROES, length=4096, cookie=2)
        assert c.read_reply().error == 0
    assert slow.statistics().zero_ops == 1


def test_unix_socket_listener(tmp_path: Path, backend: MemoryBackend) -> None:
    path = tmp_path / "s.sock"
    with NbdServer({"disk": backend}, unix_path=path) as srv:
        assert srv.address == str(path)
        assert srv.url() == f"nbd+unix:///disk?socket={path}"
        with connect(srv) as c:
            c.request(p.NBD_CMD_WRITE, length=4, data=b"unix")
            assert c.read_reply().error == 0
    assert not path.exists()
    out = bytearray(4)
    backend.read_into(0, memoryview(out))
    assert out == b"unix"


def test_read_only_server_refuses_writes(backend: MemoryBackend) -> None:
    with NbdServer({"disk": backend}, read_only=True) as srv, connect(srv) as c:
        assert c.transmission_flags & p.NBD_FLAG_READ_ONLY
        assert not c.transmission_flags & p.NBD_FLAG_SEND_TRIM
        c.request(p.NBD_CMD_WRITE, length=4, data=b"nope")
        c.request(p.NBD_CMD_TRIM, length=4, cookie=2)
        c.request(p.NBD_CMD_WRITE_ZEROES, length=4, cookie=3)
        c.request(p.NBD_CMD_READ, length=4, cookie=4)
        assert [c.read_reply().error for _ in range(3)] == [p.NBD_EPERM] * 3
        assert c.read_reply(4).data == bytes(4)
    assert backend.npages_allocated == 0


def test_disc_closes_after_answering_everything(server: NbdServer, backend: MemoryBackend) -> None:
    with connect(server) as c:
        c.send(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, 0, 4)
            + b"last"
            + p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_DISC, 2, 0, 0)
        )
        assert c.read_reply().cookie == 1
        assert c.is_closed_by_server()
    out = bytearray(4)
    backend.read_into(0, memoryview(out))
    assert out == b"last"


def test_server_constructor_validates_arguments(backend: MemoryBackend) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        NbdServer({})
    with pytest.raises(TypeError, match="Backend"):
        NbdServer({"x": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="max_payload_bytes"):
        NbdServer({"x": backend}, max_payload_bytes=100)
    with pytest.raises(ValueError, match="unknown exports"):
        NbdServer({"x": backend}, descriptions={"y": "?"})
    with pytest.raises(ValueError, match="port"):
        NbdServer({"x": backend}, port=70000)
    srv = NbdServer({"x": backend})
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.address
    srv.start()
    with pytest.raises(RuntimeError, match="twice"):
        srv.start()
    srv.close()
    srv.close()  # idempotent
