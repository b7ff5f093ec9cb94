"""What to run to install an optional extra, worded for where asyncfront runs from."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ("install_hint",)


def install_hint(extra: str) -> str:
    """The command that installs asyncfront's optional ``extra`` for this interpreter.

    From a source checkout (a ``pyproject.toml`` beside the package) that is an editable
    install of the checkout with the extra, run from the repository root:
    ``.venv/bin/pip install -e '.[demo]'`` when this interpreter is the checkout's
    ``.venv``, else this interpreter's ``python -m pip``. An installed distribution gets
    ``pip install 'asyncfront[demo]'``.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        return f"pip install 'asyncfront[{extra}]'"
    executable = Path(sys.executable)
    try:
        inside = executable.absolute().relative_to(root)
    except ValueError:
        pip = f"{executable} -m pip"
    else:
        pip = f"{inside.parent}/pip" if inside.parts[:1] == (".venv",) else f"{inside} -m pip"
    return f"{pip} install -e '.[{extra}]' (from the repository root, {root})"
