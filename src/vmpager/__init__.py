"""vmpager: a user-space virtual-memory system for Python on the BSD pager architecture.

VM objects (anonymous memory, files, device memory) may be far larger than the
memory budget given to the VM; a bounded pool of frames, a page daemon and
pagers move pages to swap devices and back.
"""

from vmpager.devices import BlockDevice, FaultyDevice, FileDevice, MemoryDevice
from vmpager.errors import (
    CorruptPage,
    DeviceError,
    InvariantViolation,
    ObjectClosed,
    SwapExhausted,
    VmError,
)
from vmpager.mapped.memmap import memmap
from vmpager.pager.vnode import FileShrunkError
from vmpager.tiers.tier import TierStatistics
from vmpager.vm.config import VMConfig, WriteErrorPolicy
from vmpager.vm.object import VMObject
from vmpager.vm.stats import VMStatistics
from vmpager.vm.system import VM, ScrubReport

__all__ = [
    "VM",
    "BlockDevice",
    "CorruptPage",
    "DeviceError",
    "FaultyDevice",
    "FileDevice",
    "FileShrunkError",
    "InvariantViolation",
    "MemoryDevice",
    "ObjectClosed",
    "ScrubReport",
    "SwapExhausted",
    "TierStatistics",
    "VMConfig",
    "VMObject",
    "VMStatistics",
    "VmError",
    "WriteErrorPolicy",
    "memmap",
]
__version__ = "0.1.0"
