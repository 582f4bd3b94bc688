"""The server side of the NBD protocol as a state machine without I/O.

``NbdConnection`` turns the bytes a client sent into events and the
server's answers into bytes, in the style of h11: it has no socket, no
thread and no backend. The caller moves bytes (``receive_buffer`` and
``received``, or ``receive_data``; ``data_to_send``), asks for the next
event with ``next_event`` and, for each request, calls its backend and
builds the reply with one of the ``*_reply`` methods.

Phases, as the specification (``doc/proto.md`` of the reference
implementation) names them:

- handshake: the greeting is queued at construction; the client flags and
  every option are parsed and answered here (the answers depend only on the
  export table and on what was negotiated), each answered option yielding an
  ``OptionReplied`` event. ``StartTls`` asks the caller to upgrade the
  transport after sending the ACK (then call ``tls_started``); ``Aborted``
  and ``Disconnect`` end the connection; ``Ready`` starts transmission.
- transmission: each request becomes a request tuple (valid for this export
  and negotiation) or an ``Invalid`` (to be answered with ``error_reply``);
  ``NBD_CMD_DISC`` and end of input become ``Disconnect``.

Breaking a MUST of the protocol (bad magic, unknown client flags, an option
or write payload over the limits, bytes sent ahead of a TLS upgrade) raises
``NbdProtocolError``: the caller drops the client. Nothing is allocated from
a client-supplied length before it is checked against its limit.

Buffers: the connection owns one receive buffer. A write request's
``data`` is a view into it (or into a spare payload buffer for large
writes), valid until the next call of ``receive_buffer``, ``received`` or
``receive_data``: a caller that keeps the data longer copies it. Reply
methods only read negotiated state, so worker threads may build replies
while the reading thread goes on parsing.
"""

from __future__ import annotations

import array
import functools
import struct
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from vmpager.errors import InvariantViolation
from vmpager.nbd import protocol as p
from vmpager.units import check_int

__all__ = [
    "NEED_DATA",
    "Aborted",
    "Disconnect",
    "ExportInfo",
    "Invalid",
    "NbdConnection",
    "NbdConnectionStatistics",
    "NbdProtocolError",
    "OptionReplied",
    "Ready",
    "Request",
    "RequestTuple",
    "StartTls",
    "TlsMode",
    "is_request",
]

#: Bytes of receive buffer: many pipelined small requests per receive.
RECV_BUFFER_BYTES: Final = 256 * 1024
#: Write payloads up to this size are received into the receive buffer itself.
INLINE_PAYLOAD_BYTES: Final = 128 * 1024
#: A connection keeps a spare buffer for larger payloads up to this size.
SPARE_PAYLOAD_BYTES: Final = 8 * 1024 * 1024
#: Option data longer than this is a denial of service: the connection is dropped.
MAX_OPTION_BYTES: Final = 64 * 1024
#: Longest export name or metadata-context query, per the specification's string rule.
MAX_STRING_BYTES: Final = 4096
#: Most block-status descriptors in one reply chunk (the specification's limit).
MAX_DESCRIPTORS: Final = 1 << 20
#: Metadata context id given to ``base:allocation``.
BASE_ALLOCATION_ID: Final = 1

TlsMode = Literal["off", "require"]

_ALLOWED_FLAGS: Final[dict[int, int]] = {
    p.NBD_CMD_READ: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_DF,
    p.NBD_CMD_WRITE: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_DISC: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_FLUSH: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_TRIM: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_CACHE: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE_ZEROES: (
        p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_NO_HOLE | p.NBD_CMD_FLAG_FAST_ZERO
    ),
    p.NBD_CMD_BLOCK_STATUS: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_REQ_ONE,
}
_WRITE_FLAGS: Final = _ALLOWED_FLAGS[p.NBD_CMD_WRITE]
_READ_FLAGS: Final = _ALLOWED_FLAGS[p.NBD_CMD_READ]
_ZEROES_124: Final = bytes(124)
_pack_simple = p.SIMPLE_REPLY.pack
_pack_data_header = p.CHUNK_OFFSET_DATA_HEADER.pack
_unpack_request = p.REQUEST.unpack_from
_REQUEST_SIZE: Final = p.REQUEST.size
_REQUEST_MAGIC: Final = p.REQUEST_MAGIC
_CMD_READ: Final = p.NBD_CMD_READ
_CMD_WRITE: Final = p.NBD_CMD_WRITE

