"""The network side of the Redis swap devices: round trips, retries, errors, server identity.

Shared by ``RedisDevice`` (one server) and ``RedisClusterDevice`` (a cluster),
which decide *where* each command goes; this module decides *how*:

- ``exchange`` sends the commands of several servers (each on one connection
  of its pool) before reading any reply, so a request touching several
  servers costs one round trip, not one per server;
- ``Retrier`` runs a request until it succeeds, reconnecting with
  exponential backoff for at most ``retry_s`` seconds when the network or
  the cluster is in the way, then maps what went wrong to ``DeviceError``
  errnos the pager's write-error policies know (ENOMEM and EAGAIN are
  transient, the rest hard);
- ``Identity`` is the token a device writes at open and checks on every new
  connection: a server that restarted empty (no persistence) lacks it, and
  the device reports the blocks it held as lost instead of reading zeros.

redis-py is imported on first use (the ``redis`` extra).
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from vmpager.errors import DeviceError

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "Identity",
    "ReplicaPools",
    "Retrier",
    "exchange",
    "exchange_each",
    "import_redis",
    "pack",
    "replica_addresses",
    "server_error",
]

T = TypeVar("T")

#: First and largest pause between reconnection attempts (seconds).
BACKOFF_FIRST_S = 0.02
BACKOFF_MAX_S = 0.5
#: Longest error text kept in a DeviceError (pipeline errors quote their commands).
_DETAIL_MAX = 200


def import_redis() -> Any:
    """The ``redis`` module, or ImportError saying how to install it."""
    try:
        import redis.cluster

        import redis
    except ImportError as error:
        raise ImportError(
            "Redis swap needs the redis package: pip install 'vmpager[redis]' (or redis>=5)"
        ) from error
    return redis


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _DETAIL_MAX else text[:_DETAIL_MAX] + "..."


def server_error(
    redis: Any, error: BaseException, device: str, blk: int, where: str
) -> DeviceError:
    """Map a redis-py error to ``DeviceError``; ``where`` names the server (``host:port``).

    OOM refusals are ENOMEM and timeouts EAGAIN (both transient), a refused
    password EACCES, everything else EIO.
    """
    exceptions = redis.exceptions
    text = str(error)
    if isinstance(error, exceptions.OutOfMemoryError) or (
        isinstance(error, exceptions.ResponseError) and text.startswith("OOM")
    ):
        err = errno.ENOMEM
    elif isinstance(error, exceptions.TimeoutError):
        err = errno.EAGAIN
    elif isinstance(error, (exceptions.AuthenticationError, exceptions.AuthorizationError)) or (
        isinstance(error, exceptions.ResponseError)
        and text.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))
    ):
        err = errno.EACCES
    else:
        err = errno.EIO
    return DeviceError(err, device, blk, f"server {where}: {_short(error)}")


def replica_addresses(info: Any) -> list[tuple[str, int]]:
    """``(host, port)`` of each online replica in an INFO replication reply (raw text
    or parsed dict), in the server's order (``slave0``, ``slave1``...)."""
    found: list[tuple[int, str, int]] = []
    if isinstance(info, dict):
        entries = [(str(k), v) for k, v in info.items()]
    else:
        text = info.decode() if isinstance(info, bytes) else str(info)
        entries = []
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name.startswith("slave") and name[5:].isdigit():
                fields = dict(item.partition("=")[::2] for item in rest.strip().split(","))
                entries.append((name, fields))
    for name, fields in entries:
        if not (name.startswith("slave") and name[5:].isdigit()) or not isinstance(fields, dict):
            continue
        if str(fields.get("state", "online")) != "online" or "ip" not in fields:
            continue
        found.append((int(name[5:]), str(fields["ip"]), int(fields["port"])))
    return [(host, port) for _, host, port in sorted(found)]


