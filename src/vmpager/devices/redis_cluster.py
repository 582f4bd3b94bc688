"""A swap device spread over a Redis Cluster: the memory of many machines as one device.

Blocks are cut into *groups* of ``group_blocks`` consecutive blocks (256, 1
MiB of 4 KiB pages, by default). The keys of one group share a hash tag,
``{<prefix><group>}<block>``, so they live in one hash slot, on one master;
groups hash to slots all over the key space, so a device's blocks spread
evenly over the masters once it holds more than a few groups. A pageout run
(at most 64 pages) lies in one group, or straddles two; either way its
write is one round trip: one MSET per group, and the commands for every
master involved are sent before any reply is read (``exchange_each``).
Reads are MGETs per group, and a batch of page-ins (``read_many``) is one
pipeline per master, all masters at once.

Replication (``replicas=N``): each master's part of a write is followed by
``WAIT N`` on the same connection, and the write returns only when every
master involved reports N replicas holding it. So an acknowledged page is
on N+1 servers; when its master dies, the cluster promotes a replica that
has it (Redis promotes the most up-to-date replica). Limits: WAIT counts
replicas that *received* the write (in memory, not on disk); a write that
failed or timed out may still be on some servers; once a master has failed
over, its slots accept acknowledged writes again only when the new master
has N replicas (the old master back as a replica, or a migrated spare);
until then those writes fail with ``EAGAIN`` after ``retry`` seconds and the
pager keeps the pages dirty. See docs/far-memory.md.

Faults: lost connections, MOVED, TRYAGAIN, CLUSTERDOWN and timeouts make a
request re-read the topology and try again with backoff for up to ``retry``
seconds (enough to ride out a failover); then ``DeviceError`` naming the
master. Each master at open gets an identity key in one of its slots; a
master that comes back empty (restarted without persistence before a
replica took over) lacks it on reconnection, and the blocks in the slots it
served at open are reported lost (``EIO``) from then on, never read as
zeros. Slot migration (resharding) while a device is in use is retried like
a failover but not otherwise supported.

The servers should run with ``cluster-require-full-coverage no``, so that a
master lost for good only fails the blocks it held.
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmpager.devices._redis_wire import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    Identity,
    ReplicaPools,
    Retrier,
    exchange_each,
    import_redis,
    server_error,
)
from vmpager.devices._request import DeviceCounters, as_byte_views, check_block_size, check_range
from vmpager.devices.protocol import DeviceStatistics, ReadableBuffer, WritableBuffer
from vmpager.devices.redis import check_eviction_policy, fill_views
from vmpager.devices.url import SwapURL
from vmpager.errors import DeviceError
from vmpager.units import check_int

__all__ = ["RedisClusterDevice"]

_NSLOTS = 16384
_SCAN_COUNT = 1000


@dataclass(slots=True)
class _Piece:
    """One command for one hash slot, and what became of it."""

    slot: int
    command: tuple[Any, ...]
    blk: int
    reply: Any = None
    error: BaseException | None = None
    where: str = ""
    done: bool = False


class RedisClusterDevice:
    """``nblocks`` blocks of ``block_size`` bytes spread over the masters of a Redis Cluster.

    ``url`` is a parsed ``redis+cluster://`` URL or the URL text (any node of
    the cluster; credentials and TLS as for ``redis://``). ``prefix``: the
    device's key prefix (default: fresh and random). ``replicas``: replicas
    each write must reach before it returns. ``timeout``: seconds per network
    call; ``retry``: seconds a request keeps trying through failures and
    failovers. ``group_blocks``: blocks per hash slot (a power of two).

    Opening connects to every master and checks it (no evicting
    ``maxmemory-policy``, at least ``replicas`` replicas connected) before
    returning: ``ValueError`` or ``DeviceError`` naming the server otherwise.
    Requests block for their round trip (plus retries); concurrent requests
    from several threads are safe.
    """

    def __init__(
        self,
        url: SwapURL | str,
        nblocks: int,
        block_size: int = 4096,
        *,
        prefix: str | None = None,
        name: str | None = None,
        delete_on_close: bool = True,
        replicas: int = 0,
        timeout: float = 5.0,
        retry: float = 15.0,
        group_blocks: int = 256,
    ) -> None:
        redis = self._redis = import_redis()
        if isinstance(url, str):
            from vmpager.devices.url import parse_swap_url

            text = url if "size=" in url else url + ("&" if "?" in url else "?") + "size=1"
            url = parse_swap_url(text)
        if not url.cluster:
            raise ValueError(f"url must be a redis+cluster:// URL, got {url.display}")
        self._block_size = check_block_size(block_size)
        self._nblocks = check_int(nblocks, "nblocks", minimum=1)
        self._replicas = check_int(replicas, "replicas", minimum=0, maximum=16)
        self._group_blocks = check_int(group_blocks, "group_blocks", minimum=1, maximum=1 << 20)
        if self._group_blocks & (self._group_blocks - 1):
            raise ValueError(f"group_blocks must be a power of two, got {group_blocks}")
        self._group_shift = self._group_blocks.bit_length() - 1
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retry, bool) or not isinstance(retry, int | float) or not retry >= 0:
            raise ValueError(f"retry must be a number of seconds >= 0, got {retry!r}")
        if prefix is None:
            prefix = f"vmpager:{uuid.uuid4().hex}:"
        elif not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        self._prefix = prefix.encode()
        self._name = name if name is not None else f"{url.display}/{prefix}"
        self._retry_s = float(retry)
        self._wait_ms = max(1, int(timeout * 500))  # WAIT gives up well before the socket does
        self._delete_on_close = bool(delete_on_close)
        self._counters = DeviceCounters()
        self._close_lock = threading.Lock()
        self._closed = False
        self._retrier = Retrier(redis, self._name, self._retry_s)
        self._retries = 0
        self._stat_lock = threading.Lock()
        #: slot -> index of the identity key (master at open) that vouches for it.
        self._vouch = np.full(_NSLOTS, -1, dtype=np.int16)
        self._identity = Identity(redis, [], handshake=False)
        #: Connection pools to the masters' replicas (``read_replica``).
        self._replica_pools = ReplicaPools(redis)
        kwargs: dict[str, Any] = {
            "host": url.host,
            "port": url.port,
            "username": url.username,
            "password": url.password,
            "socket_timeout": float(timeout),
            "socket_connect_timeout": float(timeout),
            "require_full_coverage": False,
            "redis_connect_func": self._identity.on_connect,
        }
        if url.tls:
            kwargs["ssl"] = True
            if url.ca is not None:
                kwargs["ssl_ca_certs"] = url.ca
        self._seed = f"{url.host}:{url.port}"
        try:
            self._cluster = redis.cluster.RedisCluster(**kwargs)
        except redis.exceptions.RedisError as error:
            raise server_error(redis, error, self._name, 0, self._seed) from error
        except redis.exceptions.RedisClusterException as error:
            raise DeviceError(errno.EIO, self._name, 0, f"server {self._seed}: {error}") from error
        try:
            self._open()
        except BaseException:
            self._cluster.close()
            raise

    @classmethod
    def from_url(cls, url: SwapURL, nblocks: int, block_size: int = 4096) -> RedisClusterDevice:
        """The device a parsed ``redis+cluster://`` swap URL names (see ``devices.url``)."""
        return cls(
            url,
            nblocks,
            block_size,
            prefix=url.prefix,
            replicas=url.replicas or 0,
            timeout=url.timeout_s,
            retry=url.retry_s,
        )

    # -- topology ------------------------------------------------------------------

    def _key_slot(self, key: bytes) -> int:
        return int(self._redis.crc.key_slot(key))

    def _slot_owners(self) -> dict[str, list[int]]:
        """Master name -> the slots it serves, from the client's current slot map."""
        owners: dict[str, list[int]] = {}
        for slot, nodes in self._cluster.nodes_manager.slots_cache.items():
            if nodes:
                owners.setdefault(nodes[0].name, []).append(slot)
        return owners

    def _pool(self, slot: int) -> tuple[Any, str]:
        node = self._cluster.nodes_manager.get_node_from_slot(slot)
        return self._cluster.get_redis_connection(node).connection_pool, str(node.name)

    def _open(self) -> None:
        """Check every master and give each an identity key in one of its slots."""
        owners = self._slot_owners()
        if not owners:
            raise DeviceError(errno.EIO, self._name, 0, f"server {self._seed}: no slots served")
        keys: list[bytes] = []
        per_master: list[tuple[str, int]] = []
        for index, (master, slots) in enumerate(sorted(owners.items())):
            mine = set(slots)
            for attempt in range(100_000):
                key = b"{" + self._prefix + b"id%d}" % attempt
                slot = self._key_slot(key)
                if slot in mine:
                    break
            else:  # pragma: no cover - a master with one slot, unlucky hashing
                raise DeviceError(errno.EIO, self._name, 0, f"server {master}: no identity slot")
            keys.append(key)
            per_master.append((master, slot))
            self._vouch[np.asarray(slots, dtype=np.int64)] = index
        self._identity.keys = keys
        pieces = []
        for key, (_, slot) in zip(keys, per_master, strict=True):
            commands: list[tuple[Any, ...]] = [
                ("CONFIG", "GET", "maxmemory-policy"),
                ("INFO", "replication"),
                ("SET", key, self._identity.token),
            ]
            pieces.append((slot, commands))
        batches = []
        for slot, commands in pieces:
            pool, where = self._pool(slot)
            if self._replicas:
                commands.append(("WAIT", self._replicas, self._wait_ms))
            batches.append((pool, commands, where))
        results = exchange_each(self._redis, [(pool, commands) for pool, commands, _ in batches])
        from vmpager.devices.redis import _connected_replicas

        for (_, _, where), result in zip(batches, results, strict=True):
            if isinstance(result, Exception):
                raise server_error(self._redis, result, self._name, 0, where) from result
            check_eviction_policy(result[0], where)
            for reply in result[2:]:
                if isinstance(reply, Exception):
                    raise server_error(self._redis, reply, self._name, 0, where) from reply
            if self._replicas:
                have = _connected_replicas(result[1])
                if have < self._replicas or result[3] < self._replicas:
                    raise ValueError(
                        f"Redis cluster master {where}: replicas={self._replicas} asked, but "
                        f"{have} replica(s) are connected and {result[3]} acknowledged a write"
                    )
        self._identity.armed = True

    def _refresh(self) -> None:
        """Re-read the cluster's slot map (after MOVED, a failover or a lost master)."""
        self._cluster.nodes_manager.initialize()

    # -- the request engine -----------------------------------------------------------

    def _lost_error(self, piece: _Piece) -> DeviceError | None:
        index = int(self._vouch[piece.slot])
        gone = self._identity.lost(index) if index >= 0 else None
        if gone is None:
            return None
        return DeviceError(
            errno.EIO,
            self._name,
            piece.blk,
            f"server {gone} restarted empty: the swap data it held is lost",
        )

    def _run(self, pieces: Sequence[_Piece], *, wait: bool, partial: bool = False) -> None:
        """Run every piece's command on the master of its slot, retrying what failed.

        One exchange per attempt: commands grouped per master, all masters at
        once, a ``WAIT`` after each master's commands when ``wait``. Pieces
        that failed are tried again (topology re-read, backoff) until
        ``retry`` seconds have passed. Then ``DeviceError`` for the first
        failed piece, or, with ``partial``, each failed piece keeps its
        ``DeviceError`` in ``error`` and nothing is raised.
        """
        deadline = time.monotonic() + self._retry_s
        delay = BACKOFF_FIRST_S
        pending = list(pieces)
        while True:
            self._attempt(pending, wait=wait)
            failed = [p for p in pending if not p.done]
            if not failed:
                return
            final: list[_Piece] = []
            retry: list[_Piece] = []
            for piece in failed:
                lost = self._lost_error(piece)
                if lost is not None:
                    piece.error = lost
                    final.append(piece)
                elif piece.error is not None and not self._retryable(piece.error):
                    final.append(piece)
                else:
                    retry.append(piece)
            if retry and time.monotonic() + delay > deadline:
                final += retry
                retry = []
            for piece in final:
                if not isinstance(piece.error, DeviceError):
                    cause = piece.error if piece.error is not None else RuntimeError("failed")
                    piece.error = server_error(
                        self._redis, cause, self._name, piece.blk, piece.where or self._seed
                    )
            if final and not partial:
                first = final[0].error
                assert isinstance(first, DeviceError)
                raise first
            if not retry:
                return
            with self._stat_lock:
                self._retries += 1
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            try:
                self._refresh()
            except Exception:
                pass  # the next attempt says what is wrong
            pending = retry

    def _retryable(self, error: BaseException) -> bool:
        if isinstance(error, DeviceError):
            return error.errno == errno.EAGAIN  # replicas behind: try again
        return self._retrier.is_retryable(error)

    def _attempt(self, pieces: Sequence[_Piece], *, wait: bool) -> None:
        """One exchange: every piece's command to the master of its slot."""
        batches: dict[str, tuple[Any, list[_Piece]]] = {}
        for piece in pieces:
            piece.error = None
            try:
                pool, where = self._pool(piece.slot)
            except Exception as error:  # the slot has no master right now
                piece.error = error
                piece.where = self._seed
                continue
            piece.where = where
            batches.setdefault(where, (pool, []))[1].append(piece)
        order = list(batches.values())
        commands = []
        for _, group in order:
            cmds = [piece.command for piece in group]
            if wait:
                cmds.append(("WAIT", self._replicas, self._wait_ms))
            commands.append(cmds)
        try:
            results = exchange_each(
                self._redis, [(pool, cmds) for (pool, _), cmds in zip(order, commands, strict=True)]
            )
        except Exception as error:
            for piece in pieces:
                if piece.error is None:
                    piece.error = error
            return
        for (_, group), result in zip(order, results, strict=True):
            if isinstance(result, Exception):
                for piece in group:
                    piece.error = result
                continue
            acked = result[-1] if wait else None
            short = wait and (not isinstance(acked, int) or acked < self._replicas)
            for piece, reply in zip(group, result, strict=False):
                if isinstance(reply, Exception):
                    piece.error = reply
                elif short:
                    piece.error = DeviceError(
                        errno.EAGAIN,
                        self._name,
                        piece.blk,
                        f"server {piece.where}: {acked} of {self._replicas} replica(s) "
                        f"acknowledged the write within {self._wait_ms} ms",
                    )
                else:
                    piece.reply = reply
                    piece.done = True

    def _pieces(
        self, blk: int, nblocks: int, make: Callable[[list[bytes], int, int], tuple[Any, ...]]
    ) -> list[_Piece]:
        """Cut blocks ``blk .. blk+nblocks-1`` at group boundaries; ``make(keys, first, n)``."""
        pieces = []
        end = blk + nblocks
        first = blk
        prefix = self._prefix
        while first < end:
            group = first >> self._group_shift
            stop = min(end, (group + 1) << self._group_shift)
            tag = b"{" + prefix + str(group).encode() + b"}"
            keys = [tag + str(b).encode() for b in range(first, stop)]
            pieces.append(_Piece(self._key_slot(tag), make(keys, first, stop - first), first))
            first = stop
        return pieces

    # -- properties -------------------------------------------------------------

    @property
    def name(self) -> str:
        """``redis+cluster://seed-host:port/prefix``."""
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
        """Replicas each write waits for (beyond its master)."""
        return self._replicas

    @property
    def group_blocks(self) -> int:
        """Consecutive blocks that share one hash slot."""
        return self._group_blocks

    @property
    def retries(self) -> int:
        """Request attempts repeated after a network or cluster error since open."""
        with self._stat_lock:
            return self._retries

    def masters(self) -> list[str]:
        """``host:port`` of the masters serving slots now (from the client's slot map)."""
        return sorted(self._slot_owners())

    def slot_of(self, blk: int) -> int:
        """The hash slot block ``blk`` lives in."""
        check_int(blk, "blk", minimum=0, maximum=self._nblocks - 1)
        group = blk >> self._group_shift
        return self._key_slot(b"{" + self._prefix + str(group).encode() + b"}")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._name}: device is closed")

    # -- I/O ---------------------------------------------------------------------

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Fill ``buffers`` from the blocks at ``blk``: one MGET per group, one round trip."""
        self._check_open()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=True
        )
        pieces = self._pieces(blk, nblocks, lambda keys, _f, _n: ("MGET", *keys))
        try:
            self._run(pieces, wait=False)
            values = [value for piece in pieces for value in piece.reply]
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
        """Independent reads: one pipeline per master, every master at once.

        Each request is checked as for ``read_blocks`` before any I/O. ``run``
        is accepted for the ``SwapSpace.read_many`` interface and not needed.
        Result ``i`` is None when request ``i`` was read, else its
        ``DeviceError`` (a request on a lost master fails alone).
        """
        del run
        self._check_open()
        bs = self._block_size
        prepared = [
            (*as_byte_views(self._name, self._nblocks, bs, blk, buffers, writable=True), blk)
            for blk, buffers in requests
        ]
        owners: list[list[_Piece]] = [
            self._pieces(blk, n, lambda keys, _f, _n: ("MGET", *keys)) for _, n, blk in prepared
        ]
        self._run([p for pieces in owners for p in pieces], wait=False, partial=True)
        errors: list[DeviceError | None] = [None] * len(prepared)
        done_ops = done_blocks = 0
        for i, ((views, nblocks, blk), pieces) in enumerate(zip(prepared, owners, strict=True)):
            try:
                for piece in pieces:
                    if not piece.done:
                        assert isinstance(piece.error, DeviceError)
                        raise piece.error
                values = [value for piece in pieces for value in piece.reply]
                fill_views(self._name, blk, bs, views, values)
            except DeviceError as error:
                errors[i] = error
                self._counters.count_read_error()
                continue
            done_ops += 1
            done_blocks += nblocks
        self._counters.count_reads(done_ops, done_blocks)
        return errors

    def read_replica(self, blk: int, buffers: Sequence[WritableBuffer], replica: int) -> bool:
        """Fill ``buffers`` from the blocks at ``blk`` as replica ``replica`` of each
        block's master holds them (for the swap tiers, when a block fails its check).

        Replicas are those each master's INFO replication lists (asked afresh
        when ``replica`` is 0: the cluster's slot map may not show a new replica
        for seconds); each connection is switched to ``READONLY`` so the replica
        answers for its master's slots. False, reading nothing, when a master of
        the range has no such replica. One round trip (two with the INFO), no
        retries; a replica that does not answer is ``DeviceError``. A replica may
        lag behind a write not waited for (``replicas=0``): the caller checks
        what it gets.
        """
        self._check_open()
        replica = check_int(replica, "replica", minimum=0)
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=True
        )
        pieces = self._pieces(blk, nblocks, lambda keys, _f, _n: ("MGET", *keys))
        redis = self._redis
        batches: list[tuple[Any, list[tuple[Any, ...]]]] = []
        try:
            for piece in pieces:
                pool, where = self._pool(piece.slot)
                found = self._replica_pools.of(pool, where, refresh=replica == 0)
                if replica >= len(found):
                    return False
                batches.append((found[replica][1], [("READONLY",), piece.command]))
            values: list[Any] = []
            for result in exchange_each(redis, batches):
                if isinstance(result, Exception):
                    raise result
                for reply in result:
                    if isinstance(reply, Exception):
                        raise reply
                values.extend(result[-1])
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
            raise server_error(redis, e, self._name, blk, "replica read") from None
        fill_views(self._name, blk, self._block_size, views, values)
        return True

    def write_blocks(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Store ``buffers`` at ``blk``: one MSET per group (plus WAIT), one round trip.

        With ``replicas``, returns only when every master involved reports
        that many replicas holding the write; else (after ``retry`` seconds)
        ``DeviceError`` ``EAGAIN``.
        """
        self._check_open()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=False
        )
        bs = self._block_size
        flat = [view[o : o + bs] for view in views for o in range(0, view.nbytes, bs)]

        def mset(keys: list[bytes], first: int, n: int) -> tuple[Any, ...]:
            command: list[Any] = ["MSET"]
            for key, value in zip(keys, flat[first - blk : first - blk + n], strict=True):
                command += (key, value)
            return tuple(command)

        pieces = self._pieces(blk, nblocks, mset)
        try:
            self._run(pieces, wait=self._replicas > 0)
        except DeviceError:
            self._counters.count_write_error()
            raise
        self._counters.count_write(nblocks)

    def discard(self, blk: int, nblocks: int) -> None:
        """Delete the blocks' keys (one UNLINK per group, one round trip); they read as zeros."""
        self._check_open()
        check_range(self._name, self._nblocks, blk, check_int(nblocks, "nblocks", minimum=1))
        self._run(self._pieces(blk, nblocks, lambda keys, _f, _n: ("UNLINK", *keys)), wait=False)
        self._counters.count_discard()

    def flush(self) -> None:
        """Nothing to do: a write is in its master's memory (and replicas') once acknowledged."""
        self._check_open()
        self._counters.count_flush()

    def close(self) -> None:
        """Delete the device's keys on every master (``delete_on_close``), close the client.

        Idempotent; later requests raise ``ValueError``. Failures to delete
        are ignored: the device is closed either way.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._identity.armed = False
        try:
            if self._delete_on_close:
                pattern = b"{" + self._prefix.replace(b"*", b"\\*").replace(b"?", b"\\?") + b"*"
                for node in self._cluster.get_primaries():
                    client = self._cluster.get_redis_connection(node)
                    for keys in _scan_batches(client, pattern):
                        pipe = client.pipeline(transaction=False)
                        for key in keys:
                            pipe.unlink(key)
                        pipe.execute()
        except Exception:
            pass
        finally:
            self._cluster.close()
            self._replica_pools.close()

    def statistics(self) -> DeviceStatistics:
        """Counters since the device was opened."""
        return self._counters.snapshot(self._name, self._block_size, self._nblocks)

    def __enter__(self) -> RedisClusterDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RedisClusterDevice({self._name!r}, {self._nblocks}, block_size={self._block_size}, "
            f"replicas={self._replicas})"
        )


def _scan_batches(client: Any, pattern: bytes) -> Any:
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=_SCAN_COUNT):
        batch.append(key)
        if len(batch) >= _SCAN_COUNT:
            yield batch
            batch = []
    if batch:
        yield batch
