"""Executable multi-model scenarios: fake devices in virtual time, or real CPU devices."""

from ._registry import SCENARIOS as SCENARIOS
from ._registry import Scenario as Scenario
from ._registry import ScenarioReport as ScenarioReport
from ._registry import get_scenario as get_scenario
from .kv_paging import KvPagingReport as KvPagingReport
from .kv_paging import run_kv_paging as run_kv_paging
from .laptop_voice import VoiceReport as VoiceReport
from .laptop_voice import laptop_devices as laptop_devices
from .laptop_voice import run_voice_pipeline as run_voice_pipeline
from .sdxl_pressure import SdxlPressureReport as SdxlPressureReport
from .sdxl_pressure import run_sdxl_pressure as run_sdxl_pressure
from .sdxl_pressure import workstation_devices as workstation_devices

__all__ = (
    "KvPagingReport",
    "SCENARIOS",
    "Scenario",
    "ScenarioReport",
    "SdxlPressureReport",
    "VoiceReport",
    "get_scenario",
    "laptop_devices",
    "run_kv_paging",
    "run_sdxl_pressure",
    "run_voice_pipeline",
    "workstation_devices",
)
