"""RedisDevice: the conformance suite on a real redis-server and on fakeredis, round trips,
error mapping, eviction policy and cleanup."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmpager.devices.protocol import BlockDevice
from vmpager.errors import DeviceError
from vmpager.testing.devices import CONFORMANCE_CHECKS, DeviceFactory

redis = pytest.importorskip(
    "redis", reason="redis-py is not installed (pip install 'vmpager[redis]')"
)

from vmpager.devices.redis import RedisDevice  # noqa: E402

BLOCK = 4096
Check = Callable[[DeviceFactory], None]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A private redis-server on 127.0.0.1, without persistence."""

    def __init__(self, binary: str) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        self.stop()
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def client(self) -> Any:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    return binary


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(_server_binary())
    yield server
    server.stop()


@pytest.fixture
def private_redis_server() -> Iterator[RedisServer]:
    server = RedisServer(_server_binary())
    yield server
    server.stop()


def _fake_client() -> Any:
    fakeredis = pytest.importorskip("fakeredis", reason="fakeredis is not installed")
    return fakeredis.FakeRedis()


# --- conformance --------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda check: check.__name__)
def test_conformance_real_server(check: Check, redis_server: RedisServer) -> None:
    check(lambda nblocks: RedisDevice(redis_server.url, nblocks))


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda check: check.__name__)
def test_conformance_fakeredis(check: Check) -> None:
    client = _fake_client()
    check(lambda nblocks: RedisDevice(client, nblocks))


# --- round trips --------------------------------------------------------------


class _CountingClient:
    """Wraps a client and counts round trips: plain commands and pipeline executions."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.round_trips = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.inner.pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            self.round_trips += 1
            return real_execute(*a, **k)

        pipe.execute = execute
        return pipe

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return attribute(*args, **kwargs)

        return call


def test_one_round_trip_per_request() -> None:
    client = _CountingClient(_fake_client())
    with RedisDevice(client, 64) as device:
        client.round_trips = 0
        device.write_blocks(3, [bytes(5 * BLOCK), b"\x01" * (27 * BLOCK)])
        assert client.round_trips == 1
        back = [bytearray(16 * BLOCK), bytearray(16 * BLOCK)]
        device.read_blocks(3, back)
        assert client.round_trips == 2
        assert back[1][-BLOCK:] == b"\x01" * BLOCK
        device.discard(0, 64)
        assert client.round_trips == 3


def test_fresh_device_ignores_old_keys_and_cleans_up_at_close() -> None:
    client = _fake_client()
    client.set(b"old:0", b"\x07" * BLOCK)
    with RedisDevice(client, 4, prefix="old:", delete_on_close=False) as reused:
        back = bytearray(BLOCK)
        reused.read_blocks(0, [back])
        assert back == b"\x07" * BLOCK  # an explicit prefix reuses keys on purpose
    device = RedisDevice(client, 4)
    assert device.prefix.startswith("vmpager:")
    back = bytearray(b"\xff" * BLOCK)
    device.read_blocks(0, [back])
    assert back == bytes(BLOCK)
    device.write_blocks(0, [b"a" * 4 * BLOCK])
    assert len(client.keys(device.prefix + "*")) == 4
    device.close()
    assert client.keys(device.prefix + "*") == []
    assert client.get(b"old:0") is not None


def test_glob_characters_in_prefix_are_escaped_at_close() -> None:
    client = _fake_client()
    client.set(b"swapXother", b"keep")
    with RedisDevice(client, 2, prefix="swap?") as device:
        device.write_blocks(0, [bytes(2 * BLOCK)])
    assert client.get(b"swapXother") == b"keep"
    assert client.keys("swap[?]*") == []


def test_wrong_sized_value_is_a_device_error() -> None:
    client = _fake_client()
    device = RedisDevice(client, 4, prefix="t:")
    client.set(b"t:2", b"short")
    with pytest.raises(DeviceError, match="block 2 holds 5 bytes") as caught:
        device.read_blocks(1, [bytearray(2 * BLOCK)])
    assert caught.value.errno == errno.EIO
    assert device.statistics().read_errors == 1
    device.close()


# --- errors from a real server --------------------------------------------------


@pytest.mark.redis
def test_out_of_memory_is_transient_enomem(private_redis_server: RedisServer) -> None:
    admin = private_redis_server.client()
    device = RedisDevice(private_redis_server.url, 4096)
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 256 * 1024)
    try:
        with pytest.raises(DeviceError) as caught:
            for blk in range(0, 4096, 32):
                device.write_blocks(blk, [bytes(32 * BLOCK)])
        assert caught.value.errno == errno.ENOMEM and caught.value.transient
        assert device.statistics().write_errors == 1
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        device.close()


@pytest.mark.redis
def test_lost_server_is_a_hard_error(private_redis_server: RedisServer) -> None:
    device = RedisDevice(private_redis_server.url, 8, retry=0.2)
    device.write_blocks(0, [bytes(BLOCK)])
    private_redis_server.stop()
    with pytest.raises(DeviceError) as caught:
        device.read_blocks(0, [bytearray(BLOCK)])
    assert caught.value.errno == errno.EIO and not caught.value.transient
    assert "ConnectionError" in str(caught.value)
    with pytest.raises(DeviceError):
        device.write_blocks(0, [bytes(BLOCK)])
    stats = device.statistics()
    assert (stats.read_errors, stats.write_errors) == (1, 1)
    device.close()  # cannot delete the keys: still closes
    with pytest.raises(ValueError, match="closed"):
        device.flush()


@pytest.mark.redis
def test_evicting_server_is_refused(private_redis_server: RedisServer) -> None:
    admin = private_redis_server.client()
    admin.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(ValueError, match="maxmemory-policy is 'allkeys-lru'"):
            RedisDevice(private_redis_server.url, 8)
        admin.config_set("maxmemory-policy", "volatile-lru")
        RedisDevice(private_redis_server.url, 8).close()
    finally:
        admin.close()


@pytest.mark.redis
def test_name_and_arguments(redis_server: RedisServer) -> None:
    device = RedisDevice(redis_server.url.replace("/0", "/3"), 8, prefix="p:")
    assert device.name == f"redis://127.0.0.1:{redis_server.port}/3/p:"
    device.close()
    with pytest.raises(DeviceError, match="ConnectionError") as caught:
        RedisDevice(f"redis://127.0.0.1:{_free_port()}/0", 8)
    assert caught.value.errno == errno.EIO
    with pytest.raises(ValueError, match="prefix must be a non-empty string"):
        RedisDevice(_fake_client(), 8, prefix="")
    with pytest.raises(ValueError, match=r"nblocks must be in \[1"):
        RedisDevice(_fake_client(), 0)


def test_missing_redis_package_has_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install 'vmpager\[redis\]'"):
        RedisDevice("redis://127.0.0.1:1/0", 8)


def test_is_a_block_device() -> None:
    device: BlockDevice = RedisDevice(_fake_client(), 8)
    assert isinstance(device, BlockDevice)
    device.close()
