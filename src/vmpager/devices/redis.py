"""A swap device in one Redis server: the memory of another machine as swap.

Each block is one Redis string key, ``<prefix><block number>``. A request is
one round trip whatever its size: a write is one MSET (followed, with
``replicas``, by a WAIT on the same connection), a read one MGET, a discard
one UNLINK, and a batch of reads (``read_many``) one pipeline of MGETs.
Blocks never written read as zeros.

Open it by URL (``redis://[user:password@]host:port/db?size=4G``, see
``vmpager.devices.url``) or with a URL or ready client and a block count.
Opening connects and checks the server before returning: it must not evict
keys (``maxmemory-policy`` ``noeviction``, the default, or a ``volatile-*``
policy, which never touches keys without a TTL), must have the replicas asked
for, and gets the device's identity key.

Faults. Every call has a socket timeout; a request that meets a lost
connection or a timeout reconnects with backoff for up to ``retry`` seconds
before failing. Failures are ``DeviceError``: ``ENOMEM`` (transient) for an
OOM refusal, ``EAGAIN`` (transient) for a timeout or a write the replicas did
not acknowledge in time, ``EIO`` otherwise -- the pager's write-error policy
then treats them like a disk's. A server that comes back empty (restarted
without persistence) lacks the identity key, which every new connection
checks: from then on the device fails every request with ``EIO`` naming the
server ("restarted empty"), so lost blocks never read as zeros.

redis-py is an optional extra (``pip install 'vmpager[redis]'``), imported
only when a device is made.
"""

from __future__ import annotations

import errno
import itertools
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from vmpager.devices._redis_wire import (
    Identity,
    ReplicaPools,
    Retrier,
    exchange,
    import_redis,
    server_error,
)
from vmpager.devices._request import DeviceCounters, as_byte_views, check_block_size, check_range
from vmpager.devices.protocol import DeviceStatistics, ReadableBuffer, WritableBuffer
from vmpager.devices.url import SwapURL
from vmpager.errors import DeviceError
from vmpager.units import check_int

__all__ = ["RedisDevice", "check_eviction_policy", "fill_views"]

#: Keys per UNLINK when the device deletes its blocks at close.
_UNLINK_BATCH = 1000
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_IDENTITY_SUFFIX = b"identity"


def check_eviction_policy(reply: Any, where: str) -> None:
    """``ValueError`` naming ``where`` if a CONFIG GET maxmemory-policy reply may evict keys.

    ``reply`` is the raw reply (a flat list or a dict); an error reply (CONFIG
    disabled, as on managed servers) is the operator's promise and passes.
    """
    if isinstance(reply, Exception):
        return
    if isinstance(reply, dict):
        items = list(reply.items())
    else:
        items = list(zip(reply[0::2], reply[1::2], strict=True))
    for key, value in items:
        name = key.decode() if isinstance(key, bytes) else str(key)
        policy = value.decode() if isinstance(value, bytes) else str(value)
        if name == "maxmemory-policy" and policy.startswith("allkeys-"):
            raise ValueError(
                f"Redis server {where}: maxmemory-policy is {policy!r}, which may evict swap "
                "blocks; set it to 'noeviction' (or a volatile-* policy)"
            )


def fill_views(
    device: str, blk: int, block_size: int, views: Sequence[memoryview], values: Sequence[Any]
) -> None:
    """Copy MGET ``values`` into the blocks of ``views`` (zeros for None); EIO for a bad size."""
    slots = (
        view[offset : offset + block_size]
        for view in views
        for offset in range(0, view.nbytes, block_size)
    )
    for number, (slot, value) in enumerate(zip(slots, values, strict=True)):
        if value is None:
            slot[:] = bytes(block_size)
        elif len(value) != block_size:
            raise DeviceError(
                errno.EIO, device, blk, f"block {blk + number} holds {len(value)} bytes"
            )
        else:
            slot[:] = value


def _blocks(views: Sequence[memoryview], block_size: int) -> list[memoryview]:
    return [
        view[offset : offset + block_size]
        for view in views
        for offset in range(0, view.nbytes, block_size)
    ]


