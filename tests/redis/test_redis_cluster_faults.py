"""A Redis Cluster losing servers under a paging VM: failover with replicas=1 loses nothing;
a master that comes back empty is reported, its pages raise DeviceError, never zeros."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from vmpager.devices.redis_cluster import RedisClusterDevice
from vmpager.errors import DeviceError
from vmpager.testing.redis import RedisClusterProcesses
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

pytestmark = pytest.mark.redis

PAGE = 4096


def _page(p: int, version: int) -> bytes:
    return (p * 1000 + version).to_bytes(8, "little") * (PAGE // 8)


def test_sigkill_a_master_mid_run_with_one_replica(redis_cluster: RedisClusterProcesses) -> None:
    npages = 768
    device = RedisClusterDevice(
        redis_cluster.url, 4096, PAGE, replicas=1, timeout=1.0, retry=30.0, group_blocks=16
    )
    config = replace(VMConfig(), io_workers=2)
    events: list[str] = []
    with VM(memory=64 * PAGE, swap=[device], config=config) as vm:
        obj = vm.allocate(npages * PAGE)
        for p in range(npages):
            obj.write(p * PAGE, _page(p, 0))
        # The master holding the pages of group 1 dies in the middle of the next pass.
        victim = device._pool(device.slot_of(16))[1]
        replicas = redis_cluster.replicas_of(victim)
        assert replicas, f"{victim} has no replica"

        def chaos() -> None:
            redis_cluster.by_address(victim).kill()
            events.append("killed")
            promoted = redis_cluster.wait_for_failover(replicas, timeout=30)
            events.append(f"promoted {promoted}")
            # The dead master comes back (empty) and rejoins as the new master's replica,
            # so writes to its slots can reach two servers again.
            redis_cluster.by_address(victim).start()
            events.append("restarted")

        killer = threading.Thread(target=chaos)
        started = time.monotonic()
        for version in (1, 2):
            for p in range(npages):
                if version == 1 and p == npages // 3:
                    killer.start()
                # Read-modify-write: page-ins and page-outs both cross the failover.
                assert obj.read(p * PAGE, 8) == _page(p, version - 1)[:8], (version, p)
                obj.write(p * PAGE, _page(p, version))
        killer.join(timeout=60)
        assert events[0] == "killed" and events[-1] == "restarted", events
        redis_cluster.wait_until_ok(expect_masters=3)
        vm.pageout(npages)
        vm.check()
        for p in range(npages):
            assert obj.read(p * PAGE, PAGE) == _page(p, 2), p
        vm.check()
        stats = vm.statistics()
        assert stats.pageout_pages > 2 * npages and stats.pagein_pages > 2 * npages
        assert device.retries > 0  # the failover was felt, and ridden out
        assert time.monotonic() - started < 120


def test_master_back_empty_before_failover_is_reported_lost(
    redis_cluster: RedisClusterProcesses,
) -> None:
    device = RedisClusterDevice(
        redis_cluster.url, 64 * 16, PAGE, timeout=1.0, retry=3.0, group_blocks=16
    )
    try:
        for group in range(64):
            device.write_blocks(group * 16, [_page(group, 1)])
        victim = device._pool(device.slot_of(0))[1]
        # Restarted at once, before the cluster notices: it keeps its slots, without data.
        redis_cluster.by_address(victim).restart()
        lost = kept = 0
        for group in range(64):
            back = bytearray(b"\xee" * PAGE)
            try:
                device.read_blocks(group * 16, [back])
            except DeviceError as error:
                assert "restarted empty" in str(error) and victim in str(error)
                assert back == b"\xee" * PAGE  # never zeros
                lost += 1
                continue
            assert back == _page(group, 1)
            kept += 1
        assert lost >= 8 and kept >= 16, (lost, kept)
    finally:
        device.close()
        redis_cluster.wait_until_ok(expect_masters=3)


@pytest.fixture(scope="module")
def cluster_without_replicas() -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses(masters=3, replicas=0)
    yield cluster
    cluster.stop()


def test_dead_master_without_replicas_fails_its_pages_only(
    cluster_without_replicas: RedisClusterProcesses,
) -> None:
    cluster = cluster_without_replicas
    device = RedisClusterDevice(cluster.url, 64 * 16, PAGE, timeout=1.0, retry=0.2, group_blocks=16)
    try:
        for group in range(64):
            device.write_blocks(group * 16, [_page(group, 3)])
        victim = device._pool(device.slot_of(0))[1]
        cluster.by_address(victim).kill()
        lost = kept = 0
        for group in range(64):
            back = bytearray(b"\xee" * PAGE)
            try:
                device.read_blocks(group * 16, [back])
            except DeviceError as error:
                assert victim in str(error), error
                assert back == b"\xee" * PAGE  # never zeros
                lost += 1
                continue
            assert back == _page(group, 3)
            kept += 1
        assert lost >= 8 and kept >= 16, (lost, kept)
        # Writes elsewhere keep working; writes to the dead master's slots fail.
        alive = next(g for g in range(64) if device._pool(device.slot_of(g * 16))[1] != victim)
        device.write_blocks(alive * 16, [_page(alive, 4)])
        with pytest.raises(DeviceError, match=victim):
            device.write_blocks(0, [_page(0, 4)])
    finally:
        device.close()
