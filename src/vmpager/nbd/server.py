"""An NBD server: exports ``Backend`` objects over TCP (loopback by default) or a unix socket.

It speaks the fixed-newstyle handshake (EXPORT_NAME, ABORT, LIST, INFO, GO,
STRUCTURED_REPLY, LIST/SET_META_CONTEXT for ``base:allocation``) and every
transmission command of the base protocol (READ, WRITE, FLUSH, TRIM,
WRITE_ZEROES with NO_HOLE/FAST_ZERO, CACHE, BLOCK_STATUS, DISC, FUA on
all of them), with simple or structured replies.

Concurrency: one thread per connection, plus one accepting thread. A
connection thread parses pipelined requests out of one preallocated receive
buffer and executes them in order, so replies go out in request order;
replies are gathered and sent with one ``sendmsg`` when no further complete
request is already buffered (never held back while the thread would wait for
the client). Threads rather than asyncio because every backend call blocks
(the VM takes its lock and does device I/O that releases the GIL): an event
loop would have to push every call to a thread pool anyway, paying a thread
hand-off per request, while here a request costs one ``recv_into`` shared by
all requests that arrived together, the backend call and a share of one
``sendmsg``. Several clients (or the several connections of one
multi-connection client such as nbdcopy) run in parallel in their own
threads and share the backend, which is why ``NBD_FLAG_CAN_MULTI_CONN`` is
honest: FLUSH flushes the one shared backend.

Robustness: a client that breaks the protocol (bad magic, a write payload
over the maximum, unknown client flags) is disconnected; a bad request that
can be answered (unknown command or flag, range past the end, a backend
error) gets an error reply and the connection goes on. Nothing is allocated
from a client-supplied length before it is checked against the maximum
payload, and a write is acknowledged only after ``Backend.write`` returned.
"""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import io
import itertools
import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, cast

from vmpager.errors import InvariantViolation, SwapExhausted
from vmpager.nbd import protocol as p
from vmpager.nbd.backend import Backend
from vmpager.units import check_int

__all__ = ["NbdServer", "NbdServerStatistics"]

log = logging.getLogger(__name__)

#: Bytes of receive buffer per connection: many pipelined small requests per recv.
RECV_BUFFER_BYTES: Final = 256 * 1024
#: Write payloads up to this size are received into the receive buffer itself.
INLINE_PAYLOAD_BYTES: Final = 128 * 1024
#: A connection keeps a spare buffer for larger payloads up to this size.
SPARE_PAYLOAD_BYTES: Final = 8 * 1024 * 1024
#: Replies are sent once this many buffers or bytes are gathered.
SEND_BATCH_BUFFERS: Final = 256
SEND_BATCH_BYTES: Final = 1024 * 1024
#: Option data longer than this is a denial of service: the connection is dropped.
MAX_OPTION_BYTES: Final = 64 * 1024
#: Longest export name or metadata-context query, per the specification's string rule.
MAX_STRING_BYTES: Final = 4096
#: Most block-status descriptors in one reply chunk (the specification's limit).
MAX_DESCRIPTORS: Final = 1 << 20
#: Metadata context id given to ``base:allocation``.
BASE_ALLOCATION_ID: Final = 1

_EMPTY = b""
_ZEROES_124 = bytes(124)

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
_pack_simple = p.SIMPLE_REPLY.pack
_pack_data_header = p.CHUNK_OFFSET_DATA_HEADER.pack


@dataclass(frozen=True, slots=True)
class NbdServerStatistics:
    """Counters of one server since it started (all connections, live and finished)."""

    connections_accepted: int
    connections_active: int
    connections_refused: int
    handshakes_completed: int
    protocol_errors: int
    reads: int
    writes: int
    flushes: int
    trims: int
    write_zeroes: int
    caches: int
    block_status: int
    error_replies: int
    bytes_read: int
    bytes_written: int


class _Counters:
    """Counters written by exactly one thread (a connection thread or one of its workers)."""

    __slots__ = (
        "block_status",
        "bytes_read",
        "bytes_written",
        "caches",
        "error_replies",
        "flushes",
        "handshakes_completed",
        "protocol_errors",
        "reads",
        "trims",
        "write_zeroes",
        "writes",
    )

    block_status: int
    bytes_read: int
    bytes_written: int
    caches: int
    error_replies: int
    flushes: int
    handshakes_completed: int
    protocol_errors: int
    reads: int
    trims: int
    write_zeroes: int
    writes: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def add(self, other: _Counters) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _Disconnect(Exception):
    """The client went away (or must be dropped); the connection ends."""


class _ProtocolError(_Disconnect):
    """The client broke a MUST of the protocol; the connection is dropped."""


@dataclass(frozen=True, slots=True)
class _Export:
    name: str
    backend: Backend
    description: str
    size_bytes: int
    preferred_block_bytes: int


