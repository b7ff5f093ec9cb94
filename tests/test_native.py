"""The compiled core and the pure-Python core: which one runs, and why."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import asyncfront as af
from asyncfront import _native

PACKAGE = Path(af.__file__).resolve().parent
# A compiled build of exactly these sources is installed beside them.
BUILT = _native._compiled_present(PACKAGE) and _native._built_digest(
    PACKAGE
) == _native.source_digest(PACKAGE)


def _probe(env: dict[str, str], path: Path | None = None) -> list[str]:
    """core_build() and each core module's file, in a fresh interpreter."""
    code = (
        "import importlib, asyncfront as af\n"
        "print(af.core_build())\n"
        f"for name in {_native.COMPILED_MODULES!r}:\n"
        "    print(importlib.import_module(name).__file__)\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != _native.PURE_PYTHON_VARIABLE}
    environ.update(env)
    if path is not None:
        environ["PYTHONPATH"] = str(path)
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True,
        cwd=path or PACKAGE.parent,
    )  # fmt: skip
    return out.stdout.splitlines()


def test_each_core_module_comes_from_the_build_core_build_names() -> None:
    """Every module of the core is the compiled one exactly when core_build() says so."""
    build = af.core_build()
    for name in _native.COMPILED_MODULES:
        compiled = not str(sys.modules[name].__file__).endswith(".py")
        assert compiled == (build == "compiled"), (name, build)


@pytest.mark.skipif(af.core_build() != "compiled", reason="the compiled core is not in use")
def test_compiled_frontiers_are_left_out_of_the_garbage_collector() -> None:
    """A compiled Frontier (tuples of ints only: it can be in no cycle) is not GC-tracked."""
    import gc

    a = af.Frontier({1: 2, 3: 4})
    merged = a.merge(af.Frontier({1: 5}))
    assert not gc.is_tracked(a) and not gc.is_tracked(merged)
    assert merged == af.Frontier({1: 5, 3: 4})


def test_a_frontier_keeps_exact_ints_of_int_subclasses() -> None:
    """Axes and epochs given as int subclasses are stored as exact ints (no back-references)."""

    class Tagged(int):
        pass

    big = Tagged(2**63 + 7)
    for f in (
        af.Frontier({big: Tagged(3)}),
        af.Frontier.single(big, Tagged(3)),
        af.Frontier().with_epoch(big, Tagged(3)),
    ):
        assert f.as_dict() == {2**63 + 7: 3}
        assert all(type(v) is int for v in (*f._axes, *f._epochs))


def test_the_environment_variable_selects_the_python_sources() -> None:
    """ASYNCFRONT_PURE_PYTHON=1 runs the Python sources, compiled build or not."""
    lines = _probe({_native.PURE_PYTHON_VARIABLE: "1"})
    assert lines[0] == "pure Python (ASYNCFRONT_PURE_PYTHON is set)"
    assert len(lines) == 1 + len(_native.COMPILED_MODULES)
    assert all(line.endswith(".py") for line in lines[1:])


def test_without_a_compiled_build_the_sources_run(tmp_path: Path) -> None:
    """A package with no compiled modules runs from its sources and says so."""
    copy = tmp_path / "asyncfront"
    shutil.copytree(PACKAGE, copy, ignore=_no_extensions)
    lines = _probe({}, tmp_path)
    assert lines[0] == "pure Python (no compiled build)"
    assert all(line.startswith(str(copy)) and line.endswith(".py") for line in lines[1:])


@pytest.mark.skipif(not BUILT, reason="no compiled build of these sources here")
def test_a_compiled_build_of_other_sources_is_not_used(tmp_path: Path) -> None:
    """Edit a compiled module's source after the build: its sources run, not the stale build."""
    copy = tmp_path / "asyncfront"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _probe({}, tmp_path)[0] == "compiled"
    queue = copy / "_queue.py"
    queue.write_text(queue.read_text() + "\n# edited after the build\n")
    lines = _probe({}, tmp_path)
    assert lines[0] == "pure Python (the compiled build is of other sources)"
    assert all(line.endswith(".py") for line in lines[1:])


def _no_extensions(directory: str, names: list[str]) -> list[str]:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [n for n in names if n.endswith(suffixes) or n in ("__pycache__", _native.STAMP_NAME)]


def test_a_subclass_declares_its_kind_and_wait_handling_as_class_attributes() -> None:
    """Class attributes of a Device subclass hold for the core's own reads, compiled or not."""

    class Npu(af.devices.Device):
        kind = "npu"
        watches_waits = True

        async def execute(self, submission: af.Submission) -> object:
            return None

    device = Npu("npu0")
    assert device.kind == "npu" and device.statistics().kind == "npu"
    assert device.watches_waits and not device.claims_waits
