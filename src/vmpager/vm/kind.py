"""The kinds of VM objects (OBJT_*): what backs their pages, so which pager serves them."""

from __future__ import annotations

import enum

__all__ = ["ObjectKind"]


class ObjectKind(enum.StrEnum):
    """What backs an object's pages, and so which pager serves it (OBJT_*).

    A ``str`` enum: ``obj.kind == "anonymous"`` keeps working.
    """

    #: Zero-filled memory whose pages go to swap (OBJT_DEFAULT / OBJT_SWAP).
    ANONYMOUS = "anonymous"
    #: A file's pages (OBJT_VNODE).
    VNODE = "vnode"
    #: Fixed memory the VM does not own (OBJT_DEVICE).
    DEVICE = "device"
