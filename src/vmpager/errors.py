"""The exceptions vmpager raises.

Expected outcomes inside the pager layer are values (``PagerResult``); an
exception means misuse by the caller (``ValueError``/``TypeError``, raised
directly), exhaustion the caller can handle (``SwapExhausted``), or a real
failure of a backing store (``DeviceError``).
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "TRANSIENT_ERRNOS",
    "CorruptPage",
    "DeviceError",
    "InvariantViolation",
    "ObjectClosed",
    "SwapExhausted",
    "VmError",
]

#: errno values a device reports for a condition that may clear by itself.
TRANSIENT_ERRNOS: frozenset[int] = frozenset({_errno.EAGAIN, _errno.ENOMEM, _errno.EINTR})


class VmError(Exception):
    """Base class of every error vmpager raises on purpose."""


class SwapExhausted(VmError):
    """Neither memory nor swap can take the data; nothing already written is lost."""


class ObjectClosed(VmError, ValueError):
    """An operation on a VM object (or VM) that was closed."""


class InvariantViolation(VmError, AssertionError):
    """``check()`` found broken invariants; ``problems`` lists every one found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} invariant violation(s):\n  {shown}{more}")


class DeviceError(VmError, OSError):
    """A block device failed a request.

    Carries the errno (so callers can tell transient from hard failures), the
    device name and the first block of the failed request.
    """

    def __init__(self, err: int, device: str, block: int, detail: str = "") -> None:
        self.device = device
        self.block = block
        text = f"{device}: block {block}: {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        super().__init__(err, text)

    @property
    def transient(self) -> bool:
        """True when the error may clear by itself (EAGAIN, ENOMEM, EINTR)."""
        return self.errno in TRANSIENT_ERRNOS

    def __reduce__(self) -> tuple[type[DeviceError], tuple[int, str, int]]:
        return (type(self), (self.errno or 0, self.device, self.block))


class CorruptPage(DeviceError):
    """A swapped page read back does not match its checksum or authentication tag.

    The data is never returned; the block is marked bad when its owner frees
    it. ``device``/``block`` are the device and the block on it, ``swap_block``
    the global swap block; ``object_id``/``offset`` name the page when known
    (None otherwise). ``errno`` is ``EIO``.
    """

    def __init__(
        self,
        device: str,
        block: int,
        swap_block: int = -1,
        detail: str = "",
        object_id: int | None = None,
        offset: int | None = None,
    ) -> None:
        self.swap_block = swap_block
        self.object_id = object_id
        self.offset = offset
        self.detail = detail
        where = f"swap block {swap_block}"
        if object_id is not None:
            where += f", object {object_id} offset {offset}"
        super().__init__(_errno.EIO, device, block, f"corrupt page: {detail}; {where}")

    def naming(self, object_id: int, offset: int) -> CorruptPage:
        """The same error naming the page that owns the block."""
        return CorruptPage(self.device, self.block, self.swap_block, self.detail, object_id, offset)

    def __reduce__(self) -> tuple[type[DeviceError], tuple[int, str, int]]:
        return (  # type: ignore[return-value]
            type(self),
            (self.device, self.block, self.swap_block, self.detail, self.object_id, self.offset),
        )
