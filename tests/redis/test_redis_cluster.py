"""The Redis Cluster swap device on a real 3-master + 3-replica cluster: conformance, spread,
round trips, batched page-ins, the VM model, and the open-time checks."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from vmpager.devices import _redis_wire
from vmpager.devices.by_url import open_swap_url
from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.redis_cluster import RedisClusterDevice
from vmpager.io.fanout import Fanout
from vmpager.swap.space import SwapSpace
from vmpager.testing.devices import CONFORMANCE_CHECKS, DeviceFactory
from vmpager.testing.redis import RedisClusterProcesses

pytestmark = pytest.mark.redis

PAGE = 4096
Check = Callable[[DeviceFactory], None]


def _page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE // 8)


def _device(cluster: RedisClusterProcesses, nblocks: int, **params: str) -> RedisClusterDevice:
    query = "&".join(f"{k}={v}" for k, v in {"size": str(nblocks * PAGE), **params}.items())
    device = open_swap_url(f"{cluster.url}?{query}", PAGE)
    assert isinstance(device, RedisClusterDevice)
    return device


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts exchanges (round trips) and the servers each one talks to."""
    calls: list[int] = []
    real = _redis_wire.exchange_each

    def counting(redis: Any, batches: Any) -> Any:
        calls.append(len(batches))
        return real(redis, batches)

    monkeypatch.setattr("vmpager.devices.redis_cluster.exchange_each", counting)
    return calls


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda check: check.__name__)
def test_conformance(check: Check, redis_cluster: RedisClusterProcesses) -> None:
    check(lambda nblocks: _device(redis_cluster, nblocks))


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda check: check.__name__)
def test_conformance_small_groups_and_replicas(
    check: Check, redis_cluster: RedisClusterProcesses
) -> None:
    # Groups of 4 blocks: most requests straddle several slots and masters.
    check(
        lambda nblocks: RedisClusterDevice(
            redis_cluster.url, nblocks, PAGE, group_blocks=4, replicas=1
        )
    )


def test_blocks_spread_over_every_master(redis_cluster: RedisClusterProcesses) -> None:
    with _device(redis_cluster, 64 * 256) as device:
        for group in range(64):
            device.write_blocks(group * 256, [_page(group)])
        per_master: dict[str, int] = {}
        for address in device.masters():
            client = redis_cluster.by_address(address).client()
            per_master[address] = len(client.keys("{" + device.prefix + "[0-9]*"))
            client.close()
        assert len(per_master) == 3
        # 64 groups hashed over 3 masters: every master holds a fair share.
        assert all(count >= 5 for count in per_master.values()), per_master
        assert sum(per_master.values()) == 64


def test_a_run_in_one_group_is_one_slot_and_one_round_trip(
    redis_cluster: RedisClusterProcesses, exchanges: list[int]
) -> None:
    with _device(redis_cluster, 1024) as device:
        assert device.group_blocks == 256
        assert len({device.slot_of(b) for b in range(256, 512)}) == 1
        exchanges.clear()
        run = b"".join(_page(b) for b in range(300, 364))
        device.write_blocks(300, [run])  # a 64-page pageout run
        assert exchanges == [1]  # one round trip, to one master
        back = bytearray(len(run))
        device.read_blocks(300, [back])
        assert bytes(back) == run and exchanges == [1, 1]
        exchanges.clear()
        device.write_blocks(240, [run])  # straddles two groups: still one round trip
        assert len(exchanges) == 1 and exchanges[0] in (1, 2)


def test_batched_page_ins_are_one_pipeline_per_master(
    redis_cluster: RedisClusterProcesses, exchanges: list[int]
) -> None:
    fanout = Fanout(2)
    with RedisClusterDevice(redis_cluster.url, 32 * 64, PAGE, group_blocks=64) as device:
        for group in range(32):
            device.write_blocks(group * 64, [_page(group) * 64])
        masters = {device._pool(device.slot_of(g * 64))[1] for g in range(32)}
        exchanges.clear()
        buffers = [bytearray(2 * PAGE) for _ in range(32)]
        requests = [(g * 64 + 5, [buf]) for g, buf in enumerate(buffers)]
        # Through the swap space, as the pager's batched page-ins go.
        space = SwapSpace()
        space.swapon(device)
        errors = space.read_many(requests, fanout.run)  # type: ignore[arg-type]
        assert errors == [None] * 32
        assert exchanges == [len(masters)] and len(masters) == 3
        for g, buf in enumerate(buffers):
            assert bytes(buf) == _page(g) * 2
        stats = device.statistics()
        assert (stats.read_ops, stats.blocks_read) == (32, 64)
    fanout.close()


def test_open_checks_every_master(redis_cluster: RedisClusterProcesses) -> None:
    with pytest.raises(ValueError, match=r"replicas=2 asked, but 1 replica\(s\) are connected"):
        _device(redis_cluster, 16, replicas="2", timeout="1")
    address = redis_cluster.masters()[1]
    client = redis_cluster.by_address(address).client()
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(ValueError, match=f"{address}: maxmemory-policy is 'allkeys-lru'"):
            _device(redis_cluster, 16)
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


def test_keys_are_deleted_at_close(redis_cluster: RedisClusterProcesses) -> None:
    device = _device(redis_cluster, 4096)
    for group in range(16):
        device.write_blocks(group * 256, [_page(group) * 3])
    prefix = device.prefix
    device.close()
    for address in redis_cluster.masters():
        client = redis_cluster.by_address(address).client()
        assert client.keys("{" + prefix + "*") == []
        client.close()


# --- the VM model on cluster devices ---------------------------------------------


def _load_vm_model() -> Any:
    path = Path(__file__).parents[1] / "vm" / "test_vm_model.py"
    spec = importlib.util.spec_from_file_location("_vm_model_for_cluster", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VMModel


_VMModel = _load_vm_model()
_CLUSTER: list[RedisClusterProcesses] = []


class ClusterVMModel(_VMModel):  # type: ignore[misc,valid-type]
    """The VM model with its two swap devices on the cluster (groups of 4 blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.vm.close()
        cluster = _CLUSTER[0]
        devices = [
            FaultyDevice(
                RedisClusterDevice(cluster.url, n, PAGE, group_blocks=4, name=f"cluster{i}"),
                seed=i,
            )
            for i, n in enumerate((24, 16))
        ]
        from dataclasses import replace

        from vmpager.vm.config import VMConfig
        from vmpager.vm.system import VM

        config = replace(
            VMConfig(),
            daemon_thread=False,
            cluster_max_npages=4,
            readaround_npages=2,
            sequential_readahead=False,
            pageout_batching=False,
            swap_free_batch_nblocks=1,
        )
        self.vm = VM(memory=6 * PAGE, swap=devices, config=config)
        self.devices = devices


ClusterVMModel.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_vm_model_on_the_cluster(redis_cluster: RedisClusterProcesses) -> None:
    _CLUSTER[:] = [redis_cluster]
    ClusterVMModel.TestCase().runTest()
