"""An NBD server: exports ``Backend`` objects over TCP (loopback by default) or a unix socket.

The protocol (handshake, options, request parsing and checks, reply
layout) is ``vmpager.nbd.connection.NbdConnection``, which does no I/O; this
module owns the sockets, the threads, TLS upgrades and the backend calls,
in one loop per connection that feeds received bytes to the protocol and
acts on its events.

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
over the maximum, unknown client flags, bytes sent ahead of a TLS upgrade)
is disconnected; a bad request that
can be answered (unknown command or flag, range past the end, a backend
error) gets an error reply and the connection goes on. Nothing is allocated
from a client-supplied length before it is checked against the maximum
payload, and a write is acknowledged only after ``Backend.write`` returned.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from vmpager.errors import InvariantViolation, SwapExhausted
from vmpager.nbd import protocol as p
from vmpager.nbd.backend import Backend
from vmpager.nbd.connection import (
    MAX_STRING_BYTES,
    Aborted,
    Disconnect,
    ExportInfo,
    Invalid,
    NbdConnection,
    NbdProtocolError,
    OptionReplied,
    Ready,
    RequestTuple,
    StartTls,
    data_chunk_header,
    ok_reply,
)
from vmpager.units import check_int

__all__ = ["NbdServer", "NbdServerStatistics"]

log = logging.getLogger(__name__)

#: Replies are sent once this many buffers or bytes are gathered.
SEND_BATCH_BUFFERS: Final = 256
SEND_BATCH_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class NbdServerStatistics:
    """Counters of one server since it started (all connections, live and finished)."""

    connections_accepted: int
    connections_active: int
    connections_refused: int
    handshakes_completed: int
    protocol_errors: int
    tls_sessions: int
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
        "tls_sessions",
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
    tls_sessions: int
    trims: int
    write_zeroes: int
    writes: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def add(self, other: _Counters) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


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

    ``tls`` (a server-side ``ssl.SSLContext``, see ``vmpager.nbd.tls``)
    makes every connection TLS-only: options other than STARTTLS and ABORT
    are refused with ``NBD_REP_ERR_TLS_REQD`` until the upgrade, as the
    protocol's FORCEDTLS mode says; without it STARTTLS is refused.

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
        tls: ssl.SSLContext | None = None,
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
        self._export_infos = [
            ExportInfo(e.name, e.size_bytes, e.description, e.preferred_block_bytes)
            for e in self._exports.values()
        ]
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise TypeError(f"tls must be an ssl.SSLContext or None, got {type(tls).__name__}")
        self._tls_context = tls
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
        fio all accept both forms. A TLS-only server gives libnbd's ``nbds``
        and ``nbds+unix`` schemes (qemu takes TLS from ``tls-creds`` instead).
        """
        name = self._default_name if export is None else export
        quoted = urllib.parse.quote(name, safe="")
        address = self.address
        scheme = "nbd" if self._tls_context is None else "nbds"
        if isinstance(address, str):
            return f"{scheme}+unix:///{quoted}?socket={urllib.parse.quote(address, safe='/')}"
        host, port = address
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}/{quoted}"

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
                tls_sessions=total.tls_sessions,
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


def _error_from_exception(exc: BaseException) -> int:
    if isinstance(exc, SwapExhausted):
        return p.NBD_ENOSPC
    if isinstance(exc, OSError):
        return p.nbd_error_from_errno(exc.errno)
    if isinstance(exc, ValueError):
        return p.NBD_EINVAL
    return p.NBD_EIO


_Buffer = bytes | bytearray | memoryview
_CMD_READ: Final = p.NBD_CMD_READ
_CMD_WRITE: Final = p.NBD_CMD_WRITE
_FLAG_FUA: Final = p.NBD_CMD_FLAG_FUA


