"""Swap tiers in a whole VM: real O_DIRECT swap files, RAM and Redis devices.

Corruption is injected where it happens in life (bytes flipped in the swap
file on disk under a running VM, in a RAM device, in a Redis value); reads
must raise ``CorruptPage`` naming the device, block, object and offset, and
never return the damaged data.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vmpager import VM
from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import CorruptPage
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject

PAGE = 4096
CONFIG = VMConfig(daemon_thread=False, cluster_max_npages=8, readaround_npages=4)
MARKER = b"<<vmpager-plaintext-marker-7f3a>>"

TIERS: dict[str, dict[str, Any]] = {
    "integrity": {},
    "encrypt": {"encrypt": True},
    "lz4": {"compress": "lz4", "compress_pool": 16 * PAGE},
    "zstd+encrypt": {"compress": "zstd", "compress_pool": 16 * PAGE, "encrypt": True},
    "lz4-no-integrity": {"compress": "lz4", "compress_pool": 16 * PAGE, "integrity": False},
}


def page_bytes(n: int, *, compressible: bool = True) -> bytes:
    """Page ``n``'s content: its number, then bytes lz4 halves (or random ones)."""
    rng = np.random.default_rng(n)
    body = rng.integers(0, 256, size=1800 if compressible else PAGE, dtype=np.uint8).tobytes()
    return (n.to_bytes(8, "little") + body + bytes(PAGE))[:PAGE]


def swapped_block(vm: VM, obj: VMObject, pindex: int) -> tuple[Any, int]:
    """(device, device block) of a page that is out on a device, not resident."""
    assert pindex not in obj.pages, "the page is still resident"
    blk = vm.swap_pager.block_of(obj, pindex)
    assert blk != SWAPBLK_NONE
    return vm.space.locate(blk)


def fill(vm: VM, obj: VMObject, *, compressible: bool = True) -> None:
    for p in range(obj.npages):
        obj.write(p * PAGE, page_bytes(p, compressible=compressible))
    vm.pageout(obj.npages)


def test_bytes_flipped_in_an_o_direct_swap_file_raise_corrupt_page(tmp_path: Path) -> None:
    path = tmp_path / "swap"
    with VM(memory=8 * PAGE, swap=[f"{path}:1M"], config=CONFIG) as vm:
        device = vm.space.devices()[0][1]
        assert "direct" in repr(device)
        obj = vm.allocate(64 * PAGE)
        fill(vm, obj, compressible=False)
        dev, dblk = swapped_block(vm, obj, 20)
        # Another process's view: ordinary buffered I/O on the same file.
        with open(path, "r+b") as raw:
            raw.seek(dblk * PAGE + 1234)
            byte = raw.read(1)
            raw.seek(dblk * PAGE + 1234)
            raw.write(bytes([byte[0] ^ 0x10]))
            raw.flush()
            os.fsync(raw.fileno())
        with pytest.raises(CorruptPage) as info:
            obj.read(20 * PAGE, PAGE)
        err = info.value
        assert (err.device, err.block) == (dev.name, dblk)
        assert (err.object_id, err.offset) == (obj.oid, 20 * PAGE)
        assert str(dblk) in str(err) and f"object {obj.oid} offset {20 * PAGE}" in str(err)
        for p in (19, 21, 63):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p, compressible=False)
        with pytest.raises(CorruptPage):  # still: never the damaged data
            obj.read(20 * PAGE + 8, 8)
        obj.write(20 * PAGE, page_bytes(99))  # a whole new page: the bad block goes
        assert obj.read(20 * PAGE, PAGE) == page_bytes(99)
        stats = vm.statistics()
        assert stats.swap_bad_blocks == 1 and stats.read_errors >= 1
        vm.check()


@pytest.mark.parametrize("name", ["integrity", "encrypt", "lz4", "zstd+encrypt"])
def test_a_corrupt_ram_device_page_on_every_path(name: str) -> None:
    device = FaultyDevice(MemoryDevice(512, PAGE, name="ram"))
    with VM(memory=24 * PAGE, swap=[device], config=CONFIG, **TIERS[name]) as vm:
        obj = vm.allocate(128 * PAGE)
        fill(vm, obj, compressible=False)  # rejects: on the device even with a pool
        victims = [5, 40, 77]
        for p in victims:
            _, dblk = swapped_block(vm, obj, p)
            device.corrupt_stored([dblk], offset=p)
        # The per-access path.
        with pytest.raises(CorruptPage) as info:
            obj.read(5 * PAGE, 16)
        assert (info.value.object_id, info.value.offset) == (obj.oid, 5 * PAGE)
        # The batched path.
        with pytest.raises(CorruptPage) as info:
            obj.read_words(np.array([0, 40 * PAGE, 41 * PAGE], dtype=np.int64))
        assert (info.value.object_id, info.value.offset) == (obj.oid, 40 * PAGE)
        # The strategy path.
        buffer = bytearray(PAGE)
        with pytest.raises(CorruptPage):
            obj.strategy_read(77 * PAGE, buffer)
        assert buffer != page_bytes(77, compressible=False)
        # Everything else is intact.
        for p in range(128):
            if p not in victims:
                assert obj.read(p * PAGE, PAGE) == page_bytes(p, compressible=False), p
        vm.check()