#: The reply to a successful command without payload: ``ok_reply(cookie)``.
ok_reply: Final = functools.partial(_pack_simple, p.SIMPLE_REPLY_MAGIC, 0)
#: Header of the one DONE data chunk of a structured read:
#: ``data_chunk_header(cookie, length + 8, offset)``.
data_chunk_header: Final = functools.partial(
    _pack_data_header,
    p.STRUCTURED_REPLY_MAGIC,
    p.NBD_REPLY_FLAG_DONE,
    p.NBD_REPLY_TYPE_OFFSET_DATA,
)


class NbdProtocolError(Exception):
    """The client broke a MUST of the protocol; the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the protocol tells a client about one export (no backend in it)."""

    name: str
    size_bytes: int
    description: str = ""
    preferred_block_bytes: int = 4096


@dataclass(frozen=True, slots=True)
class NbdConnectionStatistics:
    """What one connection's protocol did so far (``NbdConnection.statistics()``)."""

    state: str
    options: int
    requests: int
    tls_active: bool
    structured: bool
    export: str | None
    buffered_bytes: int


# -- events ----------------------------------------------------------------------------------


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event`` needs more bytes: send ``data_to_send()``, then receive.
NEED_DATA: Final = _NeedData()


class OptionReplied(NamedTuple):
    """An option was answered (its replies are queued); ``reply`` is the last reply type."""

    option: int
    reply: int


class StartTls(NamedTuple):
    """The client asked for TLS and the ACK is queued: send it, upgrade, call ``tls_started``."""


class Aborted(NamedTuple):
    """The client sent ``NBD_OPT_ABORT`` (its ACK is queued): send it and close."""


class Ready(NamedTuple):
    """The handshake is over (its replies are queued): transmission of ``export`` begins."""

    export: ExportInfo


class Disconnect(NamedTuple):
    """The connection ends: ``NBD_CMD_DISC`` (``clean``), end of input or a refused export."""

    reason: str
    clean: bool


#: A transmission request valid for the export and what was negotiated:
#: ``(command, flags, cookie, offset, length, data)``, a plain tuple (the one
#: event that is not a class of its own: requests are the hot path, and a
#: tuple subclass per request cost the server 5-7 % of its CPU per request).
#: ``data`` is the payload of a write (see the module's note on its lifetime),
#: empty for every other command. ``Request(*event)`` gives the fields names.
RequestTuple = tuple[int, int, int, int, int, memoryview | bytes]