class ReplicaPools:
    """Connection pools to the replicas of masters, as each master's INFO replication
    lists them: where a swap block that failed its check is read again.

    ``of(pool, where, refresh=...)`` gives ``[(host:port, pool)]`` for the master
    reached through ``pool`` (named ``where``), asking it afresh when ``refresh`` or
    not asked before; the replicas' pools copy the master pool's connection
    settings (credentials, TLS, timeouts) but not its on-connect check. Empty for
    a pool without an address (a ready client such as fakeredis). Raises the
    redis-py error of a failed INFO. Thread-safe.
    """

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._lock = threading.Lock()
        self._pools: dict[str, list[tuple[str, Any]]] = {}

    def of(self, pool: Any, where: str, *, refresh: bool) -> list[tuple[str, Any]]:
        with self._lock:
            known = self._pools.get(where)
        if known is not None and not refresh:
            return known
        kwargs = dict(getattr(pool, "connection_kwargs", {}) or {})
        if "host" not in kwargs:
            return []
        kwargs.pop("redis_connect_func", None)
        info = exchange(self._redis, [(pool, [("INFO", "replication")])])[0][0]
        if isinstance(info, Exception):
            raise info
        old = dict(known or [])
        fresh: list[tuple[str, Any]] = []
        for host, port in replica_addresses(info):
            address = f"{host}:{port}"
            replica = old.pop(address, None)
            if replica is None:
                replica = self._redis.ConnectionPool(
                    connection_class=pool.connection_class, **{**kwargs, "host": host, "port": port}
                )
            fresh.append((address, replica))
        for stale in old.values():
            stale.disconnect()
        with self._lock:
            self._pools[where] = fresh
        return fresh

    def close(self) -> None:
        """Disconnect every replica pool."""
        with self._lock:
            pools, self._pools = self._pools, {}
        for found in pools.values():
            for _, replica in found:
                replica.disconnect()


def pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """The commands in the Redis protocol (RESP), as one buffer: one ``sendall`` for all.

    Arguments are bytes, byte memoryviews (block data, copied once here),
    ints or str. redis-py's packer sends each memoryview as a chunk of its
    own (a system call per block); this is the reason for our own.
    """
    parts: list[Any] = []
    append = parts.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, int):
                arg = b"%d" % arg
            elif isinstance(arg, str):
                arg = arg.encode()
            append(b"$%d\r\n" % len(arg))
            append(arg)
            append(b"\r\n")
    return b"".join(parts)


def exchange_each(
    redis: Any, batches: Sequence[tuple[Any, Sequence[tuple[Any, ...]]]]
) -> list[list[Any] | Exception]:
    """Send every batch's commands on one connection of its pool, then read every reply.

    ``batches`` holds ``(pool, commands)`` pairs, a command being a tuple of
    arguments. All commands are written before any reply is read, so the
    servers work at the same time: the cost is one round trip to the slowest
    server plus the transfer. Result ``i`` is batch ``i``'s replies, in order
    (an error reply is its ``ResponseError``, not raised), or the network
    error (``ConnectionError``/``TimeoutError``/``OSError``) that stopped the
    batch, whose connection is then closed so none is reused with replies
    pending. Blocks for the round trip; thread-safe (each call takes its own
    connections).
    """
    response_error = redis.exceptions.ResponseError
    taken: list[tuple[Any, Any] | None] = []
    results: list[list[Any] | Exception] = []
    try:
        for pool, commands in batches:
            conn = None
            try:
                conn = pool.get_connection()
                conn.send_packed_command([pack(commands)], check_health=False)
            except (redis.exceptions.RedisError, OSError) as error:
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
                taken.append(None)
                results.append(error)
                continue
            taken.append((pool, conn))
            results.append([])
        for index, ((_, commands), held) in enumerate(zip(batches, taken, strict=True)):
            if held is None:
                continue
            conn = held[1]
            out: list[Any] = []
            try:
                for _ in commands:
                    try:
                        out.append(conn.read_response())
                    except response_error as error:
                        out.append(error)
            except (redis.exceptions.RedisError, OSError) as error:
                conn.disconnect()
                results[index] = error
                continue
            results[index] = out
        return results
    except BaseException:
        for held in taken:
            if held is not None:
                held[1].disconnect()
        raise
    finally:
        for held in taken:
            if held is not None:
                held[0].release(held[1])


def exchange(
    redis: Any, batches: Sequence[tuple[Any, Sequence[tuple[Any, ...]]]]
) -> list[list[Any]]:
    """``exchange_each``, raising the first network error instead of returning it."""
    replies: list[list[Any]] = []
    for result in exchange_each(redis, batches):
        if isinstance(result, Exception):
            raise result
        replies.append(result)
    return replies