class NbdServer:
    """Serves ``exports`` (name → backend; the first is the default) over NBD.

    ``host``/``port`` give a TCP listener (``port=0`` picks a free port, read
    it from ``port`` after ``start()``); ``unix_path`` gives a unix-socket
    listener instead. ``descriptions`` are shown to clients that ask
    (``nbdinfo``). ``read_only`` refuses writes with ``NBD_EPERM``.
    ``multi_conn`` advertises ``NBD_FLAG_CAN_MULTI_CONN`` (true for any set
    of backends whose ``flush`` covers writes made through every
    connection, which holds because all connections share the backend).
    ``max_payload_bytes`` is the advertised maximum payload: longer reads get
    an error, longer writes get the connection dropped. ``sparse_read_bytes``
    is the read length from which structured reads ask the backend for
    extents and send holes as ``NBD_REPLY_TYPE_OFFSET_HOLE`` (``None`` never
    does). At most ``max_connections`` clients are served at once; more are
    closed at accept. A client that stalls the handshake longer than
    ``handshake_timeout_s`` per message is dropped.

    ``workers_per_connection=0`` (the default, fastest for backends that
    answer from memory) runs each connection's requests in order in its own
    thread; ``N > 0`` gives every connection N worker threads, so a backend
    whose calls block on device I/O (and release the GIL) serves up to N
    requests of one client at once, replying as each finishes.

    ``start()`` binds and returns at once; ``serve_forever()`` blocks until
    ``close()``; the server is a context manager. The server never closes
    its backends.
    """

    def __init__(
        self,
        exports: Mapping[str, Backend],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | os.PathLike[str] | None = None,
        descriptions: Mapping[str, str] | None = None,
        read_only: bool = False,
        multi_conn: bool = True,
        max_payload_bytes: int = 32 * 1024 * 1024,
        sparse_read_bytes: int | None = 64 * 1024,
        max_connections: int = 64,
        handshake_timeout_s: float = 30.0,
        workers_per_connection: int = 0,
    ) -> None:
        if not isinstance(exports, Mapping) or not exports:
            raise ValueError("exports must be a non-empty mapping of export name to backend")
        descriptions = dict(descriptions or {})
        unknown = set(descriptions) - set(exports)
        if unknown:
            raise ValueError(f"descriptions name unknown exports: {sorted(unknown)}")
        self._exports: dict[str, _Export] = {}
        for name, backend in exports.items():
            if not isinstance(name, str):
                raise TypeError(f"export names must be str, got {type(name).__name__} {name!r}")
            if "\0" in name or len(name.encode()) > MAX_STRING_BYTES:
                raise ValueError(
                    f"export name {name!r} must have no NUL and at most {MAX_STRING_BYTES} bytes"
                )
            if not isinstance(backend, Backend):
                raise TypeError(f"export {name!r}: {backend!r} does not implement Backend")
            preferred = check_int(backend.block_size, f"export {name!r} block_size", minimum=512)
            if preferred & (preferred - 1) or preferred > 65536:
                raise ValueError(
                    f"export {name!r}: block_size must be a power of two in [512, 65536], "
                    f"got {preferred}"
                )
            description = descriptions.get(name, "")
            if "\0" in description or len(description.encode()) > MAX_STRING_BYTES:
                raise ValueError(f"description of {name!r} is too long or contains NUL")
            size_bytes = check_int(
                backend.size_bytes, f"export {name!r} size_bytes", maximum=(1 << 63) - 1
            )
            self._exports[name] = _Export(name, backend, description, size_bytes, preferred)
        self._default_name = next(iter(self._exports))
        largest_block = max(e.preferred_block_bytes for e in self._exports.values())
        self._max_payload = check_int(
            max_payload_bytes, "max_payload_bytes", minimum=largest_block, maximum=p.MAX_U32
        )
        self._sparse_read_bytes = (
            None
            if sparse_read_bytes is None
            else check_int(sparse_read_bytes, "sparse_read_bytes", minimum=1)
        )
        self._max_connections = check_int(max_connections, "max_connections", minimum=1)
        self._workers_per_connection = check_int(
            workers_per_connection, "workers_per_connection", maximum=256
        )
        if not handshake_timeout_s > 0:
            raise ValueError(f"handshake_timeout_s must be > 0, got {handshake_timeout_s}")
        self._handshake_timeout_s = float(handshake_timeout_s)
        self._read_only = bool(read_only)
        self._multi_conn = bool(multi_conn)
        self._host = host
        self._port = check_int(port, "port", maximum=65535)
        self._unix_path = None if unix_path is None else os.fspath(unix_path)

        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | str | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[int, _Connection] = {}
        self._retired = _Counters()
        self._connection_ids = itertools.count(1)
        self._accepted = 0
        self._refused = 0
        self._closing = False
        self._closed = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> NbdServer:
        """Bind, listen and start accepting in a background thread; returns ``self``.

        Raises ``OSError`` if the address cannot be bound and ``RuntimeError``
        if the server was already started.
        """
        with self._lock:
            if self._listener is not None or self._closing:
                raise RuntimeError("NbdServer.start() called twice or after close()")
            if self._unix_path is not None:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    listener.bind(self._unix_path)
                except BaseException:
                    listener.close()
                    raise
                self._address = self._unix_path
            else:
                infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
                family = infos[0][0]
                listener = socket.create_server(
                    (self._host, self._port), family=family, backlog=128
                )
                bound = listener.getsockname()
                self._address = (str(bound[0]), int(bound[1]))
            listener.listen(128)
            self._listener = listener
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name=f"vmpager-nbd-accept-{self.address}", daemon=True
            )
            self._accept_thread.start()
        log.info("NBD server listening on %s, exports %s", self.url(), list(self._exports))
        return self

    def serve_forever(self) -> None:
        """Start if needed, then block until ``close()`` is called (from another thread)."""
        if self._listener is None:
            self.start()
        self._closed.wait()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let each connection finish its current request, then drop it.

        Connections are first shut down for reading (a thread finishes the
        request in hand and sends its replies); any still running after
        ``timeout_s`` are shut down completely. Idempotent; blocks until all
        threads ended (or were abandoned after a second ``timeout_s``).
        """
        with self._lock:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
            listener = self._listener
            connections = list(self._connections.values())
        if already:
            self._closed.wait(timeout_s * 2 + 1)
            return
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout_s)
        for connection in connections:
            connection.shutdown(socket.SHUT_RD)
        for connection in connections:
            connection.thread.join(timeout_s)
            if connection.thread.is_alive():
                connection.shutdown(socket.SHUT_RDWR)
                connection.thread.join(timeout_s)
        if self._unix_path is not None and listener is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self._unix_path).st_mode):
                    os.unlink(self._unix_path)
        self._closed.set()
        log.info("NBD server on %s closed", self._address)

    def __enter__(self) -> NbdServer:
        if self._listener is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addresses ----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | str:
        """``(host, port)`` of the TCP listener, or the unix socket path (after ``start()``)."""
        if self._address is None:
            raise RuntimeError("the server is not started")
        return self._address

    @property
    def port(self) -> int:
        """The bound TCP port (after ``start()``); ``RuntimeError`` for a unix socket."""
        address = self.address
        if isinstance(address, str):
            raise RuntimeError("a unix-socket server has no port")
        return address[1]

    @property
    def export_names(self) -> list[str]:
        """Export names, the default (first) one first."""
        return list(self._exports)

    def url(self, export: str | None = None) -> str:
        """The NBD URI of ``export`` (default: the default export), e.g. ``nbd://127.0.0.1:1/x``.

        Unix sockets give ``nbd+unix:///x?socket=/path``; qemu, libnbd and
        fio all accept both forms.
        """
        name = self._default_name if export is None else export
        quoted = urllib.parse.quote(name, safe="")
        address = self.address
        if isinstance(address, str):
            return f"nbd+unix:///{quoted}?socket={urllib.parse.quote(address, safe='/')}"
        host, port = address
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{port}/{quoted}"

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> NbdServerStatistics:
        """Sum of the counters of finished and live connections (live ones may move on)."""
        with self._lock:
            total = _Counters()
            total.add(self._retired)
            for connection in self._connections.values():
                total.add(connection.snapshot_counters())
            return NbdServerStatistics(
                connections_accepted=self._accepted,
                connections_active=len(self._connections),
                connections_refused=self._refused,
                handshakes_completed=total.handshakes_completed,
                protocol_errors=total.protocol_errors,
                reads=total.reads,
                writes=total.writes,
                flushes=total.flushes,
                trims=total.trims,
                write_zeroes=total.write_zeroes,
                caches=total.caches,
                block_status=total.block_status,
                error_replies=total.error_replies,
                bytes_read=total.bytes_read,
                bytes_written=total.bytes_written,
            )

    def check(self) -> None:
        """Assert the connection bookkeeping: counts add up, no live entry has a dead thread."""
        problems: list[str] = []
        with self._lock:
            if len(self._connections) > self._max_connections:
                problems.append(
                    f"{len(self._connections)} live connections > max {self._max_connections}"
                )
            for cid, connection in self._connections.items():
                if connection.cid != cid:
                    problems.append(f"connection registered as {cid} has id {connection.cid}")
                if connection.started and not connection.thread.is_alive():
                    problems.append(f"connection {cid} is registered but its thread ended")
            if self._accepted < len(self._connections):
                problems.append(
                    f"accepted {self._accepted} < live connections {len(self._connections)}"
                )
            problems.extend(
                f"retired counter {name} is negative"
                for name in _Counters.__slots__
                if getattr(self._retired, name) < 0
            )
            if self._closed.is_set() and self._connections and not self._closing:
                problems.append("closed server still lists connections")
        if problems:
            raise InvariantViolation(problems)

    # -- internals ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                if self._closing:
                    return  # the listener was shut down by close()
                # Out of descriptors or a connection reset before accept: keep serving.
                log.warning("NBD accept failed: %s", exc)
                time.sleep(0.05)
                continue
            with self._lock:
                refuse = self._closing or len(self._connections) >= self._max_connections
                if refuse:
                    self._refused += 1
                else:
                    self._accepted += 1
                    connection = _Connection(self, next(self._connection_ids), sock, peer)
                    self._connections[connection.cid] = connection
                    connection.started = True
                    connection.thread.start()
            if refuse:
                log.warning("refusing NBD client %s: server full or closing", peer)
                sock.close()

    def _retire(self, connection: _Connection) -> None:
        with self._lock:
            if self._connections.pop(connection.cid, None) is not None:
                self._retired.add(connection.snapshot_counters())

    def _lookup(self, name: str) -> _Export | None:
        export = self._exports.get(name)
        if export is None and name == "":
            export = self._exports[self._default_name]
        return export

    def _transmission_flags(self, structured: bool) -> int:
        flags = (
            p.NBD_FLAG_HAS_FLAGS
            | p.NBD_FLAG_SEND_FLUSH
            | p.NBD_FLAG_SEND_FUA
            | p.NBD_FLAG_SEND_CACHE
        )
        if self._read_only:
            flags |= p.NBD_FLAG_READ_ONLY
        else:
            flags |= p.NBD_FLAG_SEND_TRIM | p.NBD_FLAG_SEND_WRITE_ZEROES | p.NBD_FLAG_SEND_FAST_ZERO
        if self._multi_conn:
            flags |= p.NBD_FLAG_CAN_MULTI_CONN
        if structured:
            flags |= p.NBD_FLAG_SEND_DF
        return flags


def _error_from_exception(exc: BaseException) -> int:
    if isinstance(exc, SwapExhausted):
        return p.NBD_ENOSPC
    if isinstance(exc, OSError):
        return p.nbd_error_from_errno(exc.errno)
    if isinstance(exc, ValueError):
        return p.NBD_EINVAL
    return p.NBD_EIO


class _Connection:
    """One client: the handshake, then the request loop, in the connection's own thread."""

    def __init__(self, server: NbdServer, cid: int, sock: socket.socket, peer: object) -> None:
        self.server = server
        self.cid = cid
        self.sock = sock
        self.peer = peer
        self.counters = _Counters()
        self.started = False
        self.thread = threading.Thread(
            target=self._run, name=f"vmpager-nbd-conn-{cid}", daemon=True
        )
        self._shutdown_lock = threading.Lock()
        self._socket_closed = False
        # Negotiated state.
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # export whose base:allocation was selected
        self.export: _Export | None = None
        self.block_status_ok = False
        # Reply batching.
        self._pending: list[bytes | bytearray | memoryview] = []
        self._pending_bytes = 0
        self._spare = bytearray()
        # Set by the pooled request loop: replies are then sent under the lock, and
        # each worker thread counts into its own counters (listed in all_counters).
        self._send_lock: threading.Lock | None = None
        self._local: threading.local | None = None
        self._counters_lock = threading.Lock()
        self.all_counters: list[_Counters] = [self.counters]

    def _counters(self) -> _Counters:
        """The counters the calling thread may write."""
        local = self._local
        if local is None:
            return self.counters
        counters: _Counters | None = getattr(local, "counters", None)
        if counters is None:
            counters = local.counters = _Counters()
            with self._counters_lock:
                self.all_counters.append(counters)
        return counters

    def snapshot_counters(self) -> _Counters:
        """Sum of this connection's counters (for statistics; live values may move on)."""
        total = _Counters()
        with self._counters_lock:
            for counters in self.all_counters:
                total.add(counters)
        return total

    # -- plumbing -----------------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """Wake the connection thread from another thread (``close()``)."""
        with self._shutdown_lock:
            if not self._socket_closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(how)

    def _close_socket(self) -> None:
        with self._shutdown_lock:
            if not self._socket_closed:
                self._socket_closed = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                self.sock.close()

    def _run(self) -> None:
        try:
            if self.sock.family != socket.AF_UNIX:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(self.server._handshake_timeout_s)
            if self._handshake():
                self.sock.settimeout(None)
                self.counters.handshakes_completed += 1
                self._transmission()
        except _ProtocolError as exc:
            self.counters.protocol_errors += 1
            # Replies to the requests before the bad one still go out.
            with contextlib.suppress(OSError):
                self._send_pending()
            log.warning("NBD client %s dropped: %s", self.peer, exc)
        except _Disconnect:
            pass
        except (TimeoutError, ConnectionError) as exc:
            log.info("NBD client %s: connection ended: %s", self.peer, exc)
        except OSError as exc:
            log.info("NBD client %s: socket error: %s", self.peer, exc)
        except Exception:
            log.exception("NBD client %s: internal error; connection dropped", self.peer)
        finally:
            self._close_socket()
            self.server._retire(self)

    def _recv_exact(self, nbytes: int) -> bytes:
        if nbytes == 0:
            return _EMPTY
        chunks = []
        remaining = nbytes
        while remaining:
            chunk = self.sock.recv(min(remaining, 65536))
            if not chunk:
                raise _Disconnect("client closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _recv_exact_into(self, view: memoryview) -> None:
        while len(view):
            n = self.sock.recv_into(view)
            if n == 0:
                raise _Disconnect("client closed the connection in the middle of a request")
            view = view[n:]

    def _send_pending(self) -> None:
        buffers = self._pending
        if not buffers:
            return
        sock = self.sock
        while buffers:
            sent = sock.sendmsg(buffers)
            # Drop what went out; a partially sent buffer is re-sliced.
            index = 0
            while index < len(buffers) and sent >= len(buffers[index]):
                sent -= len(buffers[index])
                index += 1
            if index:
                del buffers[:index]
            if sent:
                buffers[0] = memoryview(buffers[0])[sent:]
        self._pending_bytes = 0

    def _queue(self, *buffers: bytes | bytearray | memoryview) -> None:
        """Queue one whole reply; with worker threads, send it at once under the send lock."""
        send_lock = self._send_lock
        if send_lock is not None:
            with send_lock:
                self._pending.extend(buffers)
                self._send_pending()
            return
        self._pending.extend(buffers)
        for buffer in buffers:
            self._pending_bytes += len(buffer)
        if len(self._pending) >= SEND_BATCH_BUFFERS or self._pending_bytes >= SEND_BATCH_BYTES:
            self._send_pending()

    # -- handshake ----------------------------------------------------------------------------

    def _option_reply(self, option: int, reply: int, data: bytes = _EMPTY) -> None:
        self.sock.sendall(
            p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply, len(data)) + data
        )

    def _option_error(self, option: int, reply: int, message: str) -> None:
        self._option_reply(option, reply, message.encode()[:MAX_STRING_BYTES])

    def _handshake(self) -> bool:
        """Negotiate; True when transmission begins, False when the client aborted."""
        server = self.server
        self.sock.sendall(
            p.HANDSHAKE.pack(
                p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
            )
        )
        (client_flags,) = p.CLIENT_FLAGS.unpack(self._recv_exact(p.CLIENT_FLAGS.size))
        if client_flags & ~(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES):
            raise _ProtocolError(f"unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & p.NBD_FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(self._recv_exact(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise _ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_BYTES:
                raise _ProtocolError(
                    f"option {option} carries {length} bytes (> {MAX_OPTION_BYTES})"
                )
            data = self._recv_exact(length)
            if option == p.NBD_OPT_EXPORT_NAME:
                name = self._decode(data)
                export = None if name is None else server._lookup(name)
                if export is None:
                    # EXPORT_NAME has no error reply: the specification says to hang up.
                    raise _Disconnect(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
                self._enter(export)
                reply = p.EXPORT_NAME_REPLY.pack(
                    export.size_bytes, server._transmission_flags(self.structured)
                )
                self.sock.sendall(reply if self.no_zeroes else reply + _ZEROES_124)
                return True
            if option == p.NBD_OPT_ABORT:
                with contextlib.suppress(OSError):
                    self._option_reply(option, p.NBD_REP_ACK)
                return False
            if option == p.NBD_OPT_LIST:
                if data:
                    self._option_error(option, p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                for export in server._exports.values():
                    encoded = export.name.encode()
                    # Text after the name is a description for people (the spec allows it).
                    payload = (
                        struct.pack(">I", len(encoded)) + encoded + export.description.encode()
                    )
                    self._option_reply(option, p.NBD_REP_SERVER, payload)
                self._option_reply(option, p.NBD_REP_ACK)
            elif option in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
                if self._info(option, data):
                    return True
            elif option == p.NBD_OPT_STRUCTURED_REPLY:
                if data:
                    self._option_error(
                        option, p.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"
                    )
                    continue
                self.structured = True
                self._option_reply(option, p.NBD_REP_ACK)
            elif option in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
                self._meta_context(option, data)
            else:
                name = p.OPTION_NAMES.get(option, str(option))
                self._option_error(option, p.NBD_REP_ERR_UNSUP, f"option {name} not supported")

    @staticmethod
    def _decode(data: bytes) -> str | None:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return None
        return None if "\0" in text else text

    def _info(self, option: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO; True when GO succeeded."""
        server = self.server
        if len(data) < 6:
            self._option_error(option, p.NBD_REP_ERR_INVALID, "option data shorter than 6 bytes")
            return False
        (name_len,) = struct.unpack_from(">I", data, 0)
        if name_len > len(data) - 6:
            self._option_error(option, p.NBD_REP_ERR_INVALID, "name length exceeds option data")
            return False
        (nrequests,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * nrequests:
            self._option_error(
                option, p.NBD_REP_ERR_INVALID, "option length does not match information requests"
            )
            return False
        requests = set(struct.unpack_from(f">{nrequests}H", data, 6 + name_len))
        name = self._decode(data[4 : 4 + name_len])
        if name is None:
            self._option_error(option, p.NBD_REP_ERR_INVALID, "export name is not valid UTF-8")
            return False
        export = server._lookup(name)
        if export is None:
            self._option_error(option, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        flags = server._transmission_flags(self.structured)
        self._option_reply(
            option, p.NBD_REP_INFO, p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, export.size_bytes, flags)
        )
        if p.NBD_INFO_NAME in requests:
            payload = struct.pack(">H", p.NBD_INFO_NAME) + export.name.encode()
            self._option_reply(option, p.NBD_REP_INFO, payload)
        if p.NBD_INFO_DESCRIPTION in requests and export.description:
            payload = struct.pack(">H", p.NBD_INFO_DESCRIPTION) + export.description.encode()
            self._option_reply(option, p.NBD_REP_INFO, payload)
        # Sent unasked too: the values are the protocol defaults (minimum 1), so a client
        # that did not ask loses nothing by ignoring them.
        self._option_reply(
            option,
            p.NBD_REP_INFO,
            p.INFO_BLOCK_SIZE.pack(
                p.NBD_INFO_BLOCK_SIZE, 1, export.preferred_block_bytes, server._max_payload
            ),
        )
        self._option_reply(option, p.NBD_REP_ACK)
        if option == p.NBD_OPT_GO:
            self._enter(export)
            return True
        return False

    def _meta_context(self, option: int, data: bytes) -> None:
        server = self.server
        setting = option == p.NBD_OPT_SET_META_CONTEXT
        if setting:
            self.meta_export = None  # a SET replaces the selection even when it fails
            if not self.structured:
                self._option_error(
                    option, p.NBD_REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first"
                )
                return
        parsed = self._parse_meta_request(data)
        if parsed is None:
            self._option_error(option, p.NBD_REP_ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        export = server._lookup(name)
        if export is None:
            self._option_error(option, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if setting:
            selected = p.BASE_ALLOCATION in queries
        else:
            selected = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        if selected:
            context_id = BASE_ALLOCATION_ID if setting else 0
            payload = struct.pack(">I", context_id) + p.BASE_ALLOCATION.encode()
            self._option_reply(option, p.NBD_REP_META_CONTEXT, payload)
            if setting:
                self.meta_export = export.name
        self._option_reply(option, p.NBD_REP_ACK)

    def _parse_meta_request(self, data: bytes) -> tuple[str, list[str]] | None:
        """Export name and query strings, or None when the request is malformed."""
        try:
            (name_len,) = struct.unpack_from(">I", data, 0)
            pos = 4 + name_len
            if pos + 4 > len(data) or name_len > MAX_STRING_BYTES:
                return None
            name = self._decode(data[4:pos])
            (nqueries,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries: list[str] = []
            for _ in range(nqueries):
                (query_len,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if query_len > MAX_STRING_BYTES or pos + query_len > len(data):
                    return None
                query = self._decode(data[pos : pos + query_len])
                if query is None or ":" not in query:
                    return None
                queries.append(query)
                pos += query_len
        except struct.error:
            return None
        if pos != len(data) or name is None:
            return None
        return name, queries

    def _enter(self, export: _Export) -> None:
        self.export = export
        self.block_status_ok = self.structured and self.meta_export == export.name

    # -- transmission -------------------------------------------------------------------------

    def _error(self, cookie: int, error: int, message: str) -> None:
        """Queue an error reply (an ERROR chunk when structured replies were negotiated)."""
        self._counters().error_replies += 1
        if self.structured:
            text = message.encode()[:MAX_STRING_BYTES]
            payload = struct.pack(">IH", error, len(text)) + text
            self._queue(
                p.CHUNK_HEADER.pack(
                    p.STRUCTURED_REPLY_MAGIC,
                    p.NBD_REPLY_FLAG_DONE,
                    p.NBD_REPLY_TYPE_ERROR,
                    cookie,
                    len(payload),
                ),
                payload,
            )
        else:
            self._queue(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie))

    def _transmission(self) -> None:
        """Serve requests until NBD_CMD_DISC, EOF or a protocol error."""
        workers = self.server._workers_per_connection
        if workers:
            self._transmission_pooled(workers)
        else:
            self._transmission_inline()

    def _transmission_inline(self) -> None:
        """The request loop that runs every request in this thread, in order."""
        export = self.export
        assert export is not None
        backend = export.backend
        size = export.size_bytes
        max_payload = self.server._max_payload
        sock = self.sock
        unpack_request = p.REQUEST.unpack_from
        request_size = p.REQUEST.size
        pending = self._pending
        request_magic = p.REQUEST_MAGIC
        cmd_read = p.NBD_CMD_READ
        cmd_write = p.NBD_CMD_WRITE
        do_read = self._read
        do_write = self._write

        buf = bytearray(RECV_BUFFER_BYTES)
        view = memoryview(buf)
        start = end = 0
        while True:
            if end - start < request_size:
                # About to wait for the client: everything answered so far goes out first.
                if pending:
                    self._send_pending()
                if start:
                    buf[: end - start] = buf[start:end]
                    end -= start
                    start = 0
                n = sock.recv_into(view[end:])
                if n == 0:
                    raise _Disconnect("client closed the connection")
                end += n
                continue
            magic, flags, command, cookie, offset, length = unpack_request(buf, start)
            if magic != request_magic:
                raise _ProtocolError(f"bad request magic {magic:#x}")
            start += request_size

            if command == cmd_write:
                if length > max_payload:
                    raise _ProtocolError(f"write payload {length} exceeds maximum {max_payload}")
                have = end - start
                if have >= length:
                    data = view[start : start + length]
                    start += length
                elif length <= INLINE_PAYLOAD_BYTES:
                    if pending:
                        self._send_pending()
                    buf[:have] = buf[start:end]
                    start, end = 0, have
                    while end < length:
                        n = sock.recv_into(view[end:])
                        if n == 0:
                            raise _Disconnect("client closed the connection inside a write")
                        end += n
                    data = view[:length]
                    start = length
                else:
                    if pending:
                        self._send_pending()
                    data = self._payload_buffer(length)
                    data[:have] = view[start:end]
                    start = end = 0
                    self._recv_exact_into(data[have:])
                do_write(backend, size, flags, cookie, offset, length, data)
                del data
            elif command == cmd_read:
                do_read(backend, size, flags, cookie, offset, length)
            elif command == p.NBD_CMD_DISC:
                self._send_pending()
                raise _Disconnect("client sent NBD_CMD_DISC")
            else:
                self._other_command(backend, size, flags, command, cookie, offset, length)

    def _transmission_pooled(self, workers: int) -> None:
        """The request loop that hands requests to ``workers`` threads of this connection.

        Replies are sent as requests finish (out of order); at most
        ``4 * workers`` requests are in flight, so memory stays bounded. On
        DISC, EOF or a protocol error, the requests in flight finish and are
        answered before the connection closes.
        """
        export = self.export
        assert export is not None
        backend = export.backend
        size = export.size_bytes
        max_payload = self.server._max_payload
        self._send_lock = threading.Lock()
        self._local = threading.local()
        slots = threading.BoundedSemaphore(4 * workers)
        reader = cast(io.BufferedReader, self.sock.makefile("rb", buffering=RECV_BUFFER_BYTES))
        header = bytearray(p.REQUEST.size)

        def run(
            flags: int, command: int, cookie: int, offset: int, length: int, data: bytearray
        ) -> None:
            try:
                if command == p.NBD_CMD_WRITE:
                    self._write(backend, size, flags, cookie, offset, length, data)
                elif command == p.NBD_CMD_READ:
                    self._read(backend, size, flags, cookie, offset, length)
                else:
                    self._other_command(backend, size, flags, command, cookie, offset, length)
            except OSError as exc:
                log.info("NBD client %s: reply not sent: %s", self.peer, exc)
                self.shutdown(socket.SHUT_RDWR)
            except Exception:
                log.exception("NBD client %s: internal error; connection dropped", self.peer)
                self.shutdown(socket.SHUT_RDWR)
            finally:
                slots.release()

        with (
            concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix=f"vmpager-nbd-conn-{self.cid}-worker"
            ) as pool,
            reader,
        ):
            while True:
                if reader.readinto(header) != len(header):
                    raise _Disconnect("client closed the connection")
                magic, flags, command, cookie, offset, length = p.REQUEST.unpack(header)
                if magic != p.REQUEST_MAGIC:
                    raise _ProtocolError(f"bad request magic {magic:#x}")
                data = bytearray()
                if command == p.NBD_CMD_WRITE:
                    if length > max_payload:
                        raise _ProtocolError(
                            f"write payload {length} exceeds maximum {max_payload}"
                        )
                    data = bytearray(length)
                    if reader.readinto(data) != length:
                        raise _Disconnect("client closed the connection inside a write")
                elif command == p.NBD_CMD_DISC:
                    raise _Disconnect("client sent NBD_CMD_DISC")
                slots.acquire()
                pool.submit(run, flags, command, cookie, offset, length, data)

    def _write(
        self,
        backend: Backend,
        size: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        data: bytearray | memoryview,
    ) -> None:
        """NBD_CMD_WRITE whose payload has been received into ``data``."""
        bad_flags = flags & ~_WRITE_FLAGS
        if bad_flags:
            self._error(cookie, p.NBD_EINVAL, f"unsupported flags {bad_flags:#x}")
        elif self.server._read_only:
            self._error(cookie, p.NBD_EPERM, "export is read-only")
        elif offset + length > size:
            self._error(cookie, p.NBD_ENOSPC, f"write past the end ({size} bytes)")
        else:
            try:
                if length:
                    backend.write(offset, data, fua=bool(flags & p.NBD_CMD_FLAG_FUA))
            except Exception as exc:
                self._backend_error(cookie, exc, "write", offset, length)
            else:
                counters = self._counters()
                counters.writes += 1
                counters.bytes_written += length
                self._queue(_pack_simple(p.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _read(
        self, backend: Backend, size: int, flags: int, cookie: int, offset: int, length: int
    ) -> None:
        """NBD_CMD_READ: a simple reply, one data chunk, or data and hole chunks."""
        structured = self.structured
        bad_flags = flags & ~_READ_FLAGS
        if bad_flags or (flags & p.NBD_CMD_FLAG_DF and not structured):
            self._error(cookie, p.NBD_EINVAL, f"unsupported flags {flags:#x}")
            return
        if offset + length > size:
            self._error(cookie, p.NBD_EINVAL, f"read past the end ({size} bytes)")
            return
        max_payload = self.server._max_payload
        if length > max_payload:
            error = p.NBD_EOVERFLOW if structured else p.NBD_EINVAL
            self._error(cookie, error, f"read length {length} > maximum {max_payload}")
            return
        if structured:
            if length == 0:
                self._counters().reads += 1
                self._queue(self._none_chunk(cookie))
                return
            sparse_read_bytes = self.server._sparse_read_bytes
            if (
                sparse_read_bytes is not None
                and length >= sparse_read_bytes
                and not flags & p.NBD_CMD_FLAG_DF
            ):
                self._sparse_read(backend, cookie, offset, length)
                return
        out = bytearray(length)
        try:
            backend.read_into(offset, memoryview(out))
        except Exception as exc:
            self._backend_error(cookie, exc, "read", offset, length)
            return
        counters = self._counters()
        counters.reads += 1
        counters.bytes_read += length
        if structured:
            self._queue(
                _pack_data_header(
                    p.STRUCTURED_REPLY_MAGIC,
                    p.NBD_REPLY_FLAG_DONE,
                    p.NBD_REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    length + 8,
                    offset,
                ),
                out,
            )
        else:
            self._queue(_pack_simple(p.SIMPLE_REPLY_MAGIC, 0, cookie), out)

    def _payload_buffer(self, length: int) -> memoryview:
        """A buffer for a write payload too big for the receive buffer (reused when small)."""
        if length > SPARE_PAYLOAD_BYTES:
            return memoryview(bytearray(length))
        if len(self._spare) < length:
            self._spare = bytearray(max(length, INLINE_PAYLOAD_BYTES * 2))
        return memoryview(self._spare)[:length]

    def _none_chunk(self, cookie: int) -> bytes:
        return p.CHUNK_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_NONE, cookie, 0
        )

    def _backend_error(
        self, cookie: int, exc: Exception, what: str, offset: int, length: int
    ) -> None:
        error = _error_from_exception(exc)
        if error == p.NBD_EIO and not isinstance(exc, OSError):
            log.error(
                "NBD %s at offset %d length %d: unexpected backend failure",
                what,
                offset,
                length,
                exc_info=exc,
            )
        self._error(cookie, error, f"{what} failed: {exc}")

    def _sparse_read(self, backend: Backend, cookie: int, offset: int, length: int) -> None:
        """A structured read that sends zero extents as OFFSET_HOLE chunks.

        Everything is read before anything is queued, so the last chunk can
        carry DONE (no error can follow it) and a failure sends only an error.
        """
        end = offset + length
        segments: list[list[int]] = []  # [position, nbytes, is_zero]
        buffers: list[bytes | bytearray] = []
        try:
            position = offset
            for extent_length, extent_flags in backend.extents(offset, length):
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
            last = len(segments) - 1
            for index, (position, nbytes, is_zero) in enumerate(segments):
                chunk_flags = p.NBD_REPLY_FLAG_DONE if index == last else 0
                if is_zero:
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
                    data = bytearray(nbytes)
                    backend.read_into(position, memoryview(data))
                    buffers.append(
                        p.CHUNK_OFFSET_DATA_HEADER.pack(
                            p.STRUCTURED_REPLY_MAGIC,
                            chunk_flags,
                            p.NBD_REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            nbytes + 8,
                            position,
                        )
                    )
                    buffers.append(data)
        except Exception as exc:
            self._backend_error(cookie, exc, "read", offset, length)
            return
        counters = self._counters()
        counters.reads += 1
        counters.bytes_read += length
        self._queue(*buffers)

    def _other_command(
        self,
        backend: Backend,
        size: int,
        flags: int,
        command: int,
        cookie: int,
        offset: int,
        length: int,
    ) -> None:
        """Everything but READ, WRITE and DISC (which the request loop handles inline)."""
        counters = self._counters()
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            self._error(cookie, p.NBD_EINVAL, f"unknown command {command}")
            return
        bad_flags = flags & ~allowed
        if bad_flags:
            self._error(cookie, p.NBD_EINVAL, f"unsupported flags {bad_flags:#x}")
            return
        fua = bool(flags & p.NBD_CMD_FLAG_FUA)
        name = p.COMMAND_NAMES[command]
        try:
            if command == p.NBD_CMD_FLUSH:
                if offset or length:
                    self._error(cookie, p.NBD_EINVAL, "flush offset and length must be zero")
                    return
                backend.flush()
                counters.flushes += 1
            elif command in (p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES):
                if self.server._read_only:
                    self._error(cookie, p.NBD_EPERM, "export is read-only")
                    return
                if offset + length > size:
                    error = p.NBD_EINVAL if command == p.NBD_CMD_TRIM else p.NBD_ENOSPC
                    self._error(cookie, error, f"{name} past the end ({size} bytes)")
                    return
                if command == p.NBD_CMD_TRIM:
                    if length:
                        backend.trim(offset, length, fua=fua)
                    counters.trims += 1
                else:
                    if flags & p.NBD_CMD_FLAG_FAST_ZERO and not backend.fast_zero:
                        self._error(cookie, p.NBD_ENOTSUP, "zeroing is not faster than writing")
                        return
                    if length:
                        backend.write_zeroes(
                            offset,
                            length,
                            may_trim=not flags & p.NBD_CMD_FLAG_NO_HOLE,
                            fua=fua,
                        )
                    counters.write_zeroes += 1
            elif command == p.NBD_CMD_CACHE:
                if offset + length > size:
                    self._error(cookie, p.NBD_EINVAL, f"cache past the end ({size} bytes)")
                    return
                if length:
                    backend.cache(offset, length)
                counters.caches += 1
            else:  # NBD_CMD_BLOCK_STATUS
                self._block_status(backend, size, flags, cookie, offset, length)
                return
        except Exception as exc:
            self._backend_error(cookie, exc, name, offset, length)
            return
        self._queue(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _block_status(
        self, backend: Backend, size: int, flags: int, cookie: int, offset: int, length: int
    ) -> None:
        if not self.block_status_ok:
            self._error(cookie, p.NBD_EINVAL, "no metadata context was selected for this export")
            return
        if length == 0 or offset + length > size:
            self._error(cookie, p.NBD_EINVAL, f"block status range outside [0, {size})")
            return
        extents = backend.extents(offset, length)
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
        self._counters().block_status += 1
        self._queue(
            p.CHUNK_HEADER.pack(
                p.STRUCTURED_REPLY_MAGIC,
                p.NBD_REPLY_FLAG_DONE,
                p.NBD_REPLY_TYPE_BLOCK_STATUS,
                cookie,
                len(payload),
            ),
            payload,
        )
