"""Test helpers: fake devices, virtual time."""

from ..devices.fake import FakeDevice as FakeDevice
from ..devices.fake import FakeDeviceError as FakeDeviceError
from ._virtual import new_virtual_loop as new_virtual_loop
from ._virtual import run_virtual as run_virtual

__all__ = ("FakeDevice", "FakeDeviceError", "new_virtual_loop", "run_virtual")
