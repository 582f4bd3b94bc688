"""Block devices for swap: files or block devices, RAM, fault injection (and Redis, imported on demand)."""

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
