"""vmpager: a user-space virtual-memory system for Python on the BSD pager architecture.

VM objects (anonymous memory, files, device memory) may be far larger than the
memory budget given to the VM; a bounded pool of frames, a page daemon and
pagers move pages to swap devices and back.
"""

from vmpager.errors import DeviceError, InvariantViolation, ObjectClosed, SwapExhausted, VmError

__all__ = ["DeviceError", "InvariantViolation", "ObjectClosed", "SwapExhausted", "VmError"]
__version__ = "0.1.0"