#: Each tier alone, then together (the matrix the issue's "done when" names).
MATRIX: dict[str, dict[str, Any]] = {
    "none": {"integrity": False},
    "checksums alone": {},
    "encryption alone": {"encrypt": True, "integrity": False},
    "pool alone": {"compress": "lz4", "compress_pool": 16 * PAGE, "integrity": False},
    "pool+checksums": {"compress": "lz4", "compress_pool": 16 * PAGE},
    "all three": {"compress": "zstd", "compress_pool": 16 * PAGE, "encrypt": True},
}


def _swap_device(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A swap device of ``kind``: an O_DIRECT file, RAM, or a real redis-server."""
    if kind == "file":
        return f"{tmp_path / 'swap'}:8M"
    if kind == "ram":
        return MemoryDevice(2048, PAGE, name="ram")
    from vmpager.devices.redis import RedisDevice

    url = request.getfixturevalue("redis_url")
    return RedisDevice(url, 2048, name="redis")


@pytest.mark.parametrize("kind", ["file", "ram", pytest.param("redis", marks=pytest.mark.redis)])
@pytest.mark.parametrize("name", list(MATRIX))
def test_every_path_round_trips_through_the_tiers(
    name: str, kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    device = _swap_device(kind, tmp_path, request)
    with VM(memory=32 * PAGE, swap=[device], config=CONFIG, **MATRIX[name]) as vm:
        if kind == "file":
            assert "direct" in repr(vm.space.devices()[0][1])
        obj = vm.allocate(200 * PAGE)
        model = bytearray(200 * PAGE)
        for p in range(0, 200, 2):
            model[p * PAGE : (p + 1) * PAGE] = page_bytes(p)
            obj.write(p * PAGE, page_bytes(p))
        offsets = np.arange(1, 200, 2, dtype=np.int64) * PAGE
        values = np.arange(1, 200, 2, dtype=np.uint64) * 3
        obj.write_words(offsets, values)
        for off, v in zip(offsets.tolist(), values.tolist(), strict=True):
            model[off : off + 8] = int(v).to_bytes(8, "little")
        obj.strategy_write(150 * PAGE, page_bytes(1000))
        model[150 * PAGE : 151 * PAGE] = page_bytes(1000)
        clone = obj.clone()
        obj.write(0, b"after the clone")
        frozen = bytes(model)
        model[0:15] = b"after the clone"
        vm.pageout(64)
        got = obj.read_words(offsets)  # batched page-ins (read_many) first
        assert (got == values).all()
        assert clone.read_words(offsets[:20]).tolist() == values[:20].tolist()
        vm.pageout(64)
        assert obj.read(0, obj.size) == bytes(model)
        assert clone.read(0, clone.size) == frozen
        buffer = bytearray(PAGE)
        obj.strategy_read(150 * PAGE, buffer)
        assert buffer == page_bytes(1000)
        reserved = vm.allocate(40 * PAGE, reserve=True)
        for p in range(40):
            reserved.write(p * PAGE, page_bytes(p + 500))
        vm.pageout(64)
        for p in range(40):
            assert reserved.read(p * PAGE, PAGE) == page_bytes(p + 500)
        report = vm.scrub()
        if vm.tier is not None and vm.tier.integrity:
            assert report.checked > 0 and not report.corrupt
        stats = vm.tier_statistics()
        if stats is None:  # no tier at all: the control
            assert name == "none" and vm.tier is None
            vm.check()
            return
        # The pages really went through the tier and the device, both ways.
        assert stats.device_pages_written > 0 and stats.device_pages_read > 0
        if "compress" in MATRIX[name]:
            assert stats.stores > 0 and stats.hits > 0 and stats.writebacks > 0
        vm.check()


def test_the_daemon_writes_back_the_pool_asynchronously() -> None:
    device = MemoryDevice(4096, PAGE, name="ram")
    config = replace(CONFIG, daemon_thread=True)
    with VM(
        memory=64 * PAGE, swap=[device], config=config, compress="lz4", compress_pool=16 * PAGE
    ) as vm:
        obj = vm.allocate(1024 * PAGE)
        for p in range(1024):
            obj.write(p * PAGE, page_bytes(p))
        for p in range(0, 1024, 7):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.wait_idle()
        stats = vm.tier_statistics()
        assert stats is not None
        assert stats.writebacks > 0 and stats.hits > 0
        assert stats.pool_bytes <= stats.pool_capacity
        assert 1.5 < stats.ratio < 4
        vm.check()


def test_scrub_names_every_corrupt_page() -> None:
    device = FaultyDevice(MemoryDevice(512, PAGE, name="ram"))
    with VM(memory=8 * PAGE, swap=[device], config=CONFIG) as vm:
        obj = vm.allocate(64 * PAGE)
        fill(vm, obj)
        swapped = [p for p in range(64) if p not in obj.pages]
        for p in (3, 30):
            device.corrupt_stored([swapped_block(vm, obj, p)[1]])
        report = vm.scrub()
        assert report.checked == len(swapped)
        assert sorted((e.object_id, e.offset) for e in report.corrupt) == [
            (obj.oid, 3 * PAGE),
            (obj.oid, 30 * PAGE),
        ]
        assert vm.tier_statistics().bad_pending == 2  # type: ignore[union-attr]
        obj.close()
        assert vm.statistics().swap_bad_blocks == 2
        vm.check()


@pytest.mark.parametrize("encrypt", [True, False])
def test_no_plaintext_reaches_the_swap_file(tmp_path: Path, encrypt: bool) -> None:
    path = tmp_path / "swap"
    with VM(
        memory=16 * PAGE,
        swap=[f"{path}:2M"],
        config=CONFIG,
        encrypt=encrypt,
        compress="lz4",
        compress_pool=4 * PAGE,
    ) as vm:
        obj = vm.allocate(256 * PAGE)
        for p in range(256):
            obj.write(p * PAGE, (MARKER + page_bytes(p))[:PAGE])
        vm.pageout(256)
        assert vm.tier_statistics().device_pages_written > 100  # type: ignore[union-attr]
        if encrypt:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        raw = path.read_bytes()
        # The control run (no encryption) proves the search finds the marker.
        assert (MARKER in raw) is not encrypt
        for p in range(0, 256, 17):
            assert obj.read(p * PAGE, PAGE) == (MARKER + page_bytes(p))[:PAGE]
    # Encrypted swap is useless without the VM's keys: the file it made goes too.
    assert path.exists() is not encrypt


def test_pool_share_comes_out_of_the_frames() -> None:
    with VM(memory="1M", swap=[MemoryDevice(64, PAGE)], config=CONFIG) as vm:
        assert vm.frames.nframes == 256 and vm.tier is not None and vm.tier.pool_capacity == 0
    with VM(memory="1M", swap=[MemoryDevice(64, PAGE)], config=CONFIG, compress="lz4") as vm:
        assert vm.tier is not None
        assert vm.frames.nframes * PAGE + vm.tier.pool_capacity <= 1 << 20
        assert vm.tier.pool_capacity == (1 << 20) // 5
    with VM(memory="1M", swap=[], config=CONFIG, compress="zstd", compress_pool="256K") as vm:
        assert vm.frames.nframes == 192
    with VM(memory="1M", swap=[], config=CONFIG, compress="lz4", compress_pool=0.5) as vm:
        assert vm.frames.nframes == 128
    with VM(memory="1M", swap=[], config=CONFIG, integrity=False) as vm:
        assert vm.tier is None and vm.scrub().checked == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compress_pool": "64K"}, "compress_pool needs compress"),
        ({"compress": "lz4", "compress_pool": 1.5}, r"must be in \(0, 1\)"),
        ({"compress": "lz4", "compress_pool": "2M"}, "compress_pool must be in"),
        ({"compress": "brotli"}, "compress must be one of"),
    ],
)
def test_bad_tier_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VM(memory="1M", swap=[], config=CONFIG, **kwargs)


# --- Redis -------------------------------------------------------------------------


class _Redis:
    def __init__(self, binary: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
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
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    redis = pytest.importorskip("redis", reason="the redis package is not installed")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = _Redis(binary)
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                server.process.kill()
                raise
            time.sleep(0.02)
    client.close()
    yield server.url
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.mark.redis
def test_a_corrupt_redis_value_raises_corrupt_page(redis_url: str) -> None:
    import redis
    from vmpager.devices.redis import RedisDevice

    device = RedisDevice(redis_url, 512, name="redis")
    with VM(memory=8 * PAGE, swap=[device], config=CONFIG) as vm:
        obj = vm.allocate(64 * PAGE)
        fill(vm, obj)
        _, dblk = swapped_block(vm, obj, 33)
        client = redis.Redis.from_url(redis_url)
        key = device._keys(dblk, 1)[0]
        value = bytearray(client.get(key))
        value[2000] ^= 0x01
        client.set(key, bytes(value))
        with pytest.raises(CorruptPage) as info:
            obj.read(33 * PAGE, PAGE)
        assert (info.value.device, info.value.block) == ("redis", dblk)
        assert (info.value.object_id, info.value.offset) == (obj.oid, 33 * PAGE)
        assert obj.read(32 * PAGE, PAGE) == page_bytes(32)
        vm.check()


@pytest.mark.redis
@pytest.mark.parametrize("encrypt", [True, False])
def test_no_plaintext_reaches_redis(redis_url: str, encrypt: bool) -> None:
    import redis
    from vmpager.devices.redis import RedisDevice

    device = RedisDevice(redis_url, 512, name="redis")
    with VM(memory=8 * PAGE, swap=[device], config=CONFIG, encrypt=encrypt) as vm:
        obj = vm.allocate(64 * PAGE)
        for p in range(64):
            obj.write(p * PAGE, (MARKER + page_bytes(p))[:PAGE])
        vm.pageout(64)
        client = redis.Redis.from_url(redis_url)
        values = [client.get(k) for k in client.scan_iter(match=device._prefix + b"*")]
        assert len(values) > 32
        assert any(MARKER in v for v in values) is not encrypt


@pytest.mark.parametrize("name", ["lz4", "zstd+encrypt", "integrity"])
def test_swapoff_moves_pages_out_of_the_pool_and_off_the_device(name: str) -> None:
    devices = [MemoryDevice(512, PAGE, name="ram0"), MemoryDevice(512, PAGE, name="ram1")]
    with VM(memory=32 * PAGE, swap=devices, config=CONFIG, **TIERS[name]) as vm:
        obj = vm.allocate(300 * PAGE)
        fill(vm, obj)
        vm.swapoff("ram0")
        assert [d.name for _, d in vm.space.devices()] == ["ram1"]
        for p in range(300):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p), p
        vm.swapon(MemoryDevice(512, PAGE, name="ram2"))
        vm.pageout(300)
        for p in range(0, 300, 3):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p), p
        vm.check()


@pytest.mark.redis
@pytest.mark.parametrize("name", ["integrity", "encrypt", "lz4"])
def test_batched_page_ins_through_a_tier_use_the_redis_pipeline(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis
    from vmpager.devices.redis import RedisDevice

    device = RedisDevice(redis_url, 1024, name="redis")
    calls: list[int] = []
    singles: list[int] = []
    real_many, real_read = device.read_many, device.read_blocks

    def read_many(requests: Any, run: Any) -> Any:
        calls.append(len(requests))
        return real_many(requests, run)

    def read_blocks(blk: int, buffers: Any) -> None:
        singles.append(blk)
        real_read(blk, buffers)

    monkeypatch.setattr(device, "read_many", read_many)
    monkeypatch.setattr(device, "read_blocks", read_blocks)
    with VM(memory=32 * PAGE, swap=[device], config=CONFIG, **TIERS[name]) as vm:
        obj = vm.allocate(256 * PAGE)
        fill(vm, obj, compressible=False)  # rejects: on the device even with a pool
        client = redis.Redis.from_url(redis_url)
        before = client.info("stats")["total_commands_processed"]
        singles.clear()
        pages = np.arange(0, 256, 9, dtype=np.int64)
        got = obj.read_words(pages * PAGE)
        after = client.info("stats")["total_commands_processed"]
        client.close()
        assert (got == pages.astype(np.uint64)).all()  # word 0 of a page: its number
        # Every page came back through the device's pipeline, several requests a call,
        # none one request at a time.
        assert calls and max(calls) > 1
        assert sum(calls) >= len(pages) - 16  # a few may still be resident
        assert singles == []
        assert after - before <= len(pages) + 2  # one MGET a request (and INFO itself)
        vm.check()


@pytest.mark.parametrize("name", ["integrity", "encrypt"])
def test_a_corrupt_page_in_a_batch_fails_its_request_alone(name: str) -> None:
    device = FaultyDevice(MemoryDevice(512, PAGE, name="ram"))
    with VM(memory=32 * PAGE, swap=[device], config=CONFIG, **TIERS[name]) as vm:
        obj = vm.allocate(128 * PAGE)
        fill(vm, obj, compressible=False)
        _, dblk = swapped_block(vm, obj, 64)
        device.corrupt_stored([dblk], offset=3)
        offsets = np.arange(0, 128, 4, dtype=np.int64) * PAGE
        with pytest.raises(CorruptPage) as info:
            obj.read_words(offsets)
        assert (info.value.object_id, info.value.offset) == (obj.oid, 64 * PAGE)
        for p in range(128):
            if p != 64:
                assert obj.read(p * PAGE, PAGE) == page_bytes(p, compressible=False), p
        with pytest.raises(CorruptPage):
            obj.read(64 * PAGE, 8)
        vm.check()
