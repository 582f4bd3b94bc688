"""A swap device in a Redis server: remote memory for programs that outgrow one machine.

Each block is one Redis string key, ``<prefix><block number>``. A request is
one round trip whatever its size: a write is one pipeline of SETs, a read one
MGET, a discard one UNLINK. Blocks never written read as zeros.

redis-py is an optional extra (``pip install 'vmpager[redis]'``), imported
only when a ``RedisDevice`` is made. The server must not evict keys it holds
(``maxmemory-policy`` ``noeviction``, the default, or a ``volatile-*`` policy,
which never touches keys without a TTL): an evicted block is lost swap data.
The device checks the policy when it opens, where the server allows CONFIG.
A server out of memory refuses writes with an OOM error, reported as the
transient ``ENOMEM``, so the pager retries and goes elsewhere.
"""

from __future__ import annotations

import errno
import itertools
import re
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from vmpager.devices._request import DeviceCounters, as_byte_views, check_block_size, check_range
from vmpager.devices.protocol import DeviceStatistics, ReadableBuffer, WritableBuffer
from vmpager.errors import DeviceError
from vmpager.units import check_int

__all__ = ["RedisDevice"]

#: Keys per UNLINK when the device deletes its blocks at close.
_UNLINK_BATCH = 1000
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as error:
        raise ImportError(
            "RedisDevice needs the redis package: pip install 'vmpager[redis]' (or redis>=5)"
        ) from error
    return redis


