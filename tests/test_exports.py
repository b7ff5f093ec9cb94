"""Public API: every exported name exists, is documented, and importing stays light."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

PACKAGES = [
    "asyncfront",
    "asyncfront.cluster",
    "asyncfront.devices",
    "asyncfront.memory",
    "asyncfront.models",
    "asyncfront.testing",
    "asyncfront.demo",
    "asyncfront.models",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_a_tuple_of_existing_documented_names(package: str) -> None:
    """__all__ is a sorted-unique tuple whose names exist and carry docstrings."""
    module = importlib.import_module(package)
    assert isinstance(module.__all__, tuple)
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            assert inspect.getdoc(obj), f"{package}.{name} has no docstring"


@pytest.mark.parametrize("package", PACKAGES)
def test_public_classes_live_in_private_modules(package: str) -> None:
    """Package __init__ modules only re-export: code lives in private modules."""
    module = importlib.import_module(package)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ != package, f"{package}.{name} is defined in __init__"


def test_import_does_not_load_heavy_dependencies() -> None:
    """import asyncfront (and .demo, .models) loads no torch, transformers, kvikio or ray."""
    heavy = "{'torch', 'transformers', 'pocketsphinx', 'kvikio', 'ray'}"
    modules = "asyncfront, asyncfront.demo, asyncfront.models"
    code = f"import sys, {modules}; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_leaves_the_test_tooling_until_asyncfront_testing_is_used() -> None:
    """import asyncfront loads no pytest nor looptime; asyncfront.testing loads on first use."""
    code = (
        "import sys, asyncfront as af\n"
        "print(sorted({'pytest', 'looptime'} & set(sys.modules)))\n"
        "print(af.testing.run_virtual.__module__, 'looptime' in sys.modules)\n"
        "print(hasattr(af, 'no_such_name'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["[]", "asyncfront.testing._virtual True", "False"]
