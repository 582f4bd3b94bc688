"""Fork, pager death, device read errors, closed objects, bad arguments, no userfaultfd."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vmpager.errors import ObjectClosed
from vmpager.mapped import uffd
from vmpager.mapped.client import PAGER_SWITCH_INTERVAL, PagerDied, PagerProcess
from vmpager.testing.mapped import UNAVAILABLE
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(120)
needs_uffd = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))
SRC = os.path.dirname(os.path.dirname(os.path.abspath(uffd.__file__)))


def _run(script: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(SRC))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )


def _child_touches(a: np.ndarray) -> None:  # runs in a forked child
    faulthandler.disable()  # the SIGSEGV is expected: no traceback in the test log
    print(a[0])


def _child_calls(obj: object) -> None:
    try:
        obj.read(0, 8)  # type: ignore[attr-defined]
    except PagerDied as exc:
        sys.exit(3 if "fork" in str(exc) else 4)
    sys.exit(5)


# Python >= 3.12 warns about fork() in a process with threads: deliberate here.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@needs_uffd
def test_fork_child_never_reads_zeros(pager: PagerProcess) -> None:
    a = pager.array(1000)
    a[:] = 7.0
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_touches, args=(a,))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGSEGV  # the region is not inherited: loud
    child = ctx.Process(target=_child_calls, args=(pager.object_of(a),))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    assert a.sum() == 7000.0  # the parent is unaffected
    pager.check()


@needs_uffd
def test_pager_death_is_loud() -> None:
    result = _run(
        """
        import os, signal, time
        from vmpager.mapped.client import PagerProcess, PagerDied
        p = PagerProcess("256K")
        a = p.array(4 * 256 * 1024 // 8)
        a[:] = 1.0
        obj = p.object_of(a)
        os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.5)
        try:
            obj.read(0, 8)
        except PagerDied as exc:
            print("raised:", exc, flush=True)
        print("sum", a.sum(), flush=True)  # must not print a sum with zeros in it
        """
    )
    assert "raised: mapped objects are unusable: the pager process" in result.stdout
    assert "sum" not in result.stdout
    assert result.returncode == -signal.SIGSEGV
    assert "exited with status" in result.stderr


@needs_uffd
def test_device_read_error_is_reported_not_zeros() -> None:
    result = _run(
        """
        from vmpager.errors import DeviceError
        from vmpager.mapped.client import PagerProcess
        p = PagerProcess("256K", faulty_swap_nblocks=4096)
        a = p.array(4 * 256 * 1024 // 8)
        a[:] = 1.0
        p.pageout()
        p.inject("read_error_rate", 1.0)
        try:
            p.object_of(a).read(0, 8)
        except DeviceError as exc:
            print("raised:", type(exc).__name__, flush=True)
        print("sum", a.sum(), flush=True)
        """
    )
    assert "raised: DeviceError" in result.stdout
    assert "sum" not in result.stdout
    assert result.returncode == -signal.SIGBUS
    assert "cannot serve the page" in result.stderr and "DeviceError" in result.stderr


@needs_uffd
def test_closed_object_mapping_faults_loudly() -> None:
    result = _run(
        """
        from vmpager.mapped.client import PagerProcess
        p = PagerProcess("256K")
        a = p.array(4 * 256 * 1024 // 8)
        a[:] = 1.0
        p.object_of(a).close()
        print("sum", a.sum(), flush=True)
        """
    )
    assert "sum" not in result.stdout
    assert result.returncode == -signal.SIGBUS
    assert "used after close" in result.stderr


@needs_uffd
def test_bad_arguments(pager: PagerProcess) -> None:
    with pytest.raises(ValueError, match="shape"):
        pager.array((3, 0))
    with pytest.raises(TypeError, match="shape"):
        pager.array("ten")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        pager.array(10, order="K")
    with pytest.raises(TypeError, match="dtype"):
        pager.array(10, dtype=object)
    with pytest.raises(ValueError, match="mapped object"):
        pager.object_of(np.zeros(4))
    a = pager.array(10)
    obj = pager.object_of(a)
    with pytest.raises(ValueError, match="offset"):
        obj.read(-1, 4)
    with pytest.raises(ValueError, match="length"):
        obj.write(obj.size - 2, b"abc")


@needs_uffd
@pytest.mark.parametrize("interval", [0.0, -1.0, 2.0, float("nan")])
def test_bad_switch_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="switch_interval"):
        PagerProcess("1M", switch_interval=interval)
    with pytest.raises(TypeError, match="switch_interval"):
        PagerProcess("1M", switch_interval="1ms")  # type: ignore[arg-type]


@needs_uffd
def test_switch_interval_reaches_the_pager() -> None:
    with PagerProcess("1M", switch_interval=0.0003) as pager:
        assert pager.info()["switch_interval"] == pytest.approx(0.0003)
    with PagerProcess("1M") as pager:
        assert pager.info()["switch_interval"] == pytest.approx(PAGER_SWITCH_INTERVAL)


def test_without_userfaultfd_vm_array_says_how_and_the_rest_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(uffd.os, "open", refuse)
    monkeypatch.setattr(uffd, "_SYS_USERFAULTFD", {})
    with VM("1M", swap=[]) as vm:
        with pytest.raises(uffd.UserfaultfdUnavailable, match=r"unprivileged_userfaultfd=1"):
            vm.array(100)
        obj = vm.allocate("64K")
        obj.write(0, b"still works")
        with pytest.raises(uffd.UserfaultfdUnavailable, match=r"unprivileged_userfaultfd=1"):
            obj.map()  # and the object stays where it was
        assert obj.read(0, 11) == b"still works"
        assert obj in vm.objects()
        vm.check()


@needs_uffd
def test_vm_array_and_object_of() -> None:
    with VM("256K") as vm:
        a = vm.array((64, 64), "float32")
        a += 1.5
        obj = vm.object_of(a)
        assert np.frombuffer(obj.read(0, 4), np.float32)[0] == 1.5
        assert vm.mapped.statistics().nframes == 64
        vm.mapped.check()
    with pytest.raises(ObjectClosed):  # the VM is closed
        vm.array(3)
