"""NBD export of vmpager objects: the user-space twin of FreeBSD's md(4).

``NbdServer`` speaks the NBD protocol (fixed newstyle, structured replies,
``base:allocation`` block status) over loopback TCP or a unix socket and
serves any object implementing ``Backend``; ``MemoryBackend`` is a sparse
RAM disk for tests and benchmarks. See ``docs/nbd.md``.
"""

from vmpager.nbd.backend import Backend, MemoryBackend, MemoryBackendStatistics
from vmpager.nbd.server import NbdServer, NbdServerStatistics

__all__ = [
    "Backend",
    "MemoryBackend",
    "MemoryBackendStatistics",
    "NbdServer",
    "NbdServerStatistics",
]
