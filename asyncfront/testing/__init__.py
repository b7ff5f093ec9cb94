"""Test helpers: fake devices, virtual time, the device conformance suite."""

from ..devices.fake import FakeDevice as FakeDevice
from ..devices.fake import FakeDeviceError as FakeDeviceError
from ._conformance import CONFORMANCE_CHECKS as CONFORMANCE_CHECKS
from ._conformance import DeviceFactory as DeviceFactory
from ._conformance import check_device_conformance as check_device_conformance
from ._paging import FakeCopyEngine as FakeCopyEngine
from ._paging import FakeStorageDevice as FakeStorageDevice
from ._virtual import VirtualStallError as VirtualStallError
from ._virtual import new_virtual_loop as new_virtual_loop
from ._virtual import run_virtual as run_virtual

__all__ = (
    "CONFORMANCE_CHECKS",
    "DeviceFactory",
    "FakeCopyEngine",
    "FakeDevice",
    "FakeDeviceError",
    "FakeStorageDevice",
    "VirtualStallError",
    "check_device_conformance",
    "new_virtual_loop",
    "run_virtual",
)
