"""Build hook: compile the dispatch core with mypyc where a C compiler exists.

The modules listed in ``asyncfront/_native.py`` are compiled into extension modules
beside their Python sources (an editable install) or into the wheel (a regular one).
Where compilation is impossible (no compiler, an unsupported interpreter) the build
says why and installs the pure-Python package, which is complete on its own.
``ASYNCFRONT_PURE_PYTHON=1`` skips the compilation. An editable install whose compiled
modules are of the same sources reuses them instead of compiling again.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _native(root: Path) -> ModuleType:
    """asyncfront/_native.py, loaded on its own (it imports nothing of the package)."""
    spec = importlib.util.spec_from_file_location(
        "_asyncfront_native", root / "asyncfront" / "_native.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions(package: Path) -> list[Path]:
    """The compiled modules under the package directory (ours: the core and its library)."""
    found: list[Path] = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        found.extend(package.rglob(f"*{suffix}"))
    return sorted(set(found))


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compiles the core for the wheel and editable targets."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        package = root / "asyncfront"
        native = _native(root)
        stamp = package / native.STAMP_NAME
        editable = version == "editable"
        if native.pure_python_requested():
            self.app.display_info(f"{native.PURE_PYTHON_VARIABLE} is set: the pure-Python core")
            if editable:
                self._clean(package, stamp)
            return
        digest = native.source_digest(package)
        if (
            editable
            and stamp.is_file()
            and stamp.read_text().strip() == digest
            and len(_extensions(package)) > len(native.COMPILED_MODULES)
        ):
            self.app.display_info("the compiled core is of these sources: kept")
            self._mark_compiled(build_data)
            return
        with tempfile.TemporaryDirectory(prefix="asyncfront-build-") as work:
            try:
                built = self._compile(root, native, Path(work))
            except (Exception, SystemExit) as exc:  # mypyc exits on errors: pure Python then
                self.app.display_warning(
                    f"the compiled core was not built ({type(exc).__name__}: {exc}); "
                    "installing the pure-Python core"
                )
                if editable:
                    self._clean(package, stamp)
                return
            if editable:
                self._clean(package, stamp)
                for path, relative in built:
                    shutil.copy2(path, root / relative)
                stamp.write_text(digest + "\n")
            else:
                stamp_out = Path(self.directory) / "asyncfront-core.stamp"
                stamp_out.parent.mkdir(parents=True, exist_ok=True)
                stamp_out.write_text(digest + "\n")
                build_data["force_include"][str(stamp_out)] = f"asyncfront/{native.STAMP_NAME}"
                keep = Path(self.directory) / "asyncfront-core"
                shutil.rmtree(keep, ignore_errors=True)
                for path, relative in built:
                    target = keep / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
                    build_data["force_include"][str(target)] = relative
        self._mark_compiled(build_data)

    @staticmethod
    def _mark_compiled(build_data: dict[str, Any]) -> None:
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    @staticmethod
    def _clean(package: Path, stamp: Path) -> None:
        """Remove an earlier compiled core from the source tree (and its stamp)."""
        for path in _extensions(package):
            path.unlink()
        stamp.unlink(missing_ok=True)

    def _compile(self, root: Path, native: ModuleType, work: Path) -> list[tuple[Path, str]]:
        """mypyc over the core's modules; returns (built file, path in the package)."""
        from mypyc.build import mypycify
        from setuptools import Distribution

        sources = [
            native.source_path(m, root / "asyncfront").relative_to(root).as_posix()
            for m in native.COMPILED_MODULES
        ]
        self.app.display_info(f"compiling the core with mypyc: {', '.join(sources)}")
        here = os.getcwd()
        os.chdir(root)
        try:
            extensions = mypycify(
                # The rest of the package is seen through its annotations only.
                ["--follow-imports=skip", "--no-warn-return-any", *sources],
                group_name="asyncfront._core",
                target_dir=str(work / "c"),
            )
            dist = Distribution({"name": "asyncfront", "ext_modules": extensions})
            command = dist.get_command_obj("build_ext")
            command.build_lib = str(work / "lib")  # type: ignore[attr-defined]
            command.build_temp = str(work / "tmp")  # type: ignore[attr-defined]
            command.parallel = os.cpu_count() or 1  # type: ignore[attr-defined]
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(here)
        lib = work / "lib"
        built = [(path, path.relative_to(lib).as_posix()) for path in _extensions(lib)]
        expected = len(native.COMPILED_MODULES) + 1  # the modules and their shared library
        if len(built) != expected or not all(rel.startswith("asyncfront/") for _, rel in built):
            raise RuntimeError(
                f"mypyc built {[rel for _, rel in built]}, expected {expected} modules"
            )
        print(f"compiled {len(built)} extension modules for Python {sys.version.split()[0]}")
        return built