class Identity:
    """The token a device stores on its servers at open and checks on every new connection.

    ``keys`` are the identity keys (one per server, or per master of a
    cluster, chosen so each lives on the server it vouches for); ``token``
    their value. ``on_connect`` is given to redis-py as ``redis_connect_func``:
    once ``armed`` (after the keys are written) it reads the keys on each new
    connection; a key the server answers for but does not hold (or holds
    with another value) means the server lost its data, and every such key
    range is recorded as lost. A connection is refused (``ConnectionError``,
    so the request retries) until the server can answer for its keys (not
    while it reports CLUSTERDOWN or TRYAGAIN). Thread-safe.
    """

    def __init__(self, redis: Any, keys: Sequence[bytes], *, handshake: bool = True) -> None:
        self._redis = redis
        #: Whether ``on_connect`` does the connection's handshake first (a plain
        #: pool's hook must; RedisCluster does it before calling the hook).
        self._handshake = handshake
        self.token = uuid.uuid4().hex.encode()
        self.keys = list(keys)
        self.armed = False
        self._lock = threading.Lock()
        #: key index -> "host:port" of the server found without it.
        self._lost: dict[int, str] = {}

    def on_connect(self, conn: Any) -> None:
        """redis-py connect hook: handshake, then check the identity keys (once armed)."""
        if self._handshake:
            conn.on_connect()
        if not self.armed or not self.keys:
            return
        conn.send_packed_command(conn.pack_commands([("GET", key) for key in self.keys]))
        where = f"{conn.host}:{conn.port}"
        missing: list[int] = []
        unsure: BaseException | None = None
        for index in range(len(self.keys)):
            try:
                value = conn.read_response()
            except self._redis.exceptions.MovedError:
                continue  # a key another server answers for
            except self._redis.exceptions.ResponseError as error:
                unsure = error  # CLUSTERDOWN, TRYAGAIN...: the server cannot say yet
                continue
            if value != self.token:
                missing.append(index)
        if missing:
            with self._lock:
                for index in missing:
                    self._lost.setdefault(index, where)
            raise self._redis.exceptions.ConnectionError(
                f"{where} restarted without the data of this swap device"
            )
        if unsure is not None:
            # Not used before the server can vouch for its data: the request retries.
            raise self._redis.exceptions.ConnectionError(
                f"{where} cannot confirm it holds this swap device's data yet ({unsure})"
            )

    def lost(self, index: int | None = None) -> str | None:
        """The server that lost key range ``index`` (any range when None), or None."""
        with self._lock:
            if index is None:
                return next(iter(self._lost.values()), None)
            return self._lost.get(index)

    def lost_indices(self) -> dict[int, str]:
        """Every key range found lost, with the server that lost it."""
        with self._lock:
            return dict(self._lost)


class Retrier:
    """Runs a request again, with backoff, while the network or the cluster is in the way.

    ``call(op, blk, where)`` calls ``op()`` until it returns. Retried: lost
    connections, timeouts, a cluster that is down, moving or failing over
    (MOVED/ASK/TRYAGAIN/CLUSTERDOWN/LOADING/READONLY); before each retry it
    sleeps (20 ms doubling to 0.5 s) and calls ``refresh`` (a cluster
    re-reads its topology). After ``retry_s`` seconds the last error is
    raised as ``DeviceError`` (``server_error``). Not retried: OOM, refused
    passwords, other error replies, and data found lost (``lost()`` names the
    server): those raise at once. ``where()`` names the server for messages.
    """

    def __init__(
        self,
        redis: Any,
        device: str,
        retry_s: float,
        *,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self._device = device
        self._retry_s = retry_s
        self._refresh = refresh
        exc = redis.exceptions
        self._auth = (exc.AuthenticationError, exc.AuthorizationError, exc.NoPermissionError)
        self._retryable = (
            exc.ConnectionError,
            exc.TimeoutError,
            exc.ClusterDownError,
            exc.TryAgainError,
            exc.AskError,  # MovedError too
            exc.BusyLoadingError,
            exc.ReadOnlyError,
            exc.ClusterError,
            exc.SlotNotCoveredError,
            OSError,
        )
        self._lock = threading.Lock()
        self.retries = 0

    def is_retryable(self, error: BaseException) -> bool:
        """True for errors that may go away once the network or the cluster settles."""
        return isinstance(error, self._retryable) and not isinstance(error, self._auth)

    def call(
        self,
        op: Callable[[], T],
        blk: int,
        where: Callable[[], str],
        lost: Callable[[], str | None] | None = None,
    ) -> T:
        """``op()`` with retries; ``DeviceError`` (naming the server) when it cannot succeed."""
        deadline = time.monotonic() + self._retry_s
        delay = BACKOFF_FIRST_S
        while True:
            try:
                return op()
            except DeviceError:
                raise
            except Exception as error:
                gone = lost() if lost is not None else None
                if gone is not None:
                    raise DeviceError(
                        errno.EIO,
                        self._device,
                        blk,
                        f"server {gone} restarted empty: the swap data it held is lost",
                    ) from error
                if not self.is_retryable(error) or time.monotonic() + delay > deadline:
                    if isinstance(error, self._redis.exceptions.RedisError | OSError):
                        raise server_error(
                            self._redis, error, self._device, blk, where()
                        ) from error
                    raise
            with self._lock:
                self.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            if self._refresh is not None:
                try:
                    self._refresh()
                except Exception:
                    pass  # the next attempt reports what is wrong
