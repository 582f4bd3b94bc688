"""An I/O request between a pager and the swap space (struct buf for paging)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from vmpager.errors import DeviceError

__all__ = ["AnyIORequest", "IOKind", "IORequest"]

#: What the pager that made a request attaches to it (its pages); opaque here.
PayloadT = TypeVar("PayloadT")


class IOKind(enum.Enum):
    """The in-flight class a request is counted in (nsw_rcount, nsw_wcount_*)."""

    READ = "read"
    WRITE_SYNC = "write_sync"
    WRITE_ASYNC = "write_async"

    # Members are singletons: identity hashing spares every dict look-up keyed
    # by a kind (the in-flight counts, once per I/O) a call into Python code.
    __hash__ = object.__hash__


@dataclass(slots=True, eq=False)
class IORequest(Generic[PayloadT]):
    """One contiguous device transfer of whole pages.

    ``buffers`` are frame views covering blocks ``blk ..`` in order, each a
    whole number of pages: one per page, or (a pageout) one per run of pages
    in consecutive frames; ``pages`` is the payload of the pager
    that made the request (the pages the buffers belong to, busy for the life
    of the request), which the I/O layer never looks at. ``iodone`` runs under the VM lock when
    the transfer ends, with ``error`` set on failure.
    """

    kind: IOKind
    blk: int
    buffers: list[memoryview]
    pages: list[PayloadT]
    iodone: Callable[[IORequest[PayloadT]], None]
    error: DeviceError | None = None
    #: Index into ``pages`` of the page the caller waits for (reads), or -1.
    reqpage: int = -1
    done: bool = field(default=False)

    @property
    def npages(self) -> int:
        """Pages transferred: the payload's, or one per buffer without a payload."""
        return len(self.pages) or len(self.buffers)

    @property
    def is_write(self) -> bool:
        return self.kind is not IOKind.READ


#: A request whatever its payload: what the engine and the in-flight limits handle.
AnyIORequest = IORequest[Any]
