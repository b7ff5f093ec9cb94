"""Devices: the Device ABC, the CPU thread-pool device, storage and the virtual-time fake."""

from ._base import Device as Device
from ._base import DeviceStatistics as DeviceStatistics
from ._base import SlotArbiter as SlotArbiter
from .cpu import CpuDevice as CpuDevice
from .fake import FakeDevice as FakeDevice
from .fake import FakeDeviceError as FakeDeviceError
from .storage import ShortReadError as ShortReadError
from .storage import ShortWriteError as ShortWriteError
from .storage import StorageDevice as StorageDevice
from .storage import StorageError as StorageError
from .storage import StorageReadError as StorageReadError
from .storage import StorageStatistics as StorageStatistics
from .storage import StorageWriteError as StorageWriteError
from .storage import kvikio_available as kvikio_available

__all__ = (
    "CpuDevice",
    "Device",
    "DeviceStatistics",
    "FakeDevice",
    "FakeDeviceError",
    "ShortReadError",
    "ShortWriteError",
    "SlotArbiter",
    "StorageDevice",
    "StorageError",
    "StorageReadError",
    "StorageStatistics",
    "StorageWriteError",
    "kvikio_available",
)
