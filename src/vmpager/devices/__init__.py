"""Block devices for swap: files or block devices, RAM, fault injection.

The Redis device (`vmpager.devices.redis`) is imported on demand: redis-py is optional.
"""

from vmpager.devices.faulty import FaultyDevice, FaultyDeviceStatistics
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.devices.protocol import BlockDevice, DeviceStatistics

__all__ = [
    "BlockDevice",
    "DeviceStatistics",
    "FaultyDevice",
    "FaultyDeviceStatistics",
    "FileDevice",
    "MemoryDevice",
]
