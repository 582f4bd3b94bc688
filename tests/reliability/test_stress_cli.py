"""``vmpager stress``: a short run passes; a device that corrupts data makes it fail."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmpager import stress as stress_module
from vmpager.cli import main
from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.protocol import WritableBuffer
from vmpager.errors import CorruptPage
from vmpager.stress import StressConfig, make_devices, run_stress

pytestmark = pytest.mark.timeout(120)


def test_stress_command_runs_and_verifies(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmpager", "stress", "--seconds", "3", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "OK: every byte read back as written" in out
    assert "8 threads" in out
    assert "swapoff" in out and "faults injected" in out
    assert not list(tmp_path.iterdir()), "the private swap files must be gone"


def test_stress_json_report_counts_the_work(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmpager",
            "stress",
            "--seconds",
            "2",
            "--threads",
            "4",
            "--json",
            "--dir",
            str(tmp_path),
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["nthreads"] == 4
    assert report["ops"] > 100
    assert report["writes"] > 0 and report["reads"] > 0
    assert report["bytes_verified"] > 0
    assert report["pageout_pages"] > 0 and report["pagein_pages"] > 0
    assert report["lost_bytes"] == 0 and report["invented_bytes"] == 0
    assert report["max_resident_npages"] <= report["frames"]
    assert report["checks"] > 0


class CorruptingDevice(FaultyDevice):
    """Returns damaged data for reads once armed: what the stress run must catch."""

    armed = False

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        super().read_blocks(blk, buffers)
        if self.armed:
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                view[0] ^= 0xFF


def corrupting_devices(config: StressConfig) -> list[FaultyDevice]:
    devices = make_devices(config)
    bad = CorruptingDevice(devices[0].inner, name="corrupting")
    bad.armed = True
    return [bad, devices[1]]


def test_a_corrupting_device_fails_the_run(tmp_path: Path) -> None:
    config = StressConfig(
        seconds=1.5,
        nthreads=4,
        write_error_rate=0,
        read_error_rate=0,
        swapoff_interval_s=0,
        directory=str(tmp_path),
        integrity=False,  # the run's own verification must catch what the device does
    )
    report = run_stress(config, devices=corrupting_devices(config))
    assert not report.ok
    assert report.lost_bytes + report.invented_bytes > 0
    assert "read 0x" in report.first_mismatch and "expected" in report.first_mismatch
    assert "FAILED" in report.summary()


def test_the_command_exits_1_on_lost_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(stress_module, "make_devices", corrupting_devices)
    monkeypatch.setattr(
        stress_module, "StressConfig", functools.partial(StressConfig, integrity=False)
    )
    code = main(
        ["stress", "--seconds", "1", "--threads", "2", "--no-swapoff", "--dir", str(tmp_path)]
    )
    assert code == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "lost bytes" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seconds", "-1"], r"seconds must be in \(0, 86400\]"),
        (["--seconds", "0"], r"seconds must be in \(0, 86400\]"),
        (["--seconds", "soon"], r"invalid float value"),
        (["--threads", "0"], r"nthreads must be in \[1, 256\]"),
        (["--memory", "4K"], r"--memory must be in \[32768"),
        (["--memory", "40000"], r"--memory must be a multiple of 4096"),
        (["--write-error-rate", "2"], r"write_error_rate must be in \[0, 1\)"),
        (["--read-error-rate", "-0.5"], r"read_error_rate must be in \[0, 1\)"),
        (["--swapoff-interval", "-1"], r"swapoff_interval_s must be a number >= 0"),
    ],
)
def test_stress_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    with pytest.raises(SystemExit) as info:
        main(["stress", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_stress_config_is_checked_in_the_library() -> None:
    with pytest.raises(ValueError, match="seconds"):
        run_stress(StressConfig(seconds=0))
    with pytest.raises(TypeError, match="seconds"):
        run_stress(StressConfig(seconds="1"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nthreads"):
        run_stress(StressConfig(nthreads=0))


def test_with_integrity_a_corrupting_device_returns_no_wrong_byte(tmp_path: Path) -> None:
    config = StressConfig(
        seconds=1.0,
        nthreads=2,
        write_error_rate=0,
        read_error_rate=0,
        swapoff_interval_s=0,
        directory=str(tmp_path),
    )
    try:
        report = run_stress(config, devices=corrupting_devices(config))
    except CorruptPage as error:
        assert error.device == "corrupting"
        return
    assert report.lost_bytes == 0 and report.invented_bytes == 0
    assert not report.ok  # the threads met CorruptPage
