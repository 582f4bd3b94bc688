"""The VM condition: ``notify_all`` is a no-op without waiters and wakes them otherwise."""

from __future__ import annotations

import threading

import pytest

from vmpager.vm.condition import VMCondition

pytestmark = pytest.mark.timeout(30)


def test_vm_condition_wakes_waiters_and_costs_nothing_without() -> None:
    lock = threading.Lock()
    cond = VMCondition(lock)
    with cond:
        cond.notify_all()  # nobody waits: a no-op, even via the alias
        cond.notifyAll()
    woke = threading.Event()

    def waiter() -> None:
        with cond:
            cond.wait(5)
            woke.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    for _ in range(500):
        with cond:
            if cond._waiters:  # type: ignore[attr-defined]
                cond.notify_all()
                break
        thread.join(0.01)
    thread.join(5)
    assert woke.is_set()
    with pytest.raises(RuntimeError):
        VMCondition(threading.Lock()).notify()  # the base class's checks stay
