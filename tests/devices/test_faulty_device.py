"""FaultyDevice: chosen and random faults, latency, and its counters."""

from __future__ import annotations

import errno
import time

import pytest

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import DeviceError

BLOCK = 4096


def _block(byte: int) -> bytes:
    return bytes([byte]) * BLOCK


def _read(device: FaultyDevice, blk: int) -> bytes:
    buffer = bytearray(BLOCK)
    device.read_blocks(blk, [buffer])
    return bytes(buffer)


def test_failed_write_leaves_blocks_unchanged_and_rule_expires() -> None:
    device = FaultyDevice(MemoryDevice(16), name="flaky")
    device.write_blocks(4, [_block(1), _block(1)])
    device.fail_writes([5], times=2)
    for _ in range(2):
        with pytest.raises(DeviceError) as caught:
            device.write_blocks(4, [_block(2), _block(2)])
        assert (caught.value.errno, caught.value.device, caught.value.block) == (
            errno.EIO,
            "flaky",
            4,
        )
        assert not caught.value.transient
        assert _read(device, 4) == _block(1) and _read(device, 5) == _block(1)
    device.write_blocks(6, [_block(3)])  # does not touch block 5: never failed
    device.write_blocks(4, [_block(2), _block(2)])
    assert _read(device, 5) == _block(2)
    stats = device.statistics()
    assert (stats.injected_write_errors, stats.injected_hard_errors, stats.write_errors) == (
        2,
        2,
        2,
    )
    assert (stats.write_ops, stats.injected_read_errors) == (3, 0)


def test_transient_read_fault_keeps_the_buffer() -> None:
    device = FaultyDevice(MemoryDevice(8))
    device.write_blocks(2, [_block(9)])
    device.fail_reads(range(2, 4), errno=errno.EAGAIN)
    buffer = bytearray(_block(0))
    for _ in range(3):
        with pytest.raises(DeviceError) as caught:
            device.read_blocks(1, [bytearray(BLOCK), buffer])
        assert caught.value.transient
        assert buffer == _block(0)
    assert _read(device, 1) == bytes(BLOCK)
    device.clear_faults()
    assert _read(device, 2) == _block(9)
    stats = device.statistics()
    assert (stats.injected_read_errors, stats.injected_transient_errors, stats.read_errors) == (
        3,
        3,
        3,
    )


def _failure_pattern(seed: int, rate: float, requests: int = 200) -> list[int]:
    device = FaultyDevice(
        MemoryDevice(4), seed=seed, write_error_rate=rate, write_errno=errno.ENOMEM
    )
    failed = []
    for index in range(requests):
        try:
            device.write_blocks(index % 4, [_block(index % 256)])
        except DeviceError as error:
            assert error.errno == errno.ENOMEM
            failed.append(index)
    assert device.statistics().injected_write_errors == len(failed)
    assert device.statistics().injected_transient_errors == len(failed)
    return failed


def test_error_rate_is_seeded_and_roughly_right() -> None:
    first = _failure_pattern(seed=7, rate=0.25)
    assert first == _failure_pattern(seed=7, rate=0.25)
    assert first != _failure_pattern(seed=8, rate=0.25)
    assert 25 <= len(first) <= 75
    assert _failure_pattern(seed=7, rate=0.0) == []
    assert len(_failure_pattern(seed=7, rate=1.0)) == 200


def test_bad_requests_are_not_masked_by_faults() -> None:
    device = FaultyDevice(MemoryDevice(4), read_error_rate=1.0, write_error_rate=1.0)
    with pytest.raises(ValueError, match="past the end"):
        device.write_blocks(3, [bytes(2 * BLOCK)])
    with pytest.raises(ValueError, match="multiple of block_size"):
        device.read_blocks(0, [bytearray(100)])
    assert device.statistics().injected_read_errors == 0


def test_latency_is_injected() -> None:
    device = FaultyDevice(MemoryDevice(4), latency_s=0.02)
    started = time.monotonic()
    device.write_blocks(0, [_block(1)])
    _read(device, 0)
    device.flush()
    assert time.monotonic() - started >= 0.06
    assert device.statistics().delayed_requests == 3


def test_inner_errors_pass_through_and_close_closes_inner() -> None:
    inner = FaultyDevice(MemoryDevice(4), name="inner")
    inner.fail_writes([0])
    outer = FaultyDevice(inner, name="outer")
    with pytest.raises(DeviceError) as caught:
        outer.write_blocks(0, [_block(1)])
    assert caught.value.device == "inner"
    stats = outer.statistics()
    assert (stats.write_errors, stats.injected_write_errors) == (1, 0)
    outer.close()
    with pytest.raises(ValueError, match="closed"):
        inner.read_blocks(0, [bytearray(BLOCK)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"read_error_rate": 1.5}, r"read_error_rate must be in \[0, 1\]"),
        ({"write_error_rate": -0.1}, r"write_error_rate must be in \[0, 1\]"),
        ({"read_errno": 0}, r"read_errno must be in \[1"),
        ({"write_errno": 99999}, "known errno"),
        ({"latency_s": -1}, "latency_s must be a number >= 0"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultyDevice(MemoryDevice(4), **kwargs)  # type: ignore[arg-type]


def test_bad_rules() -> None:
    device = FaultyDevice(MemoryDevice(4))
    with pytest.raises(ValueError, match=r"blocks\[\] must be in \[0, 3\]"):
        device.fail_writes([4])
    with pytest.raises(ValueError, match="at least one block"):
        device.fail_reads([])
    with pytest.raises(ValueError, match=r"times must be in \[1"):
        device.fail_reads([0], times=0)