class Request(NamedTuple):
    """The fields of a request event, by name (``Request(*event)``)."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: memoryview | bytes


def is_request(event: object) -> bool:
    """True for a request event (a plain tuple; every other event is a class)."""
    return type(event) is tuple


class Invalid(NamedTuple):
    """A request to answer with ``error_reply(cookie, error, message)``; the connection goes on."""

    cookie: int
    error: int
    message: str


Event = OptionReplied | StartTls | Aborted | Ready | Disconnect | RequestTuple | Invalid

# States.
_CLIENT_FLAGS: Final = 0
_OPTIONS: Final = 1
_TLS_PENDING: Final = 2
_TRANSMISSION: Final = 3
_PAYLOAD: Final = 4
_CLOSED: Final = 5
_STATE_NAMES: Final = (
    "client-flags",
    "options",
    "tls-pending",
    "transmission",
    "payload",
    "closed",
)


def _decode(data: bytes | memoryview) -> str | None:
    try:
        text = bytes(data).decode()
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


class NbdConnection:
    """One client's protocol state (server side); see the module docstring.

    ``exports`` maps names to what is told about them (the first is the
    default, served for the empty name). ``read_only`` refuses writes,
    trims and zeroing with ``NBD_EPERM``; ``multi_conn`` advertises
    ``NBD_FLAG_CAN_MULTI_CONN``; ``max_payload_bytes`` is the advertised
    maximum payload (longer reads get an error, longer writes are a protocol
    error). ``tls="require"`` answers every option but STARTTLS and ABORT
    with ``NBD_REP_ERR_TLS_REQD`` until ``tls_started()``; ``"off"`` refuses
    STARTTLS. Not thread-safe: one thread feeds bytes and takes events; the
    reply methods may be called from any thread.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo] | Sequence[ExportInfo],
        *,
        read_only: bool = False,
        multi_conn: bool = True,
        max_payload_bytes: int = 32 * 1024 * 1024,
        tls: TlsMode = "off",
        recv_buffer_bytes: int = RECV_BUFFER_BYTES,
    ) -> None:
        table = list(exports.values()) if isinstance(exports, Mapping) else list(exports)
        if not table:
            raise ValueError("exports must name at least one export")
        self._exports: dict[str, ExportInfo] = {e.name: e for e in table}
        self._default = table[0]
        self._max_payload = check_int(
            max_payload_bytes, "max_payload_bytes", minimum=1, maximum=p.MAX_U32
        )
        if tls not in ("off", "require"):
            raise ValueError(f"tls must be 'off' or 'require', got {tls!r}")
        self._tls_required = tls == "require"
        self.tls_active = False
        self.read_only = bool(read_only)
        self._multi_conn = bool(multi_conn)
        self._buf = bytearray(
            check_int(
                recv_buffer_bytes,
                "recv_buffer_bytes",
                minimum=INLINE_PAYLOAD_BYTES + _REQUEST_SIZE,
            )
        )
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._eof = False
        self._backlog = bytearray()  # bytes given to receive_data that did not fit yet
        self._spare = bytearray()
        self._payload: memoryview | None = None
        self._payload_have = 0
        self._payload_request: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._queued: deque[Event] = deque()
        self._noptions = 0
        self._nrequests = 0
        self._out = bytearray(
            p.HANDSHAKE.pack(
                p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
            )
        )
        self._state = _CLIENT_FLAGS
        # Negotiated state.
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None
        self.export: ExportInfo | None = None
        self.block_status_ok = False
        self._size = 0
        self._read_flags = _READ_FLAGS

    # -- bytes in -----------------------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """Where the next received bytes go (then call ``received``); never empty.

        Invalidates the data of write requests returned before.
        """
        payload = self._payload
        if payload is not None:
            return payload[self._payload_have :]
        start = self._start
        if start:
            end = self._end
            self._buf[: end - start] = self._view[start:end]
            self._end = end - start
            self._start = 0
        return self._view[self._end :]

    def received(self, nbytes: int) -> None:
        """``nbytes`` were written into ``receive_buffer()``; 0 means the client closed."""
        if nbytes == 0:
            self._eof = True
        elif self._payload is not None:
            self._payload_have += nbytes
        else:
            self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed ``data`` (any amount; ``b""`` means the client closed)."""
        if not data:
            self.received(0)
            return
        self._backlog += data
        self._drain_backlog()

    def _drain_backlog(self) -> bool:
        moved = False
        while self._backlog:
            room = self.receive_buffer()
            n = min(len(room), len(self._backlog))
            if n == 0:
                break
            room[:n] = self._backlog[:n]
            del self._backlog[:n]
            self.received(n)
            moved = True
        return moved

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet turned into events."""
        return self._end - self._start + len(self._backlog) + self._payload_have

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> NbdConnectionStatistics:
        """Counters and state (options parsed, requests parsed including refused ones)."""
        return NbdConnectionStatistics(
            state=_STATE_NAMES[self._state],
            options=self._noptions,
            requests=self._nrequests,
            tls_active=self.tls_active,
            structured=self.structured,
            export=None if self.export is None else self.export.name,
            buffered_bytes=self.buffered_bytes,
        )

    def check(self) -> None:
        """Assert the buffer bookkeeping and that the state agrees with the negotiation."""
        problems: list[str] = []
        if not 0 <= self._start <= self._end <= len(self._buf):
            problems.append(f"receive window [{self._start}, {self._end}) outside the buffer")
        if (self._payload is None) != (self._state != _PAYLOAD):
            problems.append(f"payload buffer {self._payload is not None} in state {self._state}")
        if self._payload is not None and not 0 <= self._payload_have <= len(self._payload):
            problems.append(f"payload has {self._payload_have} of {len(self._payload)} bytes")
        if self._state in (_TRANSMISSION, _PAYLOAD) and self.export is None:
            problems.append("transmission without an export")
        if self._state in (_CLIENT_FLAGS, _OPTIONS, _TLS_PENDING) and self.export is not None:
            problems.append("an export chosen during negotiation")
        if self.tls_active and not self._tls_required:
            problems.append("TLS active on a connection without TLS")
        if self.block_status_ok and not self.structured:
            problems.append("block status allowed without structured replies")
        if problems:
            raise InvariantViolation(problems)

    # -- bytes out ----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake bytes queued so far (greeting, option replies); empties the queue."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The transport now runs TLS (after ``StartTls``); option haggling starts afresh."""
        if self._state != _TLS_PENDING:
            raise RuntimeError("tls_started() without a StartTls event")
        self.tls_active = True
        self.structured = False
        self._meta_export = None
        self._state = _OPTIONS

    # -- events -------------------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """The next event, or ``NEED_DATA``; raises ``NbdProtocolError``.

        One event of ``next_events()`` at a time.
        """
        queued = self._queued
        if not queued:
            queued.extend(self.next_events())
            if not queued:
                return NEED_DATA
        return queued.popleft()

    def next_events(self) -> list[Event]:
        """Every event the buffered bytes make, in order; empty means ``NEED_DATA``.

        In transmission, all complete requests at once: one header unpack
        and the checks of its command each, no bytes copied for a write whose
        payload is in the receive buffer (its ``data`` is a view: consume the
        events before receiving again). Raises ``NbdProtocolError`` when the
        first unparsed message breaks the protocol (events before it are
        returned first, the error on the next call).
        """
        if self._queued:
            events = list(self._queued)
            self._queued.clear()
            return events
        while True:
            if self._state == _TRANSMISSION:
                events = self._requests()
                if events:
                    return events
            else:
                event = self._slow_event()
                if event is not None:
                    return [event]
            if not (self._backlog and self._drain_backlog()):
                if self._eof:
                    return [self._end_of_input()]
                return []

    def _requests(self) -> list[Event]:
        """Parse every complete request in the receive buffer (transmission state)."""
        events: list[Event] = []
        append = events.append
        buf = self._buf
        view = self._view
        start = self._start
        end = self._end
        size = self._size
        max_payload = self._max_payload
        read_flags = self._read_flags
        refuse_writes = self.read_only
        while end - start >= _REQUEST_SIZE:
            magic, flags, command, cookie, offset, length = _unpack_request(buf, start)
            if magic != _REQUEST_MAGIC:
                if events:
                    break  # answered first; the error comes with the next call
                raise NbdProtocolError(f"bad request magic {magic:#x}")
            # READ and WRITE are checked inline: they are nearly every request.
            if command == _CMD_READ:
                start += _REQUEST_SIZE
                if flags & ~read_flags or offset + length > size or length > max_payload:
                    append(self._bad_read(flags, cookie, offset, length))
                else:
                    append((_CMD_READ, flags, cookie, offset, length, b""))
            elif command == _CMD_WRITE:
                begin = start + _REQUEST_SIZE
                if end - begin < length or length > max_payload:
                    if events:
                        break  # answered first; the payload is awaited on the next call
                    self._start = start
                    self._write_request(start, end, flags, cookie, offset, length)
                    return events
                start = begin + length
                if flags & ~_WRITE_FLAGS or refuse_writes or offset + length > size:
                    append(self._bad_write(flags, cookie))
                else:
                    data = view[begin:start]
                    append((_CMD_WRITE, flags, cookie, offset, length, data))
            else:
                start += _REQUEST_SIZE
                event = self._other_request(command, flags, cookie, offset, length)
                append(event)
                if type(event) is Disconnect:
                    break
        self._start = start
        self._nrequests += len(events)
        return events

    def _slow_event(self) -> Event | None:
        """One step outside plain transmission; None when more bytes are needed."""
        state = self._state
        if state == _PAYLOAD:
            payload = self._payload
            assert payload is not None
            if self._payload_have < len(payload):
                return None
            self._payload = None
            self._payload_have = 0
            self._state = _TRANSMISSION
            flags, cookie, offset, length = self._payload_request
            self._nrequests += 1
            return self._check_write(flags, cookie, offset, length, payload)
        if state == _OPTIONS:
            return self._option()
        if state == _CLIENT_FLAGS:
            if self._end - self._start < p.CLIENT_FLAGS.size:
                return None
            (client_flags,) = p.CLIENT_FLAGS.unpack_from(self._buf, self._start)
            self._start += p.CLIENT_FLAGS.size
            if client_flags & ~(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES):
                raise NbdProtocolError(f"unknown client flags {client_flags:#x}")
            self.no_zeroes = bool(client_flags & p.NBD_FLAG_C_NO_ZEROES)
            self._state = _OPTIONS
            return self._option()
        if state == _TLS_PENDING:
            if self._end > self._start or self._backlog:
                # Bytes sent before the TLS handshake could be injected by anyone on the path.
                raise NbdProtocolError("client sent data after NBD_OPT_STARTTLS before TLS")
            return None
        if state == _CLOSED:
            raise RuntimeError("next_event() after the connection ended")
        return None

    def _end_of_input(self) -> Disconnect:
        inside = self._end > self._start or self._payload is not None
        self._state = _CLOSED
        if inside:
            return Disconnect("client closed the connection in the middle of a message", False)
        return Disconnect("client closed the connection", False)

    # -- handshake ----------------------------------------------------------------------------

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _refuse(self, option: int, reply: int, message: str) -> OptionReplied:
        self._reply(option, reply, message.encode()[:MAX_STRING_BYTES])
        return OptionReplied(option, reply)

    def _ack(self, option: int) -> OptionReplied:
        self._reply(option, p.NBD_REP_ACK)
        return OptionReplied(option, p.NBD_REP_ACK)

    def _lookup(self, name: str) -> ExportInfo | None:
        export = self._exports.get(name)
        if export is None and name == "":
            export = self._default
        return export

    def transmission_flags(self) -> int:
        """The 16 transmission flags this connection advertises."""
        flags = (
            p.NBD_FLAG_HAS_FLAGS
            | p.NBD_FLAG_SEND_FLUSH
            | p.NBD_FLAG_SEND_FUA
            | p.NBD_FLAG_SEND_CACHE
        )
        if self.read_only:
            flags |= p.NBD_FLAG_READ_ONLY
        else:
            flags |= p.NBD_FLAG_SEND_TRIM | p.NBD_FLAG_SEND_WRITE_ZEROES | p.NBD_FLAG_SEND_FAST_ZERO
        if self._multi_conn:
            flags |= p.NBD_FLAG_CAN_MULTI_CONN
        if self.structured:
            flags |= p.NBD_FLAG_SEND_DF
        return flags

    def _option(self) -> Event | None:
        start = self._start
        if self._end - start < p.OPTION_HEADER.size:
            return None
        magic, option, length = p.OPTION_HEADER.unpack_from(self._buf, start)
        if magic != p.IHAVEOPT:
            raise NbdProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_BYTES:
            raise NbdProtocolError(f"option {option} carries {length} bytes (> {MAX_OPTION_BYTES})")
        begin = start + p.OPTION_HEADER.size
        if self._end - begin < length:
            return None
        data = bytes(self._view[begin : begin + length])
        self._start = begin + length
        self._noptions += 1

        if option == p.NBD_OPT_ABORT:
            self._ack(option)
            self._state = _CLOSED
            return Aborted()
        if option == p.NBD_OPT_STARTTLS:
            if self.tls_active:
                return self._refuse(option, p.NBD_REP_ERR_INVALID, "TLS is already active")
            if not self._tls_required:
                return self._refuse(option, p.NBD_REP_ERR_UNSUP, "TLS is not configured")
            if data:
                return self._refuse(option, p.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            self._ack(option)
            self._state = _TLS_PENDING
            if self._end > self._start:
                raise NbdProtocolError("client sent data after NBD_OPT_STARTTLS before TLS")
            return StartTls()
        if self._tls_required and not self.tls_active:
            if option == p.NBD_OPT_EXPORT_NAME:
                # EXPORT_NAME cannot be refused: the specification says to end the session.
                self._state = _CLOSED
                return Disconnect("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server", False)
            option_name = p.OPTION_NAMES.get(option, str(option))
            return self._refuse(option, p.NBD_REP_ERR_TLS_REQD, f"{option_name} needs TLS first")
        if option == p.NBD_OPT_EXPORT_NAME:
            name = _decode(data)
            export = None if name is None else self._lookup(name)
            if export is None:
                # EXPORT_NAME has no error reply: the specification says to hang up.
                self._state = _CLOSED
                return Disconnect(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}", False)
            reply = p.EXPORT_NAME_REPLY.pack(export.size_bytes, self.transmission_flags())
            self._out += reply if self.no_zeroes else reply + _ZEROES_124
            return self._enter(export)
        if option == p.NBD_OPT_LIST:
            if data:
                return self._refuse(option, p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            for export in self._exports.values():
                encoded = export.name.encode()
                # Text after the name is a description for people (the spec allows it).
                payload = struct.pack(">I", len(encoded)) + encoded + export.description.encode()
                self._reply(option, p.NBD_REP_SERVER, payload)
            return self._ack(option)
        if option in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
            return self._info(option, data)
        if option == p.NBD_OPT_STRUCTURED_REPLY:
            if data:
                return self._refuse(
                    option, p.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"
                )
            self.structured = True
            return self._ack(option)
        if option in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        name = p.OPTION_NAMES.get(option, str(option))
        return self._refuse(option, p.NBD_REP_ERR_UNSUP, f"option {name} not supported")

    def _info(self, option: int, data: bytes) -> Event:
        """NBD_OPT_INFO / NBD_OPT_GO."""
        if len(data) < 6:
            return self._refuse(option, p.NBD_REP_ERR_INVALID, "option data shorter than 6 bytes")
        (name_len,) = struct.unpack_from(">I", data, 0)
        if name_len > len(data) - 6:
            return self._refuse(option, p.NBD_REP_ERR_INVALID, "name length exceeds option data")
        (nrequests,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * nrequests:
            return self._refuse(
                option, p.NBD_REP_ERR_INVALID, "option length does not match information requests"
            )
        requests = set(struct.unpack_from(f">{nrequests}H", data, 6 + name_len))
        name = _decode(data[4 : 4 + name_len])
        if name is None:
            return self._refuse(option, p.NBD_REP_ERR_INVALID, "export name is not valid UTF-8")
        export = self._lookup(name)
        if export is None:
            return self._refuse(option, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        self._reply(
            option,
            p.NBD_REP_INFO,
            p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, export.size_bytes, self.transmission_flags()),
        )
        if p.NBD_INFO_NAME in requests:
            payload = struct.pack(">H", p.NBD_INFO_NAME) + export.name.encode()
            self._reply(option, p.NBD_REP_INFO, payload)
        if p.NBD_INFO_DESCRIPTION in requests and export.description:
            payload = struct.pack(">H", p.NBD_INFO_DESCRIPTION) + export.description.encode()
            self._reply(option, p.NBD_REP_INFO, payload)
        # Sent unasked too: the values are the protocol defaults (minimum 1), so a client
        # that did not ask loses nothing by ignoring them.
        self._reply(
            option,
            p.NBD_REP_INFO,
            p.INFO_BLOCK_SIZE.pack(
                p.NBD_INFO_BLOCK_SIZE, 1, export.preferred_block_bytes, self._max_payload
            ),
        )
        self._reply(option, p.NBD_REP_ACK)
        if option == p.NBD_OPT_GO:
            return self._enter(export)
        return OptionReplied(option, p.NBD_REP_ACK)

    def _meta_context(self, option: int, data: bytes) -> OptionReplied:
        setting = option == p.NBD_OPT_SET_META_CONTEXT
        if setting:
            self._meta_export = None  # a SET replaces the selection even when it fails
            if not self.structured:
                return self._refuse(
                    option, p.NBD_REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first"
                )
        parsed = self._parse_meta_request(data)
        if parsed is None:
            return self._refuse(option, p.NBD_REP_ERR_INVALID, "malformed metadata context request")
        name, queries = parsed
        export = self._lookup(name)
        if export is None:
            return self._refuse(option, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        if setting:
            selected = p.BASE_ALLOCATION in queries
        else:
            selected = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        if selected:
            context_id = BASE_ALLOCATION_ID if setting else 0
            payload = struct.pack(">I", context_id) + p.BASE_ALLOCATION.encode()
            self._reply(option, p.NBD_REP_META_CONTEXT, payload)
            if setting:
                self._meta_export = export.name
        return self._ack(option)

    @staticmethod
    def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
        """Export name and query strings, or None when the request is malformed."""
        try:
            (name_len,) = struct.unpack_from(">I", data, 0)
            pos = 4 + name_len
            if pos + 4 > len(data) or name_len > MAX_STRING_BYTES:
                return None
            name = _decode(data[4:pos])
            (nqueries,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries: list[str] = []
            for _ in range(nqueries):
                (query_len,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if query_len > MAX_STRING_BYTES or pos + query_len > len(data):
                    return None
                query = _decode(data[pos : pos + query_len])
                if query is None or ":" not in query:
                    return None
                queries.append(query)
                pos += query_len
        except struct.error:
            return None
        if pos != len(data) or name is None:
            return None
        return name, queries

    def _enter(self, export: ExportInfo) -> Ready:
        self.export = export
        self._size = export.size_bytes
        self.block_status_ok = self.structured and self._meta_export == export.name
        self._read_flags = _READ_FLAGS if self.structured else _READ_FLAGS & ~p.NBD_CMD_FLAG_DF
        self._state = _TRANSMISSION
        return Ready(export)

    # -- transmission requests ----------------------------------------------------------------

    def _write_request(
        self, start: int, end: int, flags: int, cookie: int, offset: int, length: int
    ) -> None:
        """A write whose payload has not all arrived (or is over the limit)."""
        if length > self._max_payload:
            raise NbdProtocolError(f"write payload {length} exceeds maximum {self._max_payload}")
        begin = start + _REQUEST_SIZE
        have = end - begin
        if length <= INLINE_PAYLOAD_BYTES:
            return None  # header and payload fit the buffer once it is compacted
        # A large payload goes to its own buffer, which the caller then receives into.
        payload = self._payload_buffer(length)
        payload[:have] = self._view[begin:end]
        self._start = self._end = 0
        self._payload = payload
        self._payload_have = have
        self._payload_request = (flags, cookie, offset, length)
        self._state = _PAYLOAD
        return None

    def _payload_buffer(self, length: int) -> memoryview:
        """A buffer for a write payload too big for the receive buffer (reused when small)."""
        if length > SPARE_PAYLOAD_BYTES:
            return memoryview(bytearray(length))
        if len(self._spare) < length:
            self._spare = bytearray(max(length, INLINE_PAYLOAD_BYTES * 2))
        return memoryview(self._spare)[:length]

    def _check_write(
        self, flags: int, cookie: int, offset: int, length: int, data: memoryview
    ) -> RequestTuple | Invalid:
        if flags & ~_WRITE_FLAGS or self.read_only or offset + length > self._size:
            return self._bad_write(flags, cookie)
        return (p.NBD_CMD_WRITE, flags, cookie, offset, length, data)

    def _bad_write(self, flags: int, cookie: int) -> Invalid:
        """The error of a write whose payload arrived but that cannot be done."""
        bad_flags = flags & ~_WRITE_FLAGS
        if bad_flags:
            return Invalid(cookie, p.NBD_EINVAL, f"unsupported flags {bad_flags:#x}")
        if self.read_only:
            return Invalid(cookie, p.NBD_EPERM, "export is read-only")
        return Invalid(cookie, p.NBD_ENOSPC, f"write past the end ({self._size} bytes)")

    def _bad_read(self, flags: int, cookie: int, offset: int, length: int) -> Invalid:
        """The error of a read that failed the inline checks."""
        structured = self.structured
        if flags & ~self._read_flags:
            return Invalid(cookie, p.NBD_EINVAL, f"unsupported flags {flags:#x}")
        if offset + length > self._size:
            return Invalid(cookie, p.NBD_EINVAL, f"read past the end ({self._size} bytes)")
        error = p.NBD_EOVERFLOW if structured else p.NBD_EINVAL
        return Invalid(cookie, error, f"read length {length} > maximum {self._max_payload}")

    def _other_request(
        self, command: int, flags: int, cookie: int, offset: int, length: int
    ) -> RequestTuple | Invalid | Disconnect:
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return Invalid(cookie, p.NBD_EINVAL, f"unknown command {command}")
        if command == p.NBD_CMD_DISC:
            self._state = _CLOSED
            return Disconnect("client sent NBD_CMD_DISC", True)
        bad_flags = flags & ~allowed
        if bad_flags:
            return Invalid(cookie, p.NBD_EINVAL, f"unsupported flags {bad_flags:#x}")
        size = self._size
        name = p.COMMAND_NAMES[command]
        if command == p.NBD_CMD_FLUSH:
            if offset or length:
                return Invalid(cookie, p.NBD_EINVAL, "flush offset and length must be zero")
        elif command in (p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES):
            if self.read_only:
                return Invalid(cookie, p.NBD_EPERM, "export is read-only")
            if offset + length > size:
                error = p.NBD_EINVAL if command == p.NBD_CMD_TRIM else p.NBD_ENOSPC
                return Invalid(cookie, error, f"{name} past the end ({size} bytes)")
        elif command == p.NBD_CMD_CACHE:
            if offset + length > size:
                return Invalid(cookie, p.NBD_EINVAL, f"cache past the end ({size} bytes)")
        else:  # NBD_CMD_BLOCK_STATUS
            if not self.block_status_ok:
                return Invalid(
                    cookie, p.NBD_EINVAL, "no metadata context was selected for this export"
                )
            if length == 0 or offset + length > size:
                return Invalid(cookie, p.NBD_EINVAL, f"block status range outside [0, {size})")
        return (command, flags, cookie, offset, length, b"")

    # -- replies (pure: any thread) -----------------------------------------------------------

    def ok_reply(self, cookie: int) -> bytes:
        """Success of a command without payload (a simple reply)."""
        return ok_reply(cookie)

    def error_reply(self, cookie: int, error: int, message: str) -> tuple[bytes, ...]:
        """An error: an ERROR chunk with ``message`` when structured, else a simple reply."""
        if self.structured:
            text = message.encode()[:MAX_STRING_BYTES]
            payload = struct.pack(">IH", error, len(text)) + text
            header = p.CHUNK_HEADER.pack(
                p.STRUCTURED_REPLY_MAGIC,
                p.NBD_REPLY_FLAG_DONE,
                p.NBD_REPLY_TYPE_ERROR,
                cookie,
                len(payload),
            )
            return (header, payload)
        return (_pack_simple(p.SIMPLE_REPLY_MAGIC, error, cookie),)

    def read_reply(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview
    ) -> tuple[bytes, bytes | bytearray | memoryview]:
        """A whole read: one OFFSET_DATA chunk when structured, else a simple reply."""
        if self.structured:
            return (data_chunk_header(cookie, len(data) + 8, offset), data)
        return (ok_reply(cookie), data)

    def empty_read_reply(self, cookie: int) -> bytes:
        """A structured read of length 0: one NONE chunk."""
        return p.CHUNK_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_NONE, cookie, 0
        )

    @staticmethod
    def sparse_segments(
        offset: int, length: int, extents: Iterable[tuple[int, int]]
    ) -> list[tuple[int, int, bool]]:
        """``[(position, nbytes, is_zero)]`` covering the read, adjacent kinds merged.

        ``extents`` are ``(length, NBD_STATE_* flags)`` from ``offset`` on; a
        range they leave uncovered is data.
        """
        end = offset + length
        segments: list[list[int]] = []
        position = offset
        for extent_length, extent_flags in extents:
            nbytes = min(extent_length, end - position)
            if nbytes <= 0:
                break
            is_zero = 1 if extent_flags & p.NBD_STATE_ZERO else 0
            if segments and segments[-1][2] == is_zero:
                segments[-1][1] += nbytes
            else:
                segments.append([position, nbytes, is_zero])
            position += nbytes
        if position < end:
            if segments and not segments[-1][2]:
                segments[-1][1] += end - position
            else:
                segments.append([position, end - position, 0])
        return [(pos, nbytes, bool(zero)) for pos, nbytes, zero in segments]

    def sparse_read_reply(
        self, cookie: int, segments: Sequence[tuple[int, int, bytes | bytearray | None]]
    ) -> list[bytes | bytearray]:
        """Chunks of a structured read: ``(position, nbytes, data or None for a hole)``.

        The last chunk carries DONE, so the caller builds this only once every
        segment was read (no error can follow it).
        """
        buffers: list[bytes | bytearray] = []
        last = len(segments) - 1
        for index, (position, nbytes, data) in enumerate(segments):
            chunk_flags = p.NBD_REPLY_FLAG_DONE if index == last else 0
            if data is None:
                buffers.append(
                    p.CHUNK_OFFSET_HOLE.pack(
                        p.STRUCTURED_REPLY_MAGIC,
                        chunk_flags,
                        p.NBD_REPLY_TYPE_OFFSET_HOLE,
                        cookie,
                        12,
                        position,
                        nbytes,
                    )
                )
            else:
                buffers.append(
                    _pack_data_header(
                        p.STRUCTURED_REPLY_MAGIC,
                        chunk_flags,
                        p.NBD_REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        nbytes + 8,
                        position,
                    )
                )
                buffers.append(data)
        return buffers

    def block_status_reply(
        self, cookie: int, flags: int, length: int, extents: Iterable[tuple[int, int]]
    ) -> tuple[bytes, bytes]:
        """One BLOCK_STATUS chunk for ``base:allocation`` from ``(length, flags)`` extents.

        Adjacent extents with equal flags are merged, the total is clipped to
        ``length``; ``ValueError`` when ``extents`` is empty.
        """
        descriptors = array.array("I")
        remaining = length
        for extent_length, extent_flags in extents:
            extent_length = min(extent_length, remaining)
            if extent_length <= 0:
                break
            if len(descriptors) >= 2 and descriptors[-1] == extent_flags:
                descriptors[-2] += extent_length
            else:
                if len(descriptors) >= 2 * MAX_DESCRIPTORS:
                    break
                descriptors.append(extent_length)
                descriptors.append(extent_flags)
            remaining -= extent_length
        if not descriptors:
            raise ValueError("backend returned no extents")
        if flags & p.NBD_CMD_FLAG_REQ_ONE:
            del descriptors[2:]
        if sys.byteorder == "little":
            descriptors.byteswap()
        payload = struct.pack(">I", BASE_ALLOCATION_ID) + descriptors.tobytes()
        header = p.CHUNK_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC,
            p.NBD_REPLY_FLAG_DONE,
            p.NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie,
            len(payload),
        )
        return (header, payload)
