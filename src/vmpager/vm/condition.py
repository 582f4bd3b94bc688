"""The VM's condition variable: ``notify_all`` costs nothing when nobody waits.

Every state change that someone might wait for (a page no longer busy, a
frame freed, an I/O slot released) calls ``notify_all``; on the paths that
run once per page that is several calls per fault. The standard
``threading.Condition.notify_all`` checks that the caller owns the lock and
walks its waiter list even when the list is empty (about a microsecond);
this one returns at once then.
"""

from __future__ import annotations

import threading

__all__ = ["VMCondition"]


class VMCondition(threading.Condition):
    """A ``threading.Condition`` whose ``notify_all`` returns at once without waiters.

    The caller must hold the lock, as for any condition; with waiters present
    the check is done and the waiters are woken exactly as by the base class.
    """

    def notify_all(self) -> None:
        # _waiters is the base class's deque of waiting threads (CPython's
        # threading.py); an empty one means there is nobody to wake.
        if self._waiters:  # type: ignore[attr-defined]
            super().notify_all()

    notifyAll = notify_all  # the base class's alias, kept in step