class RedisDevice:
    """``nblocks`` blocks of ``block_size`` bytes stored as keys in one Redis server.

    ``server`` is a ``redis://``/``rediss://`` URL (the device owns its
    connection pool: timeouts, reconnection and the identity check on every
    new connection) or a ready client such as ``redis.Redis`` or
    ``fakeredis.FakeRedis`` (its pool is used as it is: no identity check on
    reconnection; left open at close). ``prefix`` names the device's keys;
    the default is a fresh random one, so a new device never sees old
    contents. With ``delete_on_close`` the device removes its keys when closed.
    ``replicas``: a write returns only once it is on that many replicas as
    well (WAIT on the write's connection); the server must have them
    connected at open. ``timeout``: seconds per network call; ``retry``:
    seconds a request keeps reconnecting.

    A failed write may have stored some of its blocks; like every device's
    failed write, its blocks are not to be trusted. Requests block for one
    round trip (plus retries); concurrent requests from several threads are
    safe (each takes its own pooled connection).
    """

    def __init__(
        self,
        server: str | SwapURL | Any,
        nblocks: int,
        block_size: int = 4096,
        *,
        prefix: str | None = None,
        name: str | None = None,
        delete_on_close: bool = True,
        replicas: int = 0,
        timeout: float = 5.0,
        retry: float = 3.0,
    ) -> None:
        redis = self._redis = import_redis()
        self._block_size = check_block_size(block_size)
        self._nblocks = check_int(nblocks, "nblocks", minimum=1)
        self._replicas = check_int(replicas, "replicas", minimum=0, maximum=16)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retry, bool) or not isinstance(retry, int | float) or not retry >= 0:
            raise ValueError(f"retry must be a number of seconds >= 0, got {retry!r}")
        if prefix is None:
            prefix = f"vmpager:{uuid.uuid4().hex}:"
        elif not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self._prefix = prefix.encode()
        self._identity = Identity(redis, [self._prefix + _IDENTITY_SUFFIX])
        self._owns_pool = isinstance(server, str | SwapURL)
        if isinstance(server, SwapURL):
            self._pool = redis.ConnectionPool(
                redis_connect_func=self._identity.on_connect, **_pool_kwargs(redis, server)
            )
        elif isinstance(server, str):
            self._pool = redis.ConnectionPool.from_url(
                server,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                redis_connect_func=self._identity.on_connect,
            )
        else:
            self._pool = server.connection_pool
        where = server.display if isinstance(server, SwapURL) else self._describe_server()
        self._name = name if name is not None else f"{where}/{prefix}"
        self._wait_ms = max(1, int(timeout * 500))  # WAIT gives up well before the socket does
        self._delete_on_close = bool(delete_on_close)
        self._counters = DeviceCounters()
        self._retrier = Retrier(redis, self._name, float(retry))
        self._close_lock = threading.Lock()
        self._closed = False
        #: Connection pools to the server's replicas (``read_replica``).
        self._replica_pools = ReplicaPools(redis)
        try:
            self._open()
        except BaseException:
            if self._owns_pool:
                self._pool.disconnect()
            raise

    @classmethod
    def from_url(cls, url: SwapURL, nblocks: int, block_size: int = 4096) -> RedisDevice:
        """The device a parsed ``redis://``/``rediss://`` swap URL names (see ``devices.url``)."""
        return cls(
            url,
            nblocks,
            block_size,
            prefix=url.prefix,
            replicas=url.replicas or 0,
            timeout=url.timeout_s,
            retry=url.retry_s,
        )

    def _describe_server(self) -> str:
        kwargs = getattr(self._pool, "connection_kwargs", {}) or {}
        if "host" in kwargs:
            ssl = "SSL" in getattr(self._pool, "connection_class", type).__name__
            host, port, db = kwargs["host"], kwargs.get("port", 6379), kwargs.get("db", 0)
            return f"{'rediss' if ssl else 'redis'}://{host}:{port}/{db}"
        return "redis:"

    def _server(self) -> str:
        kwargs = getattr(self._pool, "connection_kwargs", {}) or {}
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', 6379)}"

    def _open(self) -> None:
        """Check the server and store the identity key: one round trip, no retries."""
        commands: list[tuple[Any, ...]] = [
            ("CONFIG", "GET", "maxmemory-policy"),
            ("INFO", "replication"),
            ("SET", self._identity.keys[0], self._identity.token),
        ]
        if self._replicas:
            commands.append(("WAIT", self._replicas, self._wait_ms))
        opener = Retrier(self._redis, self._name, 0.0)
        replies = opener.call(lambda: self._exchange(commands, tolerate=(0, 1)), 0, self._server)
        check_eviction_policy(replies[0], self._server())
        if self._replicas:
            info = replies[1]
            have = _connected_replicas(info)
            if have < self._replicas or replies[-1] < self._replicas:
                raise ValueError(
                    f"Redis server {self._server()}: replicas={self._replicas} asked, but "
                    f"{have} replica(s) are connected and {replies[-1]} acknowledged a write"
                )
        self._identity.armed = self._owns_pool

    def _exchange(self, commands: list[tuple[Any, ...]], tolerate: Sequence[int] = ()) -> list[Any]:
        """One round trip; an error reply (except at ``tolerate`` positions) is raised."""
        replies = exchange(self._redis, [(self._pool, commands)])[0]
        for index, reply in enumerate(replies):
            if isinstance(reply, Exception) and index not in tolerate:
                raise reply
        return replies

    def _call(self, blk: int, op: Callable[[], Any]) -> Any:
        return self._retrier.call(op, blk, self._server, self._identity.lost)

    # -- properties -------------------------------------------------------------

    @property
    def name(self) -> str:
        """``redis://host:port/db/prefix`` (or ``redis:prefix`` for other clients)."""
        return self._name

    @property
    def block_size(self) -> int:
        """Bytes per block."""
        return self._block_size

    @property
    def nblocks(self) -> int:
        """Number of blocks."""
        return self._nblocks

    @property
    def prefix(self) -> str:
        """The prefix of the device's keys."""
        return self._prefix.decode()

    @property
    def replicas(self) -> int:
        """Replicas each write waits for (beyond the server itself)."""
        return self._replicas

    @property
    def retries(self) -> int:
        """Requests retried after a network or server error since open."""
        return self._retrier.retries

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._name}: device is closed")

    def _keys(self, blk: int, nblocks: int) -> list[bytes]:
        prefix = self._prefix
        return [prefix + str(b).encode() for b in range(blk, blk + nblocks)]

    def _lost_error(self, blk: int) -> DeviceError | None:
        gone = self._identity.lost()
        if gone is None:
            return None
        return DeviceError(
            errno.EIO,
            self._name,
            blk,
            f"server {gone} restarted empty: the swap data it held is lost",
        )

    # -- I/O ---------------------------------------------------------------------

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Fill ``buffers`` from the blocks at ``blk`` with one MGET (zeros where never written)."""
        self._check_open()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=True
        )
        try:
            if (lost := self._lost_error(blk)) is not None:
                raise lost
            command = ("MGET", *self._keys(blk, nblocks))
            values = self._call(blk, lambda: self._exchange([command])[0])
            fill_views(self._name, blk, self._block_size, views, values)
        except DeviceError:
            self._counters.count_read_error()
            raise
        self._counters.count_read(nblocks)

    def read_many(
        self,
        requests: Sequence[tuple[int, Sequence[WritableBuffer]]],
        run: Callable[[Callable[[int], None], Sequence[int]], None],
    ) -> list[DeviceError | None]:
        """Independent reads in one round trip (a pipeline of MGETs); one error per request.

        Each request is checked as for ``read_blocks`` before any I/O. ``run``
        is not needed (the server works on the whole pipeline at once) and is
        accepted for the ``SwapSpace.read_many`` interface. Result ``i`` is
        None when request ``i`` was read, else its ``DeviceError``.
        """
        del run
        self._check_open()
        bs = self._block_size
        prepared = [
            (*as_byte_views(self._name, self._nblocks, bs, blk, buffers, writable=True), blk)
            for blk, buffers in requests
        ]
        errors: list[DeviceError | None] = [None] * len(prepared)
        if not prepared:
            return errors
        commands = [("MGET", *self._keys(blk, n)) for _, n, blk in prepared]
        first = prepared[0][2]
        try:
            if (lost := self._lost_error(first)) is not None:
                raise lost
            replies = self._call(first, lambda: self._exchange(commands, range(len(commands))))
        except DeviceError as error:
            for i, (_, _, blk) in enumerate(prepared):
                errors[i] = DeviceError(error.errno or errno.EIO, self._name, blk, _detail(error))
                self._counters.count_read_error()
            return errors
        done = 0
        for i, ((views, nblocks, blk), reply) in enumerate(zip(prepared, replies, strict=True)):
            try:
                if isinstance(reply, Exception):
                    raise _reply_error(self._redis, reply, self._name, blk, self._server())
                fill_views(self._name, blk, bs, views, reply)
            except DeviceError as error:
                errors[i] = error
                self._counters.count_read_error()
                continue
            done += nblocks
        self._counters.count_reads(sum(1 for e in errors if e is None), done)
        return errors

    def read_replica(self, blk: int, buffers: Sequence[WritableBuffer], replica: int) -> bool:
        """Fill ``buffers`` from the blocks at ``blk`` as replica number ``replica`` holds them.

        For the swap tiers: a block that fails its check on the server is read
        from its replicas instead, in the order INFO replication lists the
        online ones (asked afresh when ``replica`` is 0). False, reading
        nothing, when there is no such replica or the device cannot reach
        replicas (a ready client without an address). One round trip to the
        server (for ``replica`` 0) and one to the replica, no retries; a
        replica that does not answer is ``DeviceError`` naming it. A replica
        may lag behind a write not waited for (``replicas=0``): the caller
        checks what it gets.
        """
        self._check_open()
        replica = check_int(replica, "replica", minimum=0)
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=True
        )
        redis = self._redis
        where = self._server()
        try:
            pools = self._replica_pools.of(self._pool, where, refresh=replica == 0)
            if replica >= len(pools):
                return False
            where, pool = pools[replica]
            where += " (replica)"
            command = ("MGET", *self._keys(blk, nblocks))
            reply = exchange(redis, [(pool, [command])])[0][0]
            if isinstance(reply, Exception):
                raise reply
        except (redis.exceptions.RedisError, OSError) as error:
            raise server_error(redis, error, self._name, blk, where) from None
        fill_views(self._name, blk, self._block_size, views, reply)
        return True

    def write_blocks(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Store ``buffers`` at the blocks at ``blk`` with one MSET (and WAIT): one round trip.

        With ``replicas``, returns only once that many replicas acknowledged
        the write; else ``DeviceError`` ``EAGAIN`` (the data may be on the
        server, but is not yet safe).
        """
        self._check_open()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=False
        )
        command: list[Any] = ["MSET"]
        for key, value in zip(
            self._keys(blk, nblocks), _blocks(views, self._block_size), strict=True
        ):
            command += (key, value)
        commands: list[tuple[Any, ...]] = [tuple(command)]
        if self._replicas:
            commands.append(("WAIT", self._replicas, self._wait_ms))
        try:
            if (lost := self._lost_error(blk)) is not None:
                raise lost
            replies = self._call(blk, lambda: self._exchange(commands))
            if self._replicas and replies[1] < self._replicas:
                raise DeviceError(
                    errno.EAGAIN,
                    self._name,
                    blk,
                    f"server {self._server()}: {replies[1]} of {self._replicas} replica(s) "
                    f"acknowledged the write within {self._wait_ms} ms",
                )
        except DeviceError:
            self._counters.count_write_error()
            raise
        self._counters.count_write(nblocks)

    def discard(self, blk: int, nblocks: int) -> None:
        """Delete the blocks' keys with one UNLINK; they then read as zeros."""
        self._check_open()
        check_range(self._name, self._nblocks, blk, check_int(nblocks, "nblocks", minimum=1))
        command = ("UNLINK", *self._keys(blk, nblocks))
        self._call(blk, lambda: self._exchange([command]))
        self._counters.count_discard()

    def flush(self) -> None:
        """Nothing to do: a write is in the server's memory (and replicas') once acknowledged."""
        self._check_open()
        self._counters.count_flush()

    def close(self) -> None:
        """Delete the device's keys (``delete_on_close``) and drop an owned connection pool.

        Idempotent; later requests raise ``ValueError``. A failure to delete
        the keys is ignored: the device is closed either way.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._identity.armed = False
        try:
            if self._delete_on_close:
                client = self._redis.Redis(connection_pool=self._pool)
                pattern = _GLOB_SPECIAL.sub(r"\\\1", self._prefix.decode()) + "*"
                keys = client.scan_iter(match=pattern, count=_UNLINK_BATCH)
                while batch := list(itertools.islice(keys, _UNLINK_BATCH)):
                    client.unlink(*batch)
        except self._redis.exceptions.RedisError:
            pass
        finally:
            if self._owns_pool:
                self._pool.disconnect()
            self._replica_pools.close()

    def statistics(self) -> DeviceStatistics:
        """Counters since the device was opened."""
        return self._counters.snapshot(self._name, self._block_size, self._nblocks)

    def __enter__(self) -> RedisDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisDevice({self._name!r}, {self._nblocks}, block_size={self._block_size})"


def _connected_replicas(info: Any) -> int:
    """``connected_slaves`` from an INFO replication reply (0 when it cannot be read)."""
    if isinstance(info, Exception):
        return 0
    if isinstance(info, dict):
        return int(info.get("connected_slaves", 0))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("connected_slaves:"):
            return int(line.split(":", 1)[1])
    return 0


def _pool_kwargs(redis: Any, url: SwapURL) -> dict[str, Any]:
    """Connection-pool arguments for a parsed URL: address, credentials, timeouts, TLS."""
    kwargs: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "db": url.db,
        "username": url.username,
        "password": url.password,
        "socket_timeout": url.timeout_s,
        "socket_connect_timeout": url.timeout_s,
    }
    if url.tls:
        kwargs["connection_class"] = redis.SSLConnection
        if url.ca is not None:
            kwargs["ssl_ca_certs"] = url.ca
    return kwargs


def _detail(error: DeviceError) -> str:
    text = str(error)
    return text.split("(", 1)[1].rstrip(")") if "(" in text else ""


def _reply_error(redis: Any, error: Exception, device: str, blk: int, where: str) -> DeviceError:
    from vmpager.devices._redis_wire import server_error

    return server_error(redis, error, device, blk, where)
