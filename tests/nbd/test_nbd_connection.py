"""The sans-I/O protocol state machine, driven by feeding it bytes (no socket, no thread).

Every option and command, the bad inputs of test_nbd_bad_input.py, TLS
negotiation, and arbitrary splits of the byte stream (the events must not
depend on how the bytes arrived).
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpager.nbd import protocol as p
from vmpager.nbd.connection import (
    INLINE_PAYLOAD_BYTES,
    MAX_OPTION_BYTES,
    NEED_DATA,
    Aborted,
    Disconnect,
    Event,
    ExportInfo,
    Invalid,
    NbdConnection,
    NbdProtocolError,
    OptionReplied,
    Ready,
    Request,
    StartTls,
    is_request,
)
from vmpager.testing.nbd import RawNbdClient

SIZE = 4 << 20
MAX_PAYLOAD = 1 << 20
EXPORTS = [ExportInfo("disk", SIZE, "the disk", 4096), ExportInfo("other", 8192, "", 512)]
FLAGS = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES

info_data = RawNbdClient.info_data
meta_data = RawNbdClient.meta_data


def option(opt: int, data: bytes = b"", magic: int = p.IHAVEOPT) -> bytes:
    return p.OPTION_HEADER.pack(magic, opt, len(data)) + data


def request(
    command: int,
    offset: int = 0,
    length: int = 0,
    *,
    cookie: int = 7,
    flags: int = 0,
    data: bytes = b"",
    magic: int = p.REQUEST_MAGIC,
) -> bytes:
    return p.REQUEST.pack(magic, flags, command, cookie, offset, length) + data


def events(conn: NbdConnection) -> list[Event]:
    """Events until NEED_DATA or the end; write payloads copied (they are views)."""
    out: list[Event] = []
    while True:
        event = conn.next_event()
        conn.check()
        if event is NEED_DATA:
            return out
        assert not isinstance(event, type(NEED_DATA))
        if is_request(event):
            event = Request(*event)._replace(data=bytes(Request(*event).data))
        out.append(event)
        if isinstance(event, (Disconnect, Aborted, Ready, StartTls)):
            return out


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Parse option replies: [(option, reply type, payload)]."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, reply, length = p.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        pos += p.OPTION_REPLY_HEADER.size
        out.append((opt, reply, data[pos : pos + length]))
        pos += length
    return out


def handshaken(**kwargs: object) -> NbdConnection:
    """A connection past greeting and client flags, its output drained."""
    conn = NbdConnection(EXPORTS, max_payload_bytes=MAX_PAYLOAD, **kwargs)  # type: ignore[arg-type]
    greeting = conn.data_to_send()
    assert p.HANDSHAKE.unpack(greeting) == (
        p.NBDMAGIC,
        p.IHAVEOPT,
        p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES,
    )
    conn.receive_data(p.CLIENT_FLAGS.pack(FLAGS))
    assert events(conn) == []
    return conn


def transmitting(
    *, structured: bool = False, meta: bool = False, **kwargs: object
) -> NbdConnection:
    conn = handshaken(**kwargs)
    stream = b""
    if structured or meta:
        stream += option(p.NBD_OPT_STRUCTURED_REPLY)
    if meta:
        stream += option(p.NBD_OPT_SET_META_CONTEXT, meta_data("disk", [p.BASE_ALLOCATION]))
    conn.receive_data(stream + option(p.NBD_OPT_GO, info_data("disk")))
    got = events(conn)
    assert isinstance(got[-1], Ready) and got[-1].export.name == "disk"
    conn.data_to_send()
    return conn


# -- handshake ---------------------------------------------------------------------------------


def test_unknown_client_flags_are_a_protocol_error() -> None:
    conn = NbdConnection(EXPORTS)
    conn.receive_data(p.CLIENT_FLAGS.pack(1 << 5))
    with pytest.raises(NbdProtocolError, match="client flags"):
        conn.next_event()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission(no_zeroes: bool) -> None:
    conn = NbdConnection(EXPORTS)
    conn.data_to_send()
    flags = p.NBD_FLAG_C_FIXED_NEWSTYLE | (p.NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)
    conn.receive_data(p.CLIENT_FLAGS.pack(flags) + option(p.NBD_OPT_EXPORT_NAME, b"other"))
    assert events(conn) == [Ready(EXPORTS[1])]
    reply = conn.data_to_send()
    assert len(reply) == (10 if no_zeroes else 134)
    size, tflags = p.EXPORT_NAME_REPLY.unpack_from(reply)
    assert size == 8192 and tflags & p.NBD_FLAG_HAS_FLAGS


def test_export_name_of_an_unknown_export_hangs_up() -> None:
    conn = handshaken()
    conn.receive_data(option(p.NBD_OPT_EXPORT_NAME, b"nope"))
    [event] = events(conn)
    assert isinstance(event, Disconnect) and not event.clean
    assert conn.data_to_send() == b""


def test_empty_name_is_the_default_export() -> None:
    conn = handshaken()
    conn.receive_data(option(p.NBD_OPT_GO, info_data("")))
    assert events(conn) == [Ready(EXPORTS[0])]


def test_abort_is_acknowledged() -> None:
    conn = handshaken()
    conn.receive_data(option(p.NBD_OPT_ABORT))
    assert events(conn) == [Aborted()]
    assert option_replies(conn.data_to_send()) == [(p.NBD_OPT_ABORT, p.NBD_REP_ACK, b"")]


def test_list_names_every_export_with_its_description() -> None:
    conn = handshaken()
    conn.receive_data(option(p.NBD_OPT_LIST) + option(p.NBD_OPT_LIST, b"x"))
    assert events(conn) == [
        OptionReplied(p.NBD_OPT_LIST, p.NBD_REP_ACK),
        OptionReplied(p.NBD_OPT_LIST, p.NBD_REP_ERR_INVALID),
    ]
    replies = option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [
        p.NBD_REP_SERVER,
        p.NBD_REP_SERVER,
        p.NBD_REP_ACK,
        p.NBD_REP_ERR_INVALID,
    ]
    assert replies[0][2] == struct.pack(">I", 4) + b"disk" + b"the disk"
    assert replies[1][2] == struct.pack(">I", 5) + b"other"


def test_info_answers_and_stays_in_negotiation() -> None:
    conn = handshaken()
    requests = [p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION, p.NBD_INFO_BLOCK_SIZE]
    conn.receive_data(option(p.NBD_OPT_INFO, info_data("disk", requests)))
    assert events(conn) == [OptionReplied(p.NBD_OPT_INFO, p.NBD_REP_ACK)]
    replies = option_replies(conn.data_to_send())
    infos = {struct.unpack_from(">H", r[2])[0]: r[2] for r in replies if r[1] == p.NBD_REP_INFO}
    assert p.INFO_EXPORT.unpack(infos[p.NBD_INFO_EXPORT])[1] == SIZE
    assert infos[p.NBD_INFO_NAME][2:] == b"disk"
    assert infos[p.NBD_INFO_DESCRIPTION][2:] == b"the disk"
    assert p.INFO_BLOCK_SIZE.unpack(infos[p.NBD_INFO_BLOCK_SIZE]) == (
        p.NBD_INFO_BLOCK_SIZE,
        1,
        4096,
        MAX_PAYLOAD,
    )
    assert replies[-1][1] == p.NBD_REP_ACK
    # Still negotiating: a GO now enters transmission.
    conn.receive_data(option(p.NBD_OPT_GO, info_data("disk")))
    assert events(conn) == [Ready(EXPORTS[0])]


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"\0\0", p.NBD_REP_ERR_INVALID),  # shorter than 6 bytes
        (struct.pack(">IH", 99, 0), p.NBD_REP_ERR_INVALID),  # name longer than the data
        (info_data("disk") + b"\0", p.NBD_REP_ERR_INVALID),  # trailing byte
        (struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0), p.NBD_REP_ERR_INVALID),
        (info_data("nope"), p.NBD_REP_ERR_UNKNOWN),
    ],
)
@pytest.mark.parametrize("opt", [p.NBD_OPT_INFO, p.NBD_OPT_GO])
def test_bad_info_and_go_are_refused(opt: int, data: bytes, reply: int) -> None:
    conn = handshaken()
    conn.receive_data(option(opt, data))
    assert events(conn) == [OptionReplied(opt, reply)]
    assert option_replies(conn.data_to_send())[-1][1] == reply


def test_structured_reply_and_meta_contexts() -> None:
    conn = handshaken()
    stream = (
        option(p.NBD_OPT_SET_META_CONTEXT, meta_data("disk", [p.BASE_ALLOCATION]))  # too early
        + option(p.NBD_OPT_STRUCTURED_REPLY, b"x")
        + option(p.NBD_OPT_STRUCTURED_REPLY)
        + option(p.NBD_OPT_LIST_META_CONTEXT, meta_data("disk", []))
        + option(p.NBD_OPT_LIST_META_CONTEXT, meta_data("disk", ["other:x"]))
        + option(p.NBD_OPT_SET_META_CONTEXT, meta_data("nope", [p.BASE_ALLOCATION]))
        + option(p.NBD_OPT_SET_META_CONTEXT, b"\0\0\0\xff")
        + option(p.NBD_OPT_SET_META_CONTEXT, meta_data("disk", ["noColon"]))
        + option(p.NBD_OPT_SET_META_CONTEXT, meta_data("disk", [p.BASE_ALLOCATION]))
    )
    conn.receive_data(stream)
    got = events(conn)
    assert [e.reply for e in got if isinstance(e, OptionReplied)] == [
        p.NBD_REP_ERR_INVALID,
        p.NBD_REP_ERR_INVALID,
        p.NBD_REP_ACK,
        p.NBD_REP_ACK,
        p.NBD_REP_ACK,
        p.NBD_REP_ERR_UNKNOWN,
        p.NBD_REP_ERR_INVALID,
        p.NBD_REP_ERR_INVALID,
        p.NBD_REP_ACK,
    ]
    replies = option_replies(conn.data_to_send())
    contexts = [r for r in replies if r[1] == p.NBD_REP_META_CONTEXT]
    # LIST with no query lists base:allocation (id 0); LIST of another namespace does not;
    # SET selects it with id 1.
    assert [c[2] for c in contexts] == [
        struct.pack(">I", 0) + b"base:allocation",
        struct.pack(">I", 1) + b"base:allocation",
    ]
    conn.receive_data(option(p.NBD_OPT_GO, info_data("disk")))
    assert isinstance(events(conn)[-1], Ready)
    assert conn.structured and conn.block_status_ok
    assert conn.transmission_flags() & p.NBD_FLAG_SEND_DF


def test_meta_context_of_another_export_does_not_enable_block_status() -> None:
    conn = handshaken()
    conn.receive_data(
        option(p.NBD_OPT_STRUCTURED_REPLY)
        + option(p.NBD_OPT_SET_META_CONTEXT, meta_data("other", [p.BASE_ALLOCATION]))
        + option(p.NBD_OPT_GO, info_data("disk"))
    )
    assert isinstance(events(conn)[-1], Ready)
    assert not conn.block_status_ok


@pytest.mark.parametrize(
    "opt", [p.NBD_OPT_PEEK_EXPORT, p.NBD_OPT_EXTENDED_HEADERS, 99, p.NBD_OPT_STARTTLS]
)
def test_unsupported_options_are_unsup(opt: int) -> None:
    conn = handshaken()
    conn.receive_data(option(opt))
    assert events(conn) == [OptionReplied(opt, p.NBD_REP_ERR_UNSUP)]
    [(replied, reply, message)] = option_replies(conn.data_to_send())
    assert (replied, reply) == (opt, p.NBD_REP_ERR_UNSUP) and message


def test_bad_option_magic_is_a_protocol_error() -> None:
    conn = handshaken()
    conn.receive_data(option(p.NBD_OPT_LIST, magic=0x1234))
    with pytest.raises(NbdProtocolError, match="option magic"):
        conn.next_event()


def test_huge_option_length_fails_before_its_data_arrives() -> None:
    conn = handshaken()
    conn.receive_data(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_LIST, MAX_OPTION_BYTES + 1))
    with pytest.raises(NbdProtocolError, match="carries"):
        conn.next_event()


def test_end_of_input_during_the_handshake() -> None:
    conn = handshaken()
    conn.receive_data(option(p.NBD_OPT_LIST)[:5])
    assert events(conn) == []
    conn.receive_data(b"")
    [event] = events(conn)
    assert isinstance(event, Disconnect) and "middle" in event.reason


# -- TLS -----------------------------------------------------------------------------------------


def test_tls_required_refuses_every_option_but_starttls_and_abort() -> None:
    conn = handshaken(tls="require")
    refused = [p.NBD_OPT_LIST, p.NBD_OPT_INFO, p.NBD_OPT_GO, p.NBD_OPT_STRUCTURED_REPLY, 99]
    conn.receive_data(b"".join(option(o, info_data("disk")) for o in refused))
    assert events(conn) == [OptionReplied(o, p.NBD_REP_ERR_TLS_REQD) for o in refused]
    assert {r[1] for r in option_replies(conn.data_to_send())} == {p.NBD_REP_ERR_TLS_REQD}
    conn.receive_data(option(p.NBD_OPT_STARTTLS, b"x") + option(p.NBD_OPT_STARTTLS))
    assert events(conn) == [
        OptionReplied(p.NBD_OPT_STARTTLS, p.NBD_REP_ERR_INVALID),
        StartTls(),
    ]
    assert option_replies(conn.data_to_send())[-1] == (p.NBD_OPT_STARTTLS, p.NBD_REP_ACK, b"")
    assert events(conn) == []  # waits for the upgrade
    conn.tls_started()
    assert conn.tls_active
    conn.receive_data(
        option(p.NBD_OPT_STARTTLS)
        + option(p.NBD_OPT_STRUCTURED_REPLY)
        + option(p.NBD_OPT_GO, info_data("disk"))
    )
    assert events(conn) == [
        OptionReplied(p.NBD_OPT_STARTTLS, p.NBD_REP_ERR_INVALID),
        OptionReplied(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK),
        Ready(EXPORTS[0]),
    ]


def test_tls_required_export_name_before_tls_hangs_up() -> None:
    conn = handshaken(tls="require")
    conn.receive_data(option(p.NBD_OPT_EXPORT_NAME, b"disk"))
    [event] = events(conn)
    assert isinstance(event, Disconnect) and "TLS" in event.reason


def test_tls_abort_before_the_upgrade_is_allowed() -> None:
    conn = handshaken(tls="require")
    conn.receive_data(option(p.NBD_OPT_ABORT))
    assert events(conn) == [Aborted()]


def test_bytes_sent_ahead_of_the_tls_upgrade_are_a_protocol_error() -> None:
    conn = handshaken(tls="require")
    conn.receive_data(option(p.NBD_OPT_STARTTLS) + option(p.NBD_OPT_GO, info_data("disk")))
    with pytest.raises(NbdProtocolError, match="STARTTLS"):
        conn.next_event()


def test_tls_upgrade_forgets_what_was_negotiated_before() -> None:
    conn = handshaken(tls="require")
    conn.receive_data(option(p.NBD_OPT_STARTTLS))
    assert events(conn) == [StartTls()]
    conn.tls_started()
    conn.receive_data(option(p.NBD_OPT_GO, info_data("disk")))
    assert isinstance(events(conn)[-1], Ready)
    assert not conn.structured
    with pytest.raises(RuntimeError):
        conn.tls_started()


def test_bad_tls_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="tls"):
        NbdConnection(EXPORTS, tls="maybe")  # type: ignore[arg-type]


# -- transmission --------------------------------------------------------------------------------


def test_every_command_becomes_a_request() -> None:
    conn = transmitting(meta=True)
    stream = (
        request(p.NBD_CMD_READ, 4096, 512, cookie=1, flags=p.NBD_CMD_FLAG_DF)
        + request(p.NBD_CMD_WRITE, 0, 3, cookie=2, flags=p.NBD_CMD_FLAG_FUA, data=b"abc")
        + request(p.NBD_CMD_FLUSH, cookie=3)
        + request(p.NBD_CMD_TRIM, 0, 4096, cookie=4)
        + request(p.NBD_CMD_WRITE_ZEROES, 0, 4096, cookie=5, flags=p.NBD_CMD_FLAG_NO_HOLE)
        + request(p.NBD_CMD_CACHE, 0, SIZE, cookie=6)
        + request(p.NBD_CMD_BLOCK_STATUS, 0, SIZE, cookie=8, flags=p.NBD_CMD_FLAG_REQ_ONE)
        + request(p.NBD_CMD_WRITE, SIZE, 0, cookie=9)
        + request(p.NBD_CMD_DISC, cookie=10)
    )
    conn.receive_data(stream)
    assert events(conn) == [
        Request(p.NBD_CMD_READ, p.NBD_CMD_FLAG_DF, 1, 4096, 512, b""),
        Request(p.NBD_CMD_WRITE, p.NBD_CMD_FLAG_FUA, 2, 0, 3, b"abc"),
        Request(p.NBD_CMD_FLUSH, 0, 3, 0, 0, b""),
        Request(p.NBD_CMD_TRIM, 0, 4, 0, 4096, b""),
        Request(p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_FLAG_NO_HOLE, 5, 0, 4096, b""),
        Request(p.NBD_CMD_CACHE, 0, 6, 0, SIZE, b""),
        Request(p.NBD_CMD_BLOCK_STATUS, p.NBD_CMD_FLAG_REQ_ONE, 8, 0, SIZE, b""),
        Request(p.NBD_CMD_WRITE, 0, 9, SIZE, 0, b""),
        Disconnect("client sent NBD_CMD_DISC", True),
    ]
    with pytest.raises(RuntimeError):
        conn.next_event()


@pytest.mark.parametrize(
    ("structured", "read_only", "raw", "error"),
    [
        (False, False, request(p.NBD_CMD_READ, SIZE - 1, 2), p.NBD_EINVAL),
        (False, False, request(p.NBD_CMD_READ, 0, MAX_PAYLOAD + 1), p.NBD_EINVAL),
        (True, False, request(p.NBD_CMD_READ, 0, MAX_PAYLOAD + 1), p.NBD_EOVERFLOW),
        (False, False, request(p.NBD_CMD_READ, 0, 1, flags=p.NBD_CMD_FLAG_DF), p.NBD_EINVAL),
        (False, False, request(p.NBD_CMD_READ, 0, 1, flags=1 << 9), p.NBD_EINVAL),
        (False, False, request(p.NBD_CMD_WRITE, SIZE - 1, 2, data=b"xy"), p.NBD_ENOSPC),
        (False, True, request(p.NBD_CMD_WRITE, 0, 2, data=b"xy"), p.NBD_EPERM),
        (False, False, request(p.NBD_CMD_WRITE, 0, 1, flags=1 << 3, data=b"x"), p.NBD_EINVAL),
        (False, False, request(p.NBD_CMD_FLUSH, 0, 1), p.NBD_EINVAL),
        (False, False, request(p.NBD_CMD_TRIM, SIZE, 1), p.NBD_EINVAL),
        (False, True, request(p.NBD_CMD_TRIM, 0, 1), p.NBD_EPERM),
        (False, False, request(p.NBD_CMD_WRITE_ZEROES, SIZE, 1), p.NBD_ENOSPC),
        (False, True, request(p.NBD_CMD_WRITE_ZEROES, 0, 1), p.NBD_EPERM),
        (False, False, request(p.NBD_CMD_CACHE, SIZE, 1), p.NBD_EINVAL),
        (False, False, request(p.NBD_CMD_BLOCK_STATUS, 0, 1), p.NBD_EINVAL),
        (False, False, request(99, 0, 1), p.NBD_EINVAL),
        (False, False, request(p.NBD_CMD_FLUSH, flags=1 << 4), p.NBD_EINVAL),
    ],
)
def test_bad_requests_are_invalid_and_the_connection_goes_on(
    structured: bool, read_only: bool, raw: bytes, error: int
) -> None:
    conn = transmitting(structured=structured, read_only=read_only)
    conn.receive_data(raw + request(p.NBD_CMD_FLUSH, cookie=8))
    [invalid, flush] = events(conn)
    assert isinstance(invalid, Invalid) and invalid.cookie == 7 and invalid.error == error
    assert flush == Request(p.NBD_CMD_FLUSH, 0, 8, 0, 0, b"")


def test_block_status_of_zero_length_is_invalid() -> None:
    conn = transmitting(meta=True)
    conn.receive_data(request(p.NBD_CMD_BLOCK_STATUS, 0, 0))
    [event] = events(conn)
    assert isinstance(event, Invalid) and event.error == p.NBD_EINVAL


def test_huge_write_length_is_a_protocol_error_before_any_payload() -> None:
    conn = transmitting()
    conn.receive_data(request(p.NBD_CMD_WRITE, 0, 0xFFFFFFFF))
    with pytest.raises(NbdProtocolError, match="exceeds maximum"):
        conn.next_event()


def test_bad_request_magic_after_pipelined_writes() -> None:
    conn = transmitting()
    good = b"".join(request(p.NBD_CMD_WRITE, i, 1, cookie=i, data=b"w") for i in range(5))
    conn.receive_data(good + request(p.NBD_CMD_READ, magic=0xBAD))
    for i in range(5):
        assert conn.next_event() == Request(p.NBD_CMD_WRITE, 0, i, i, 1, b"w")
    with pytest.raises(NbdProtocolError, match="request magic"):
        conn.next_event()


def test_end_of_input_inside_a_request() -> None:
    conn = transmitting()
    conn.receive_data(request(p.NBD_CMD_WRITE, 0, 10, data=b"half"))
    assert events(conn) == []
    conn.receive_data(b"")
    [event] = events(conn)
    assert isinstance(event, Disconnect) and not event.clean and "middle" in event.reason


def test_end_of_input_between_requests() -> None:
    conn = transmitting()
    conn.receive_data(request(p.NBD_CMD_FLUSH))
    conn.receive_data(b"")
    assert events(conn) == [
        Request(p.NBD_CMD_FLUSH, 0, 7, 0, 0, b""),
        Disconnect("client closed the connection", False),
    ]


@pytest.mark.parametrize("length", [INLINE_PAYLOAD_BYTES, INLINE_PAYLOAD_BYTES + 1, 600_000])
def test_large_write_payloads_arrive_whole(length: int) -> None:
    conn = transmitting()
    payload = bytes(range(256)) * (length // 256) + b"z" * (length % 256)
    stream = request(p.NBD_CMD_WRITE, 0, length, cookie=1, data=payload)
    stream += request(p.NBD_CMD_FLUSH, cookie=2)
    got: list[Event] = []
    for i in range(0, len(stream), 70_001):
        conn.receive_data(stream[i : i + 70_001])
        got += events(conn)
    assert got == [
        Request(p.NBD_CMD_WRITE, 0, 1, 0, length, payload),
        Request(p.NBD_CMD_FLUSH, 0, 2, 0, 0, b""),
    ]


def test_receive_buffer_and_received_move_bytes_without_copies() -> None:
    conn = transmitting()
    stream = request(p.NBD_CMD_WRITE, 0, 4, data=b"data") + request(p.NBD_CMD_FLUSH, cookie=9)
    for i in range(0, len(stream), 5):  # as a socket would deliver it, five bytes at a time
        piece = stream[i : i + 5]
        room = conn.receive_buffer()
        room[: len(piece)] = piece
        conn.received(len(piece))
    assert events(conn) == [
        Request(p.NBD_CMD_WRITE, 0, 7, 0, 4, b"data"),
        Request(p.NBD_CMD_FLUSH, 0, 9, 0, 0, b""),
    ]
    assert conn.buffered_bytes == 0


# -- the stream may be split anywhere -------------------------------------------------------------


def session_stream() -> bytes:
    big = bytes(range(256)) * 700  # over the inline payload size
    return (
        p.CLIENT_FLAGS.pack(FLAGS)
        + option(p.NBD_OPT_LIST)
        + option(p.NBD_OPT_STRUCTURED_REPLY)
        + option(p.NBD_OPT_SET_META_CONTEXT, meta_data("disk", [p.BASE_ALLOCATION]))
        + option(p.NBD_OPT_GO, info_data("disk", [p.NBD_INFO_NAME]))
        + request(p.NBD_CMD_WRITE, 0, 5, cookie=1, data=b"hello")
        + request(p.NBD_CMD_READ, 0, 5, cookie=2)
        + request(p.NBD_CMD_WRITE, 4096, len(big), cookie=3, data=big)
        + request(p.NBD_CMD_READ, SIZE, 1, cookie=4)
        + request(p.NBD_CMD_BLOCK_STATUS, 0, 4096, cookie=5)
        + request(p.NBD_CMD_DISC, cookie=6)
    )


def run_split(stream: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    conn = NbdConnection(EXPORTS, max_payload_bytes=MAX_PAYLOAD)
    out = conn.data_to_send()
    got: list[Event] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        conn.receive_data(stream[a:b])
        while got == [] or not isinstance(got[-1], Disconnect):
            event = conn.next_event()
            conn.check()
            if event is NEED_DATA:
                break
            assert not isinstance(event, type(NEED_DATA))
            if is_request(event):
                event = Request(*event)._replace(data=bytes(Request(*event).data))
            got.append(event)
        out += conn.data_to_send()
    return got, out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_events_do_not_depend_on_how_the_bytes_were_split(data: st.DataObject) -> None:
    stream = session_stream()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert run_split(stream, cuts) == run_split(stream, [])


def test_events_byte_by_byte_match_the_whole_stream() -> None:
    stream = session_stream()
    head = len(stream) - 180_000  # keep the run short: byte by byte up to the big payload
    whole = run_split(stream, [])
    assert run_split(stream, list(range(head))) == whole
    events_, _ = whole
    assert [type(Request(*e) if is_request(e) else e).__name__ for e in events_] == [
        "OptionReplied",
        "OptionReplied",
        "OptionReplied",
        "Ready",
        "Request",
        "Request",
        "Request",
        "Invalid",
        "Request",
        "Disconnect",
    ]


# -- replies -------------------------------------------------------------------------------------


def test_error_replies_simple_and_structured() -> None:
    simple = transmitting()
    assert simple.error_reply(5, p.NBD_EIO, "boom") == (
        p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.NBD_EIO, 5),
    )
    structured = transmitting(structured=True)
    header, payload = structured.error_reply(5, p.NBD_EIO, "boom")
    assert p.CHUNK_HEADER.unpack(header) == (
        p.STRUCTURED_REPLY_MAGIC,
        p.NBD_REPLY_FLAG_DONE,
        p.NBD_REPLY_TYPE_ERROR,
        5,
        len(payload),
    )
    assert payload == struct.pack(">IH", p.NBD_EIO, 4) + b"boom"


def test_read_replies() -> None:
    assert transmitting().read_reply(3, 0, b"abc") == (
        p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 3),
        b"abc",
    )
    header, data = transmitting(structured=True).read_reply(3, 4096, b"abc")
    assert data == b"abc"
    assert p.CHUNK_OFFSET_DATA_HEADER.unpack(header) == (
        p.STRUCTURED_REPLY_MAGIC,
        p.NBD_REPLY_FLAG_DONE,
        p.NBD_REPLY_TYPE_OFFSET_DATA,
        3,
        11,
        4096,
    )


def test_sparse_segments_merge_and_cover_the_read() -> None:
    zero = p.NBD_STATE_ZERO | p.NBD_STATE_HOLE
    extents = [(100, 0), (50, 0), (200, zero), (10, zero), (1000, 0)]
    assert NbdConnection.sparse_segments(10, 400, extents) == [
        (10, 150, False),
        (160, 210, True),
        (370, 40, False),
    ]
    # Extents that stop short leave data for the rest.
    assert NbdConnection.sparse_segments(0, 100, [(30, zero)]) == [(0, 30, True), (30, 70, False)]


def test_sparse_read_reply_marks_only_the_last_chunk_done() -> None:
    conn = transmitting(structured=True)
    buffers = conn.sparse_read_reply(9, [(0, 4, None), (4, 2, b"ab")])
    hole = p.CHUNK_OFFSET_HOLE.unpack(buffers[0])
    assert hole == (p.STRUCTURED_REPLY_MAGIC, 0, p.NBD_REPLY_TYPE_OFFSET_HOLE, 9, 12, 0, 4)
    data = p.CHUNK_OFFSET_DATA_HEADER.unpack(buffers[1])
    assert data[1] == p.NBD_REPLY_FLAG_DONE and data[5] == 4 and buffers[2] == b"ab"


@pytest.mark.parametrize("req_one", [False, True])
def test_block_status_reply_merges_and_clips(req_one: bool) -> None:
    conn = transmitting(meta=True)
    flags = p.NBD_CMD_FLAG_REQ_ONE if req_one else 0
    header, payload = conn.block_status_reply(4, flags, 300, [(100, 0), (100, 0), (500, 3)])
    assert p.CHUNK_HEADER.unpack(header)[2] == p.NBD_REPLY_TYPE_BLOCK_STATUS
    expected = [200, 0] if req_one else [200, 0, 100, 3]
    assert struct.unpack(f">I{len(expected)}I", payload) == (1, *expected)
    with pytest.raises(ValueError, match="no extents"):
        conn.block_status_reply(4, 0, 300, [])


def test_statistics_count_options_and_requests() -> None:
    conn = transmitting(structured=True)
    conn.receive_data(request(p.NBD_CMD_FLUSH) + request(99) + request(p.NBD_CMD_WRITE, 0, 2))
    assert len(events(conn)) == 2
    stats = conn.statistics()
    assert (stats.state, stats.options, stats.requests) == ("transmission", 2, 2)
    assert stats.structured and not stats.tls_active and stats.export == "disk"
    assert stats.buffered_bytes == p.REQUEST.size  # the write waits for its payload
    conn.receive_data(b"xy")
    assert len(events(conn)) == 1 and conn.statistics().requests == 3


def test_check_reports_a_broken_buffer_window() -> None:
    conn = transmitting()
    conn.check()
    conn._start = conn._end + 1  # what a bookkeeping bug would leave
    with pytest.raises(AssertionError, match="receive window"):
        conn.check()


def test_requests_are_plain_tuples_and_no_other_event_is() -> None:
    conn = transmitting()
    conn.receive_data(request(p.NBD_CMD_READ, 0, 8) + request(99) + request(p.NBD_CMD_DISC))
    read, invalid, disc = conn.next_events()
    assert type(read) is tuple and is_request(read)
    assert Request(*read) == Request(p.NBD_CMD_READ, 0, 7, 0, 8, b"")
    assert not is_request(invalid) and not is_request(disc)
    assert not any(is_request(e) for e in (StartTls(), Aborted(), Ready(EXPORTS[0])))
