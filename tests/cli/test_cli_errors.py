"""Every command-line error is one line naming the option and what to do; 2 usage, 1 failure.

Each case runs ``main(argv)`` in this process and checks the exit status,
that stderr is exactly one line, that it names the option at fault, and that
no traceback was printed. Two cases run the installed entry point as a real
process, where a traceback would show.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpager import cli
from vmpager.bench import kernel, paging
from vmpager.cli import main

pytestmark = pytest.mark.timeout(60)


def _status_and_err(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    return status, capsys.readouterr().err


def _assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


USAGE_CASES: list[tuple[list[str], tuple[str, ...]]] = [
    (["run", "--size", "12Q"], ("--size", "unknown unit 'Q'")),
    (["run", "--size", "-5"], ("--size",)),
    (["run", "--size", "12K"], ("--size", "power of two", "--pattern")),
    (["run", "--memory", "1K"], ("--memory",)),
    (["run", "--accesses", "0"], ("--accesses", ">= 1")),
    (["run", "--pattern", "zigzag"], ("--pattern", "zigzag", "--help")),
    (["run", "--standard", "--size", "1G"], ("--size", "--standard")),
    (["bench", "--size", "1500K"], ("--size", "multiple")),
    (["bench", "--size", "3M", "--kernel", "no"], ("--size", "power of two")),
    (["bench", "--patterns", "seq,sideways"], ("--patterns", "sideways")),
    (["bench", "--variants", "loop,fast"], ("--variants",)),
    (["bench", "--reps", "0"], ("--reps",)),
    (["bench", "--config", "no_such_knob=1"], ("--config", "KEY=VALUE")),
    (["bench", "--kernel", "maybe"], ("--kernel", "maybe")),
    (["bench", "--page-size", "12K"], ("--page-size", "power of two")),
    (["serve", "--listen", "localhost"], ("--listen", "HOST:PORT")),
    (["serve", "--export", "noname"], ("--export", "NAME:SIZE")),
    (["swapinfo", "--memory", "-1"], ("--memory",)),
    (["swapinfo", "--page-size", "6K"], ("--page-size", "power of two")),
    (["swapinfo", "--swap", "/tmp/x:1K"], ("--swap", "4096")),
    (["frobnicate"], ("invalid choice",)),
    ([], ("required: command",)),
]


@pytest.mark.parametrize(
    ("argv", "needles"), USAGE_CASES, ids=[" ".join(c[0]) or "none" for c in USAGE_CASES]
)
def test_usage_errors_exit_2_on_one_line(
    argv: list[str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _status_and_err(argv, capsys)
    assert status == 2, err
    _assert_one_line(err, *needles)


def test_missing_swap_file_without_size_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "swap0"
    status, err = _status_and_err(["swapinfo", "--swap", str(missing)], capsys)
    assert status == 2
    _assert_one_line(err, "--swap", str(missing), "PATH:SIZE")
    assert not missing.exists()


def test_swap_in_a_missing_directory_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"{tmp_path}/no/such/dir/swap0:1M"
    status, err = _status_and_err(["run", "--size", "64K", "--swap", spec], capsys)
    assert status == 1
    _assert_one_line(err, "--swap", f"{tmp_path}/no/such/dir/swap0", "create its directory")


def test_swap_path_that_is_a_directory_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _status_and_err(["swapinfo", "--swap", str(tmp_path)], capsys)
    assert status == 1
    _assert_one_line(err, "--swap", str(tmp_path), "is a directory")


def test_swap_path_without_permission_fails(capsys: pytest.CaptureFixture[str]) -> None:
    # sysfs refuses new files even to root: a path nobody may create.
    path = "/sys/kernel/vmpager-cli-test-swap"
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys/kernel here")
    status, err = _status_and_err(["swapinfo", "--swap", f"{path}:1M"], capsys)
    assert status == 1
    _assert_one_line(err, "--swap", path)
    assert "permission denied" in err or "not permitted" in err, err


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def test_busy_port_fails(busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--size", "1M", "--memory", "1M", "--listen", f"127.0.0.1:{busy_port}"]
    status, err = _status_and_err(argv, capsys)
    assert status == 1
    _assert_one_line(err, "--listen", str(busy_port), "already in use", "another port")


def test_kernel_side_without_root_fails_when_required(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kernel.os, "geteuid", lambda: 1000)
    argv = ["bench", "--size", "1M", "--kernel", "yes", "--patterns", "seq"]
    status, err = _status_and_err(argv, capsys)
    assert status == 1
    _assert_one_line(err, "--kernel yes", "needs root")


def test_cgroup_permission_error_mid_run_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cgroup that cannot be created (permission) ends the bench with one line, exit 1."""

    class Refused:
        directory = Path("/tmp")

        def __enter__(self) -> Refused:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/sys/fs/cgroup/memory/kswap-bench")

    monkeypatch.setattr(paging.kernel, "unavailable", lambda: None)
    monkeypatch.setattr(paging.kernel, "compile_kworkload", lambda d: Path(d) / "kworkload")
    monkeypatch.setattr(paging.kernel, "SwapFile", lambda *a: Refused())
    monkeypatch.setattr(paging.kernel, "run_kernel", refuse)
    argv = ["bench", "--size", "1M", "--patterns", "seq", "--accesses", "10", "--kernel", "yes"]
    status, err = _status_and_err(argv, capsys)
    assert status == 1
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--kernel" in lines[0] and "Permission denied" in lines[0], lines[0]
    assert "root" in lines[0]


def test_plot_without_matplotlib_fails_before_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(paging, "have_matplotlib", lambda: False)
    status, err = _status_and_err(["bench", "--plot", "out.png"], capsys)
    assert status == 1
    _assert_one_line(err, "--plot", "pip install 'vmpager[plot]'")


def test_output_in_a_missing_directory_fails_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "bench.json"
    status, err = _status_and_err(["bench", "--output", str(target)], capsys)
    assert status == 1
    _assert_one_line(err, "--output", "no such directory")


def test_unexpected_error_is_one_line_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(cli, "_cmd_swapinfo", broken)
    monkeypatch.delenv("VMPAGER_DEBUG", raising=False)
    status, err = _status_and_err(["swapinfo"], capsys)
    assert status == 1
    _assert_one_line(err, "internal error", "something unforeseen", "VMPAGER_DEBUG=1")


@pytest.mark.parametrize(
    ("argv", "status", "needle"),
    [
        (["run", "--size", "12Q"], 2, "--size"),
        (["swapinfo", "--swap", "/proc/vmpager-no-such/swap0:1M"], 1, "--swap"),
    ],
)
def test_real_process_prints_one_line(argv: list[str], status: int, needle: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    env.pop("VMPAGER_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "vmpager", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == status, done.stderr
    assert done.stdout == ""
    _assert_one_line(done.stderr, needle)


def test_mapped_run_without_userfaultfd_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run --mapped`` where userfaultfd is refused: one line naming the option and the fix."""
    from vmpager.mapped import uffd

    def refuse(flags: int = 0) -> int:
        raise uffd.UserfaultfdUnavailable(
            "userfaultfd is unavailable (/dev/userfaultfd: Permission denied): "
            + uffd._HOW_TO_ENABLE
        )

    monkeypatch.setattr(uffd, "_open_raw", refuse)
    argv = ["run", "--mapped", "--size", "1M", "--memory", "256K", "--pattern", "seq"]
    status, err = _status_and_err(argv, capsys)
    assert status == 1
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--mapped" in lines[0] and "vm.unprivileged_userfaultfd=1" in lines[0], lines[0]