class RedisDevice:
    """``nblocks`` blocks of ``block_size`` bytes stored as keys in a Redis server.

    ``server`` is a ``redis://`` URL (the device then owns the connection
    pool and closes it) or a ready client such as ``redis.Redis`` or
    ``fakeredis.FakeRedis`` (left open at close). ``prefix`` names the
    device's keys; the default is a fresh random one, so a new device never
    sees old contents. With ``delete_on_close`` the device removes its keys
    when closed (one SCAN pass).

    A failed write may have stored some of its blocks (a pipeline is not a
    transaction); like every device's failed write, its blocks are not to be
    trusted. Requests block for one round trip; the client's connection pool makes
    concurrent requests from several threads safe. Server and connection
    failures raise ``DeviceError``: ``ENOMEM`` (transient) for an OOM
    refusal, ``EAGAIN`` (transient) for a timeout, ``EIO`` otherwise.
    """

    def __init__(
        self,
        server: str | Any,
        nblocks: int,
        block_size: int = 4096,
        *,
        prefix: str | None = None,
        name: str | None = None,
        delete_on_close: bool = True,
    ) -> None:
        self._redis = _import_redis()
        self._block_size = check_block_size(block_size)
        self._nblocks = check_int(nblocks, "nblocks", minimum=1)
        if prefix is None:
            prefix = f"vmpager:{uuid.uuid4().hex}:"
        elif not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self._prefix = prefix.encode()
        self._owns_client = isinstance(server, str)
        self._client: Any = (
            self._redis.Redis.from_url(server) if isinstance(server, str) else server
        )
        self._name = name if name is not None else self._describe(prefix)
        self._delete_on_close = bool(delete_on_close)
        self._counters = DeviceCounters()
        self._close_lock = threading.Lock()
        self._closed = False
        try:
            self._check_eviction_policy()
        except BaseException:
            if self._owns_client:
                self._client.close()
            raise

    def _describe(self, prefix: str) -> str:
        pool = getattr(self._client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", {}) or {}
        if "host" in kwargs:
            host, port, db = kwargs["host"], kwargs.get("port", 6379), kwargs.get("db", 0)
            return f"redis://{host}:{port}/{db}/{prefix}"
        return f"redis:{prefix}"

    def _check_eviction_policy(self) -> None:
        """Refuse a server that may evict our keys; say nothing if CONFIG is not allowed."""
        try:
            reply = self._client.config_get("maxmemory-policy")
        except self._redis.exceptions.ResponseError:
            return  # CONFIG disabled (managed servers): the operator's promise
        except self._redis.exceptions.RedisError as error:
            raise self._device_error(error, 0) from error
        policy = reply.get("maxmemory-policy", reply.get(b"maxmemory-policy", b""))
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy.startswith("allkeys-"):
            raise ValueError(
                f"{self._name}: the Redis server's maxmemory-policy is {policy!r}, which may "
                "evict swap blocks; use 'noeviction'"
            )

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

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._name}: device is closed")

    def _keys(self, blk: int, nblocks: int) -> list[bytes]:
        prefix = self._prefix
        return [prefix + str(b).encode() for b in range(blk, blk + nblocks)]

    def _device_error(self, error: Exception, blk: int) -> DeviceError:
        exceptions = self._redis.exceptions
        text = str(error)
        out_of_memory = getattr(exceptions, "OutOfMemoryError", ())
        if isinstance(error, out_of_memory) or (
            isinstance(error, exceptions.ResponseError) and text.startswith("OOM")
        ):
            err = errno.ENOMEM
        elif isinstance(error, exceptions.TimeoutError):
            err = errno.EAGAIN
        else:
            err = errno.EIO
        if len(text) > 200:  # pipeline errors quote the command and its arguments
            text = text[:200] + "..."
        return DeviceError(err, self._name, blk, f"{type(error).__name__}: {text}")

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Fill ``buffers`` from the blocks at ``blk`` with one MGET (zeros where never written)."""
        self._check_open()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=True
        )
        try:
            values = self._client.mget(self._keys(blk, nblocks))
        except self._redis.exceptions.RedisError as error:
            self._counters.count_read_error()
            raise self._device_error(error, blk) from error
        size = self._block_size
        slots = (
            view[offset : offset + size] for view in views for offset in range(0, view.nbytes, size)
        )
        for number, (slot, value) in enumerate(zip(slots, values, strict=True)):
            if value is None:
                slot[:] = bytes(size)
            elif len(value) != size:
                self._counters.count_read_error()
                raise DeviceError(
                    errno.EIO, self._name, blk, f"block {blk + number} holds {len(value)} bytes"
                )
            else:
                slot[:] = value
        self._counters.count_read(nblocks)

    def write_blocks(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Store ``buffers`` at the blocks at ``blk`` with one pipeline of SETs (one round trip)."""
        self._check_open()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=False
        )
        size = self._block_size
        pipe = self._client.pipeline(transaction=False)
        blocks = (
            view[offset : offset + size] for view in views for offset in range(0, view.nbytes, size)
        )
        for key, value in zip(self._keys(blk, nblocks), blocks, strict=True):
            pipe.set(key, value)
        try:
            pipe.execute()
        except self._redis.exceptions.RedisError as error:
            self._counters.count_write_error()
            raise self._device_error(error, blk) from error
        finally:
            pipe.reset()
        self._counters.count_write(nblocks)

    def discard(self, blk: int, nblocks: int) -> None:
        """Delete the blocks' keys with one UNLINK; they then read as zeros."""
        self._check_open()
        check_range(self._name, self._nblocks, blk, check_int(nblocks, "nblocks", minimum=1))
        try:
            self._client.unlink(*self._keys(blk, nblocks))
        except self._redis.exceptions.RedisError as error:
            raise self._device_error(error, blk) from error
        self._counters.count_discard()

    def flush(self) -> None:
        """Nothing to do: a write is in the server's memory once acknowledged. Counts the call."""
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
        try:
            if self._delete_on_close:
                pattern = _GLOB_SPECIAL.sub(r"\\\1", self._prefix.decode()) + "*"
                keys = self._client.scan_iter(match=pattern, count=_UNLINK_BATCH)
                while batch := list(itertools.islice(keys, _UNLINK_BATCH)):
                    self._client.unlink(*batch)
        except self._redis.exceptions.RedisError:
            pass
        finally:
            if self._owns_client:
                self._client.close()

    def statistics(self) -> DeviceStatistics:
        """Counters since the device was opened."""
        return self._counters.snapshot(self._name, self._block_size, self._nblocks)

    def __enter__(self) -> RedisDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisDevice({self._name!r}, {self._nblocks}, block_size={self._block_size})"
