"""Executable multi-model scenarios: fake devices in virtual time, or real CPU devices."""

from .kv_paging import KvPagingReport as KvPagingReport
from .kv_paging import run_kv_paging as run_kv_paging
from .laptop_voice import VoiceReport as VoiceReport
from .laptop_voice import laptop_devices as laptop_devices
from .laptop_voice import run_voice_pipeline as run_voice_pipeline

__all__ = (
    "KvPagingReport",
    "VoiceReport",
    "laptop_devices",
    "run_kv_paging",
    "run_voice_pipeline",
)