class _Connection:
    """One client: its socket, its thread (and workers) and the backend calls.

    The protocol itself is an ``NbdConnection``; this class only moves bytes
    between it and the socket and runs the requests it yields, in one loop
    (``_serve``) for the handshake and transmission alike.
    """

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
        self.protocol = NbdConnection(
            server._export_infos,
            read_only=server._read_only,
            multi_conn=server._multi_conn,
            max_payload_bytes=server._max_payload,
            tls="off" if server._tls_context is None else "require",
        )
        self.export: _Export | None = None
        # Reply batching.
        self._pending: list[_Buffer] = []
        self._pending_bytes = 0
        # sendmsg gathers buffers without copying; an SSL socket has no sendmsg.
        self._gather = True
        # Set when requests run in worker threads: replies are then sent under the lock,
        # and each worker thread counts into its own counters (listed in all_counters).
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
            self._serve()
        except NbdProtocolError as exc:
            self.counters.protocol_errors += 1
            # Replies to the requests before the bad one still go out.
            with contextlib.suppress(OSError):
                self._send_pending()
            log.warning("NBD client %s dropped: %s", self.peer, exc)
        except ssl.SSLError as exc:
            log.warning("NBD client %s: TLS failed: %s", self.peer, exc)
        except (TimeoutError, ConnectionError) as exc:
            log.info("NBD client %s: connection ended: %s", self.peer, exc)
        except OSError as exc:
            log.info("NBD client %s: socket error: %s", self.peer, exc)
        except Exception:
            log.exception("NBD client %s: internal error; connection dropped", self.peer)
        finally:
            self._close_socket()
            self.server._retire(self)

    def _send_pending(self) -> None:
        buffers = self._pending
        if not buffers:
            return
        sock = self.sock
        if not self._gather:
            sock.sendall(b"".join(buffers))
            buffers.clear()
        while buffers:
            sent = sock.sendmsg(buffers)
            if sent == sum(map(len, buffers)):
                buffers.clear()  # the usual case: everything went out
                break
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

    def _queue(self, *buffers: _Buffer) -> None:
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

    def _start_tls(self) -> None:
        """Send the STARTTLS ACK, then run the TLS handshake on the socket (server side)."""
        context = self.server._tls_context
        assert context is not None
        self.sock.sendall(self.protocol.data_to_send())
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self._gather = False
        self.protocol.tls_started()
        self.counters.tls_sessions += 1

    # -- the request loop ---------------------------------------------------------------------

    def _serve(self) -> None:
        """Handshake and transmission until DISC, EOF or a protocol error: the one loop.

        Requests run here in order (replies gathered and sent before the
        thread waits for the client), or, with ``workers_per_connection``, in
        that many worker threads that reply as each finishes; at most
        ``4 * workers`` requests are in flight, so memory stays bounded. On
        DISC, EOF or a protocol error, requests in flight finish and are
        answered before the connection closes.
        """
        protocol = self.protocol
        workers = self.server._workers_per_connection
        pool: concurrent.futures.ThreadPoolExecutor | None = None
        slots = threading.BoundedSemaphore(4 * max(workers, 1))
        run: Callable[[RequestTuple], None] = self._reject_request
        queue = self._queue
        error_reply = protocol.error_reply
        next_events = protocol.next_events
        pending = self._pending

        def run_in_worker(request: RequestTuple) -> None:
            try:
                run(request)
            except OSError as exc:
                log.info("NBD client %s: reply not sent: %s", self.peer, exc)
                self.shutdown(socket.SHUT_RDWR)
            except Exception:
                log.exception("NBD client %s: internal error; connection dropped", self.peer)
                self.shutdown(socket.SHUT_RDWR)
            finally:
                slots.release()

        try:
            while True:
                events = next_events()
                if not events:
                    # About to wait for the client: everything answered so far goes out first.
                    if self.export is None:
                        self.sock.sendall(protocol.data_to_send())
                    elif pending and pool is None:
                        self._send_pending()
                    n = self.sock.recv_into(protocol.receive_buffer())
                    protocol.received(n)
                    continue
                for event in events:
                    if type(event) is tuple:
                        # A request, the one event that is a plain tuple (mypy cannot
                        # narrow a union of tuple subclasses by ``type(...) is tuple``).
                        request: RequestTuple = event  # type: ignore[assignment]
                        if pool is None:
                            run(request)
                        else:
                            command, flags, cookie, offset, length, data = request
                            if data:
                                # The payload view is only valid until the next receive.
                                request = (command, flags, cookie, offset, length, bytes(data))
                            slots.acquire()
                            pool.submit(run_in_worker, request)
                    elif type(event) is Invalid:
                        self._counters().error_replies += 1
                        queue(*error_reply(event.cookie, event.error, event.message))
                    elif type(event) is OptionReplied:
                        continue
                    elif type(event) is Ready:
                        self.sock.sendall(protocol.data_to_send())
                        self.export = self.server._exports[event.export.name]
                        self.sock.settimeout(None)
                        self.counters.handshakes_completed += 1
                        if workers:
                            self._send_lock = threading.Lock()
                            self._local = threading.local()
                            pool = concurrent.futures.ThreadPoolExecutor(
                                workers, thread_name_prefix=f"vmpager-nbd-conn-{self.cid}-worker"
                            )
                        run = self._runner(self.export, pooled=pool is not None)
                    elif type(event) is StartTls:
                        self._start_tls()
                    elif type(event) is Aborted:
                        with contextlib.suppress(OSError):
                            self.sock.sendall(protocol.data_to_send())
                        return
                    elif type(event) is Disconnect:
                        if event.clean:
                            log.debug("NBD client %s: %s", self.peer, event.reason)
                        elif self.export is None:
                            log.info("NBD client %s: %s", self.peer, event.reason)
                        if pool is None:
                            self._send_pending()
                        return
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _runner(self, export: _Export, *, pooled: bool) -> Callable[[RequestTuple], None]:
        """The function that calls the backend for one valid request and queues its reply.

        A closure over what stays fixed for the connection (backend,
        negotiated reply kind, whether workers share it), because this is
        the per-request path: plain reads and writes are done here, and
        without workers their replies are appended to the pending list
        directly; everything else goes to ``_other_command``.
        """
        backend = export.backend
        protocol = self.protocol
        structured = protocol.structured
        sparse_read_bytes = self.server._sparse_read_bytes
        # Reads from this length on may be answered with holes (the general path).
        sparse_min = (1 << 64) if sparse_read_bytes is None or not structured else sparse_read_bytes
        queue = self._queue
        counters_of = self._counters
        backend_error = self._backend_error
        other_command = self._other_command
        read_into = backend.read_into
        write = backend.write
        pending = self._pending
        own_counters = self.counters

        def run(request: RequestTuple) -> None:
            command, flags, cookie, offset, length, data = request
            if command == _CMD_WRITE:
                try:
                    if length:
                        write(offset, data, fua=bool(flags & _FLAG_FUA))
                except Exception as exc:
                    backend_error(cookie, exc, "write", offset, length)
                    return
                counters = counters_of() if pooled else own_counters
                counters.writes += 1
                counters.bytes_written += length
                if pooled:
                    queue(ok_reply(cookie))
                    return
                pending.append(ok_reply(cookie))
            elif command == _CMD_READ and 0 < length < sparse_min:
                out = bytearray(length)
                try:
                    read_into(offset, memoryview(out))
                except Exception as exc:
                    backend_error(cookie, exc, "read", offset, length)
                    return
                counters = counters_of() if pooled else own_counters
                counters.reads += 1
                counters.bytes_read += length
                if structured:
                    header = data_chunk_header(cookie, length + 8, offset)
                else:
                    header = ok_reply(cookie)
                if pooled:
                    queue(header, out)
                    return
                pending.append(header)
                pending.append(out)
                self._pending_bytes += length
            else:
                other_command(backend, request)
                return
            if len(pending) >= SEND_BATCH_BUFFERS or self._pending_bytes >= SEND_BATCH_BYTES:
                self._send_pending()

        return run

    def _reject_request(self, request: RequestTuple) -> None:
        raise AssertionError(f"request {request} before the handshake ended")

    def _whole_read(self, backend: Backend, cookie: int, offset: int, length: int) -> None:
        """A long structured read the client asked not to split (DF): one data chunk."""
        out = bytearray(length)
        try:
            backend.read_into(offset, memoryview(out))
        except Exception as exc:
            self._backend_error(cookie, exc, "read", offset, length)
            return
        counters = self._counters()
        counters.reads += 1
        counters.bytes_read += length
        self._queue(*self.protocol.read_reply(cookie, offset, out))

    def _sparse_read(self, backend: Backend, cookie: int, offset: int, length: int) -> None:
        """A structured read that sends zero extents as OFFSET_HOLE chunks.

        Everything is read before anything is queued, so the last chunk can
        carry DONE (no error can follow it) and a failure sends only an error.
        """
        protocol = self.protocol
        try:
            segments: list[tuple[int, int, bytearray | None]] = []
            for position, nbytes, is_zero in protocol.sparse_segments(
                offset, length, backend.extents(offset, length)
            ):
                data = None
                if not is_zero:
                    data = bytearray(nbytes)
                    backend.read_into(position, memoryview(data))
                segments.append((position, nbytes, data))
        except Exception as exc:
            self._backend_error(cookie, exc, "read", offset, length)
            return
        counters = self._counters()
        counters.reads += 1
        counters.bytes_read += length
        self._queue(*protocol.sparse_read_reply(cookie, segments))

    def _error(self, cookie: int, error: int, message: str) -> None:
        self._counters().error_replies += 1
        self._queue(*self.protocol.error_reply(cookie, error, message))

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

    def _other_command(self, backend: Backend, request: RequestTuple) -> None:
        """Empty and sparse reads, FLUSH, TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS
        (already checked by the protocol)."""
        command, flags, cookie, offset, length, _ = request
        counters = self._counters()
        if command == p.NBD_CMD_READ:
            if length == 0:
                counters.reads += 1
                if self.protocol.structured:
                    self._queue(self.protocol.empty_read_reply(cookie))
                else:
                    self._queue(ok_reply(cookie))
            elif flags & p.NBD_CMD_FLAG_DF:
                self._whole_read(backend, cookie, offset, length)
            else:
                self._sparse_read(backend, cookie, offset, length)
            return
        fua = bool(flags & p.NBD_CMD_FLAG_FUA)
        name = p.COMMAND_NAMES[command]
        try:
            if command == p.NBD_CMD_FLUSH:
                backend.flush()
                counters.flushes += 1
            elif command == p.NBD_CMD_TRIM:
                if length:
                    backend.trim(offset, length, fua=fua)
                counters.trims += 1
            elif command == p.NBD_CMD_WRITE_ZEROES:
                if flags & p.NBD_CMD_FLAG_FAST_ZERO and not backend.fast_zero:
                    self._error(cookie, p.NBD_ENOTSUP, "zeroing is not faster than writing")
                    return
                if length:
                    backend.write_zeroes(
                        offset, length, may_trim=not flags & p.NBD_CMD_FLAG_NO_HOLE, fua=fua
                    )
                counters.write_zeroes += 1
            elif command == p.NBD_CMD_CACHE:
                if length:
                    backend.cache(offset, length)
                counters.caches += 1
            else:  # NBD_CMD_BLOCK_STATUS
                reply = self.protocol.block_status_reply(
                    cookie, flags, length, backend.extents(offset, length)
                )
                counters.block_status += 1
                self._queue(*reply)
                return
        except Exception as exc:
            self._backend_error(cookie, exc, name, offset, length)
            return
        self._queue(ok_reply(cookie))
