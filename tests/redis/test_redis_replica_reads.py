"""A swap page that fails its check on the Redis server is read from a replica.

Real redis-server processes: a master with one replica (``replicas=1``: every
write waits until the replica has it) and the session's 3-master + 3-replica
cluster. The master's value is damaged with replication switched off for that
one write (a Lua script calling ``redis.set_repl(redis.REPL_NONE)``), so the
replica keeps the good copy, as after a bit flip in the master's memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from vmpager import VM
from vmpager.devices.redis import RedisDevice
from vmpager.devices.redis_cluster import RedisClusterDevice
from vmpager.errors import CorruptPage
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.testing.redis import RedisClusterProcesses, RedisServer
from vmpager.vm.config import VMConfig

pytestmark = pytest.mark.redis

PAGE = 4096
CONFIG = VMConfig(daemon_thread=False, cluster_max_npages=8, readaround_npages=4)
TIERS: dict[str, dict[str, Any]] = {
    "integrity": {},
    "encrypt": {"encrypt": True},
    "lz4+encrypt": {"compress": "lz4", "compress_pool": 16 * PAGE, "encrypt": True},
}
# Damage a value on one server only: the write is not sent to its replicas.
_CORRUPT_HERE = (
    "redis.set_repl(redis.REPL_NONE); "
    "local v = redis.call('GET', KEYS[1]); "
    "local b = string.byte(v, 2001); "
    "redis.call('SET', KEYS[1], string.sub(v, 1, 2000) .. string.char((b + 1) % 256) "
    ".. string.sub(v, 2002)); return 1"
)


def page_bytes(n: int) -> bytes:
    """Random (incompressible) content, its first word the page number."""
    body = np.random.default_rng(n).integers(0, 256, size=PAGE, dtype=np.uint8).tobytes()
    return n.to_bytes(8, "little") + body[8:]


@pytest.fixture(scope="module")
def master_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    master = RedisServer()
    replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(master.port)])
    client = replica.client()
    deadline = time.monotonic() + 30
    try:
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not link to its master")
            time.sleep(0.05)
    finally:
        client.close()
    yield master, replica
    replica.stop()
    master.stop()


def _swap_out(vm: VM, npages: int) -> Any:
    obj = vm.allocate(npages * PAGE)
    for p in range(npages):
        obj.write(p * PAGE, page_bytes(p))
    vm.pageout(npages)
    return obj


def _device_block(vm: VM, obj: Any, pindex: int) -> int:
    assert pindex not in obj.pages
    blk = vm.swap_pager.block_of(obj, pindex)
    assert blk != SWAPBLK_NONE
    return int(vm.space.locate(blk)[1])


@pytest.mark.parametrize("name", list(TIERS))
def test_a_page_corrupt_on_the_master_is_read_from_its_replica(
    master_and_replica: tuple[RedisServer, RedisServer], name: str
) -> None:
    master, replica = master_and_replica
    device = RedisDevice(master.url, 1024, name="redis", replicas=1)
    with VM(memory=24 * PAGE, swap=[device], config=CONFIG, **TIERS[name]) as vm:
        obj = _swap_out(vm, 128)
        victims = [9, 50, 51, 100]
        keys = [device._keys(_device_block(vm, obj, p), 1)[0] for p in victims]
        on_master, on_replica = master.client(), replica.client()
        try:
            for key in keys:
                good = on_replica.get(key)
                assert on_master.eval(_CORRUPT_HERE, 1, key) == 1
                assert on_master.get(key) != good and on_replica.get(key) == good
        finally:
            on_master.close()
            on_replica.close()
        # The per-access path, then the batched one (read_many).
        assert obj.read(9 * PAGE, PAGE) == page_bytes(9)
        got = obj.read_words(np.array([50, 51, 100], dtype=np.int64) * PAGE)
        assert got.tolist() == [50, 51, 100]
        for p in range(128):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p), p
        stats = vm.tier_statistics()
        assert stats.replica_ok >= len(victims) and stats.corrupt_pages == 0
        assert not vm.scrub().corrupt
        vm.check()


def test_corrupt_on_the_master_and_the_replica_raises_corrupt_page(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = master_and_replica
    device = RedisDevice(master.url, 1024, name="redis", replicas=1)
    with VM(memory=24 * PAGE, swap=[device], config=CONFIG) as vm:
        obj = _swap_out(vm, 64)
        dblk = _device_block(vm, obj, 20)
        key = device._keys(dblk, 1)[0]
        on_master, on_replica = master.client(), replica.client()
        try:
            on_replica.config_set("replica-read-only", "no")
            for client in (on_master, on_replica):
                assert client.eval(_CORRUPT_HERE, 1, key) == 1
            on_replica.config_set("replica-read-only", "yes")
        finally:
            on_master.close()
            on_replica.close()
        with pytest.raises(CorruptPage) as info:
            obj.read(20 * PAGE, 8)
        assert (info.value.device, info.value.block) == ("redis", dblk)
        assert (info.value.object_id, info.value.offset) == (obj.oid, 20 * PAGE)
        assert vm.tier_statistics().replica_ok == 0
        vm.check()


def test_without_a_replica_a_corrupt_page_raises(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    standalone = RedisServer()
    try:
        device = RedisDevice(standalone.url, 1024, name="redis")
        with VM(memory=24 * PAGE, swap=[device], config=CONFIG) as vm:
            obj = _swap_out(vm, 64)
            key = device._keys(_device_block(vm, obj, 7), 1)[0]
            client = standalone.client()
            assert client.eval(_CORRUPT_HERE, 1, key) == 1
            client.close()
            with pytest.raises(CorruptPage):
                obj.read(7 * PAGE, 8)
            assert device.read_replica(0, [bytearray(PAGE)], 0) is False
    finally:
        standalone.stop()


@pytest.mark.parametrize("name", ["integrity", "encrypt"])
def test_a_page_corrupt_on_a_cluster_master_is_read_from_its_replica(
    redis_cluster: RedisClusterProcesses, name: str
) -> None:
    import redis

    device = RedisClusterDevice(redis_cluster.url, 1024, PAGE, replicas=1, group_blocks=4)
    with VM(memory=24 * PAGE, swap=[device], config=CONFIG, **TIERS[name]) as vm:
        obj = _swap_out(vm, 96)
        victims = [3, 40, 41, 90]
        for p in victims:
            dblk = _device_block(vm, obj, p)
            piece = device._pieces(dblk, 1, lambda keys, _f, _n: ("MGET", *keys))[0]
            key, slot = piece.command[1], device.slot_of(dblk)
            master = device._cluster.nodes_manager.get_node_from_slot(slot)
            client = redis.Redis(host=master.host, port=master.port)
            assert client.eval(_CORRUPT_HERE, 1, key) == 1
            client.close()
        assert obj.read(3 * PAGE, PAGE) == page_bytes(3)
        got = obj.read_words(np.array([40, 41, 90], dtype=np.int64) * PAGE)
        assert got.tolist() == [40, 41, 90]
        for p in range(96):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p), p
        stats = vm.tier_statistics()
        assert stats.replica_ok >= len(victims) and stats.corrupt_pages == 0
        vm.check()
