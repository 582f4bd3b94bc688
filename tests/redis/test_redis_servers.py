"""Swap on real standalone redis-servers: URLs in the VM, open-time checks, replication with
WAIT, timeouts, reconnection, a server that restarts empty, and a dead server among two."""

from __future__ import annotations

import errno
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpager.devices.by_url import open_swap_url
from vmpager.devices.redis import RedisDevice
from vmpager.errors import DeviceError, SwapExhausted
from vmpager.io.fanout import Fanout
from vmpager.testing.redis import RedisServer, free_port, make_tls_files
from vmpager.vm.config import VMConfig, WriteErrorPolicy
from vmpager.vm.system import VM

pytestmark = pytest.mark.redis

PAGE = 4096


def _page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE // 8)


def _keys(server: RedisServer, prefix: str) -> int:
    client = server.client()
    try:
        return len(client.keys(prefix + "*"))
    finally:
        client.close()


@pytest.fixture
def replica_of_private(private_server: RedisServer) -> Iterator[RedisServer]:
    replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(private_server.port)])
    client = replica.client()
    try:
        for _ in range(500):
            if client.info("replication").get("master_link_status") == "up":
                break
            time.sleep(0.02)
    finally:
        client.close()
    yield replica
    replica.stop()


def test_vm_pages_to_two_servers_striped(
    private_server: RedisServer, second_server: RedisServer
) -> None:
    urls = [
        f"{s.url}?size=4M&prefix=stripe{i}:" for i, s in enumerate((private_server, second_server))
    ]
    with VM(memory="256K", swap=urls, layout="stripe") as vm:
        assert [d.name for d in vm.swapinfo()] == [
            f"redis://127.0.0.1:{private_server.port}/0/stripe0:",
            f"redis://127.0.0.1:{second_server.port}/0/stripe1:",
        ]
        obj = vm.allocate(2 << 20)
        for p in range(obj.npages):
            obj.write(p * PAGE, _page(p))
        vm.check()
        # Both servers hold pages: the stripe layout spreads them.
        assert _keys(private_server, "stripe0:") > 16 and _keys(second_server, "stripe1:") > 16
        for p in range(obj.npages):
            assert obj.read(p * PAGE, PAGE) == _page(p), p
        vm.check()
    assert _keys(private_server, "stripe0:") == 0  # the device's keys go at close


def test_swapon_by_url_while_running(redis_server: RedisServer) -> None:
    with VM(memory="64K", swap=[]) as vm:
        vm.swapon(f"{redis_server.url}?size=1M")
        obj = vm.allocate(512 << 10)
        obj.write(0, b"x" * (512 << 10))
        assert obj.read(100_000, 3) == b"xxx"
        assert vm.swapinfo()[0].used > 0


def test_unreachable_server_is_named_at_open() -> None:
    port = free_port()
    with pytest.raises(DeviceError, match=f"server 127.0.0.1:{port}: ConnectionError") as caught:
        VM(memory="1M", swap=[f"redis://127.0.0.1:{port}/0?size=1M&timeout=1"])
    assert caught.value.errno == errno.EIO


def test_wrong_password_is_named_at_open() -> None:
    server = RedisServer(password="right")
    try:
        for url in (
            f"redis://:wrong@127.0.0.1:{server.port}/0?size=1M",
            f"redis://127.0.0.1:{server.port}/0?size=1M",
        ):
            with pytest.raises(DeviceError, match=f"server 127.0.0.1:{server.port}") as caught:
                open_swap_url(url, PAGE)
            assert caught.value.errno == errno.EACCES
            assert "wrong" not in str(caught.value)
        device = open_swap_url(f"redis://:right@127.0.0.1:{server.port}/0?size=1M", PAGE)
        device.write_blocks(0, [_page(1)])
        device.close()
    finally:
        server.stop()


def test_evicting_server_is_refused_naming_it(private_server: RedisServer) -> None:
    admin = private_server.client()
    admin.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(ValueError, match=rf"127.0.0.1:{private_server.port}: maxmemory-policy"):
            VM(memory="1M", swap=[f"{private_server.url}?size=1M"])
    finally:
        admin.close()


