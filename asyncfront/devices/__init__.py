"""Devices: the Device ABC, the CPU thread-pool device and the virtual-time fake."""

from ._base import Device as Device
from ._base import DeviceStatistics as DeviceStatistics
from ._base import SlotArbiter as SlotArbiter
from .cpu import CpuDevice as CpuDevice
from .fake import FakeDevice as FakeDevice
from .fake import FakeDeviceError as FakeDeviceError

__all__ = (
    "CpuDevice",
    "Device",
    "DeviceStatistics",
    "FakeDevice",
    "FakeDeviceError",
    "SlotArbiter",
)
