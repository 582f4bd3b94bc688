"""vmpager: a user-space virtual-memory system for Python on the BSD pager architecture.

VM objects (anonymous memory, files, device memory) may be far larger than the
memory budget given to the VM; a bounded pool of frames, a page daemon and
pagers move pages to swap devices and back.
"""

from vmpager.devices import BlockDevice, FaultyDevice, FileDevice, MemoryDevice
from vmpager.errors import DeviceError, InvariantViolation, ObjectClosed, SwapExhausted, VmError
from vmpager.mapped.memmap import memmap
from vmpager.pager.vnode import FileShrunkError
from vmpager.vm.config import VMConfig, WriteErrorPolicy
from vmpager.vm.object import VMObject
from vmpager.vm.stats import VMStatistics
from vmpager.vm.system import VM

__all__ = [
    "VM",
    "BlockDevice",
    "DeviceError",
    "FaultyDevice",
    "FileDevice",
    "FileShrunkError",
    "InvariantViolation",
    "MemoryDevice",
    "ObjectClosed",
    "SwapExhausted",
    "VMConfig",
    "VMObject",
    "VMStatistics",
    "VmError",
    "WriteErrorPolicy",
    "memmap",
]
__version__ = "0.1.0"
