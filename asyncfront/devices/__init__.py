"""Devices: the Device ABC, the CPU thread-pool device, the virtual-time fake and, loaded
on first use so that importing this package never imports torch, ``TorchDevice``."""

from typing import TYPE_CHECKING, Any

from ._base import Device as Device
from ._base import DeviceStatistics as DeviceStatistics
from ._base import SlotArbiter as SlotArbiter
from .cpu import CpuDevice as CpuDevice
from .fake import FakeDevice as FakeDevice
from .fake import FakeDeviceError as FakeDeviceError

if TYPE_CHECKING:
    from .torch import TorchDevice as TorchDevice

__all__ = (
    "CpuDevice",
    "Device",
    "DeviceStatistics",
    "FakeDevice",
    "FakeDeviceError",
    "SlotArbiter",
)


def __getattr__(name: str) -> Any:
    # TorchDevice stays out of __all__: a star import must not pull in torch.
    if name == "TorchDevice":
        from .torch import TorchDevice

        return TorchDevice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
