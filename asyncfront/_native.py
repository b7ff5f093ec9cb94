"""Which build of the core runs: the compiled one, or the pure-Python modules.

The dispatch path (frontiers, semaphores, queues, the device base and fake devices) is
compiled with mypyc when the package is built where a C compiler exists
(see ``hatch_build.py``); the same modules ship as Python sources beside it. The
compiled modules are used only when they were built from exactly the sources beside
them, so an edited checkout never runs a stale build. ``ASYNCFRONT_PURE_PYTHON=1`` in
the environment selects the Python sources even where a compiled build is present, and,
at build time, skips the compilation.

This module imports nothing of asyncfront and is executed by the build hook as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ("COMPILED_MODULES", "PURE_PYTHON_VARIABLE", "core_build", "source_digest")

COMPILED_MODULES = (
    "asyncfront._frontier",
    "asyncfront._semaphore",
    "asyncfront._queue",
    "asyncfront._record",
    "asyncfront.devices._base",
    "asyncfront.devices.fake",
)
"""The modules of the compiled core, in the order the build lists them."""

PURE_PYTHON_VARIABLE = "ASYNCFRONT_PURE_PYTHON"
"""The environment variable that selects the pure-Python core (any value but 0)."""

STAMP_NAME = "_core.stamp"
"""The file beside the package's modules that names the sources a compiled build is of."""

_PACKAGE = Path(__file__).resolve().parent


def source_path(module: str, package_dir: Path = _PACKAGE) -> Path:
    """The Python source of one of :data:`COMPILED_MODULES`."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_digest(package_dir: Path = _PACKAGE) -> str:
    """A digest of the compiled modules' sources and of the interpreter they are built for."""
    digest = hashlib.sha256()
    digest.update(f"{sys.implementation.cache_tag} {sys.version}\n".encode())
    for module in COMPILED_MODULES:
        digest.update(module.encode() + b"\0")
        digest.update(source_path(module, package_dir).read_bytes())
    return digest.hexdigest()


def pure_python_requested() -> bool:
    """Whether :data:`PURE_PYTHON_VARIABLE` asks for the Python sources."""
    return os.environ.get(PURE_PYTHON_VARIABLE, "") not in ("", "0")


def _built_digest(package_dir: Path = _PACKAGE) -> str | None:
    stamp = package_dir / STAMP_NAME
    try:
        return stamp.read_text().strip()
    except OSError:
        return None


def _compiled_present(package_dir: Path = _PACKAGE) -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for module in COMPILED_MODULES:
        base = source_path(module, package_dir).with_suffix("")
        if not any(base.with_name(base.name + suffix).exists() for suffix in suffixes):
            return False
    return True


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the Python source of the core's modules ahead of their compiled build."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


_state = "not chosen yet"


def choose() -> str:
    """Decide, before the core is imported, which build it comes from; returns why.

    Installs a finder for the Python sources unless a compiled build of exactly these
    sources is present and :data:`PURE_PYTHON_VARIABLE` is not set.
    """
    global _state
    if _state != "not chosen yet":
        return _state
    if pure_python_requested():
        _state = f"pure Python ({PURE_PYTHON_VARIABLE} is set)"
    elif not _compiled_present():
        _state = "pure Python (no compiled build)"
    elif _built_digest() != source_digest():
        _state = "pure Python (the compiled build is of other sources)"
    else:
        _state = "compiled"
        return _state
    if not any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())
    return _state


def restore_class_docs() -> None:
    """Give the compiled core's classes the docstrings of their sources.

    mypyc keeps a class's signature as its ``__doc__``, not its docstring, so ``help()``
    and :func:`inspect.getdoc` read the source's instead (methods keep their signatures).
    """
    if _state != "compiled":
        return
    import ast

    for module in COMPILED_MODULES:
        loaded = sys.modules.get(module)
        if loaded is None:
            continue
        tree = ast.parse(source_path(module).read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                doc = ast.get_docstring(node, clean=False)
                cls = getattr(loaded, node.name, None)
                if doc and isinstance(cls, type) and not (cls.__doc__ or "").strip(" -\n"):
                    with contextlib.suppress(AttributeError, TypeError):  # an immutable type
                        cls.__doc__ = doc


def core_build() -> str:
    """Which build of the core this process runs, and why: ``"compiled"`` or
    ``"pure Python (...)"`` with the reason (the variable, no build, a stale build)."""
    queue = sys.modules.get("asyncfront._queue")
    if queue is not None:
        compiled = not str(getattr(queue, "__file__", "")).endswith(".py")
        if compiled != (_state == "compiled"):  # pragma: no cover - imported before choose()
            return "compiled" if compiled else "pure Python"
    return _state


if __name__ == "asyncfront._native":  # imported by the package (the build hook runs it too)
    choose()