def test_replicas_need_connected_replicas(private_server: RedisServer) -> None:
    with pytest.raises(ValueError, match=r"replicas=1 asked, but 0 replica\(s\) are connected"):
        open_swap_url(f"{private_server.url}?size=1M&timeout=1", PAGE, replicas=1)


def test_writes_wait_for_the_replica(
    private_server: RedisServer, replica_of_private: RedisServer
) -> None:
    device = open_swap_url(f"{private_server.url}?size=1M&replicas=1&timeout=1&retry=0.5", PAGE)
    assert isinstance(device, RedisDevice) and device.replicas == 1
    try:
        device.write_blocks(0, [_page(7) * 4])
        # Acknowledged means on the replica too.
        client = replica_of_private.client()
        assert client.get(device.prefix + "3") == _page(7)
        client.close()
        replica_of_private.kill()
        with pytest.raises(DeviceError) as caught:
            device.write_blocks(0, [_page(8)])
        assert caught.value.errno == errno.EAGAIN and caught.value.transient
        assert "0 of 1 replica(s) acknowledged" in str(caught.value)
    finally:
        device.close()


def test_timeout_is_transient_and_named(private_server: RedisServer) -> None:
    device = open_swap_url(f"{private_server.url}?size=1M&timeout=0.2&retry=0.3", PAGE)
    assert private_server.process is not None
    try:
        device.write_blocks(0, [_page(1)])
        private_server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(DeviceError) as caught:
                device.read_blocks(0, [bytearray(PAGE)])
            assert caught.value.errno == errno.EAGAIN
            assert f"127.0.0.1:{private_server.port}" in str(caught.value)
        finally:
            private_server.process.send_signal(signal.SIGCONT)
        back = bytearray(PAGE)
        device.read_blocks(0, [back])  # reconnects
        assert back == _page(1)
    finally:
        device.close()


def test_dropped_connections_reconnect(private_server: RedisServer) -> None:
    device = open_swap_url(f"{private_server.url}?size=1M", PAGE)
    assert isinstance(device, RedisDevice)
    try:
        device.write_blocks(0, [_page(1)])
        admin = private_server.client()
        admin.client_kill_filter(_type="normal", skipme=True)
        admin.close()
        back = bytearray(PAGE)
        device.read_blocks(0, [back])
        assert back == _page(1)
        assert device.statistics().read_errors == 0
    finally:
        device.close()


def test_server_restarted_empty_is_reported_lost_never_zeros(private_server: RedisServer) -> None:
    device = open_swap_url(f"{private_server.url}?size=1M&timeout=1&retry=1", PAGE)
    try:
        device.write_blocks(0, [_page(5) * 2])
        private_server.restart()  # no persistence: comes back empty
        back = bytearray(b"\xee" * PAGE)
        for _ in range(2):  # reported on every later request too
            with pytest.raises(DeviceError, match="restarted empty") as caught:
                device.read_blocks(1, [back])
            assert caught.value.errno == errno.EIO
            assert f"127.0.0.1:{private_server.port}" in str(caught.value)
        assert back == b"\xee" * PAGE
        with pytest.raises(DeviceError, match="restarted empty"):
            device.write_blocks(0, [_page(6)])
    finally:
        device.close()


def test_dead_server_fails_its_pages_only(
    private_server: RedisServer, second_server: RedisServer
) -> None:
    urls = [f"{s.url}?size=2M&timeout=0.5&retry=0" for s in (private_server, second_server)]
    config = VMConfig(daemon_thread=False)
    with VM(memory="128K", swap=urls, layout="stripe", config=config) as vm:
        obj = vm.allocate(1 << 20)
        for p in range(obj.npages):
            obj.write(p * PAGE, _page(p + 1))
        vm.pageout(obj.npages)
        private_server.kill()
        failed = ok = 0
        for p in range(obj.npages):
            try:
                data = obj.read(p * PAGE, PAGE)
            except DeviceError as error:
                assert f"127.0.0.1:{private_server.port}" in str(error)
                failed += 1
                continue
            assert data == _page(p + 1), p  # never zeros
            ok += 1
        assert failed > 0 and ok > obj.npages // 4


