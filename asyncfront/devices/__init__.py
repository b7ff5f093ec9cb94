"""Devices: the Device ABC, the CPU thread-pool device, storage, the virtual-time fake and,
loaded on first use so that importing this package never imports torch, ``TorchDevice``."""

from typing import TYPE_CHECKING, Any

from ._base import LATER as LATER
from ._base import Device as Device
from ._base import DeviceStatistics as DeviceStatistics
from ._base import SlotArbiter as SlotArbiter
from .cpu import CpuDevice as CpuDevice
from .cpu import CpuStatistics as CpuStatistics
from .fake import FakeDevice as FakeDevice
from .fake import FakeDeviceError as FakeDeviceError
from .storage import ChecksumError as ChecksumError
from .storage import ShortReadError as ShortReadError
from .storage import ShortWriteError as ShortWriteError
from .storage import StorageDevice as StorageDevice
from .storage import StorageError as StorageError
from .storage import StorageReadError as StorageReadError
from .storage import StorageStatistics as StorageStatistics
from .storage import StorageWriteError as StorageWriteError
from .storage import kvikio_available as kvikio_available

if TYPE_CHECKING:
    from .torch import TorchDevice as TorchDevice

__all__ = (
    "LATER",
    "ChecksumError",
    "CpuDevice",
    "CpuStatistics",
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


def __getattr__(name: str) -> Any:
    # TorchDevice stays out of __all__: a star import must not pull in torch.
    if name == "TorchDevice":
        from .torch import TorchDevice

        return TorchDevice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
