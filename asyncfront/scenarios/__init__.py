"""Executable multi-model scenarios on fake devices in virtual time."""

from .laptop_voice import VoiceReport as VoiceReport
from .laptop_voice import laptop_devices as laptop_devices
from .laptop_voice import run_voice_pipeline as run_voice_pipeline

__all__ = ("VoiceReport", "laptop_devices", "run_voice_pipeline")