def test_read_many_is_one_pipeline(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmpager.devices import _redis_wire

    device = open_swap_url(f"{redis_server.url}?size=1M", PAGE)
    calls = []
    real = _redis_wire.exchange_each

    def counting(redis: object, batches: list[object]) -> object:
        calls.append(len(batches))
        return real(redis, batches)  # type: ignore[arg-type]

    monkeypatch.setattr(_redis_wire, "exchange_each", counting)
    fanout = Fanout(2)
    try:
        for blk in range(0, 64, 8):
            device.write_blocks(blk, [b"".join(_page(b) for b in range(blk, blk + 8))])
        calls.clear()
        buffers = [bytearray(PAGE * 3) for _ in range(10)]
        requests = [(blk, [buf]) for blk, buf in zip(range(1, 60, 6), buffers, strict=True)]
        errors = device.read_many(requests, fanout.run)  # type: ignore[attr-defined]
        assert errors == [None] * 10 and calls == [1]
        for (blk, _), buf in zip(requests, buffers, strict=True):
            assert bytes(buf) == b"".join(_page(b) for b in range(blk, blk + 3))
        stats = device.statistics()
        assert (stats.read_ops, stats.blocks_read) == (10, 30)
    finally:
        fanout.close()
        device.close()


def test_unwritten_blocks_are_zero_and_size_is_checked(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="smaller than one block"):
        open_swap_url(f"{redis_server.url}?size=100", PAGE)
    device = open_swap_url(f"{redis_server.url}?size=64K", PAGE)
    assert device.nblocks == 16
    back = bytearray(b"\x01" * PAGE)
    device.read_blocks(15, [back])
    assert back == bytes(PAGE)
    device.close()


def test_tls_server_by_rediss_url(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    server = RedisServer(tls=files)
    try:
        with VM(memory="64K", swap=[f"{server.url}?size=1M&ca={files['ca']}"]) as vm:
            assert vm.swapinfo()[0].name.startswith(f"rediss://127.0.0.1:{server.port}/0/")
            obj = vm.allocate(512 << 10)
            for p in range(obj.npages):
                obj.write(p * PAGE, _page(p))
            assert vm.statistics().pageout_pages > 0
            for p in range(obj.npages):
                assert obj.read(p * PAGE, PAGE) == _page(p)
        # Without the CA the server's certificate is not trusted: named, at open.
        with pytest.raises(DeviceError, match=f"server 127.0.0.1:{server.port}"):
            open_swap_url(f"{server.url}?size=1M&timeout=2", PAGE)
    finally:
        server.stop()


def test_network_errors_go_through_the_write_error_policy(
    private_server: RedisServer, second_server: RedisServer
) -> None:
    urls = [f"{s.url}?size=2M&timeout=0.5&retry=0" for s in (private_server, second_server)]
    config = VMConfig(daemon_thread=False, write_error_policy=WriteErrorPolicy.SEED)
    with VM(memory="128K", swap=urls, config=config) as vm:
        obj = vm.allocate(1 << 20)
        model = {}
        for p in range(obj.npages):
            obj.write(p * PAGE, _page(p + 1))
            model[p] = _page(p + 1)
        second_server.kill()
        # Whole pages rewritten: pageouts that meet the dead server fail (EIO, like
        # a disk's) and the policy marks their blocks bad; the pages stay dirty.
        # (The VM may then report SwapExhausted, as it does for a disk failing
        # every write; what was written stays readable either way.)
        try:
            for version in (2, 3):
                for p in range(obj.npages):
                    obj.write(p * PAGE, _page(p * version + 7))
                    model[p] = _page(p * version + 7)
        except SwapExhausted:
            pass
        stats = vm.statistics()
        assert stats.write_errors > 0 and stats.bad_blocks_marked > 0
        vm.check()
        for p in range(obj.npages):
            try:
                data = obj.read(p * PAGE, PAGE)
            except DeviceError as error:  # its only copy was on the dead server
                assert f"127.0.0.1:{second_server.port}" in str(error)
                continue
            assert data == model[p], p
        vm.check()
