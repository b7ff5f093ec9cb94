"""The Python code blocks in the README and docs run as written.

Plain ``python`` blocks are executed; blocks written as an interactive session
(``>>>``) are checked with doctest, the blocks of one document forming one session.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for path in DOCS:
        for i, match in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
            if not match.group(1).lstrip().startswith(">>>"):
                found.append((path.name, i, match.group(1)))
    return found


def _sessions() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        blocks = [m.group(1) for m in BLOCK.finditer(text) if m.group(1).lstrip().startswith(">>>")]
        if blocks:
            found.append((path.name, "\n".join(blocks)))
    return found


@pytest.mark.parametrize(("doc", "index", "code"), _blocks(), ids=lambda v: str(v)[:24])
def test_code_block_runs(
    doc: str, index: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each python block of the docs executes without error."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{doc}[{index}]", "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize(("doc", "session"), _sessions(), ids=lambda v: str(v)[:24])
def test_interactive_session_matches(
    doc: str, session: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The >>> sessions of each document print what the document says they print."""
    monkeypatch.chdir(tmp_path)
    parser = doctest.DocTestParser()
    test = parser.get_doctest(session, {"__name__": "__docs__"}, doc, doc, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {doc} failed"


# -- the set-up commands: one set, the one CI runs ---------------------------------------

SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def _section(path: Path, heading: str) -> str:
    """The text of ``path`` from ``heading`` up to the next heading of its level."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    return text[start : end if end >= 0 else len(text)]


def _commands(path: Path, heading: str) -> list[str]:
    """The shell commands of the ``sh`` blocks in one section of a Markdown file."""
    blocks = SH_BLOCK.findall(_section(path, heading))
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_docs_install_commands_are_the_readmes_set_up_commands() -> None:
    """docs/index.md's install commands are exactly the README's set-up commands."""
    readme = _commands(ROOT / "README.md", "## Set-up")
    assert len(readme) == 2 and all(c.startswith("python3 -m venv .venv && ") for c in readme)
    assert _commands(ROOT / "docs" / "index.md", "## Install") == readme


def test_ci_runs_the_readmes_set_up_commands_verbatim() -> None:
    """.ci/run runs each README set-up command as written, so the documented commands work."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in _commands(ROOT / "README.md", "## Set-up"):
        assert command in ci, command


def test_no_hint_tells_a_checkout_user_to_install_from_an_index() -> None:
    """No message or doc says pip install 'asyncfront[...]', which a checkout cannot run."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("asyncfront", "docs", "examples")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.suffix in {".py", ".md"}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "install 'asyncfront[" in line and path.name != "_install.py"
    ]
    offenders += [
        f"README.md:{n}"
        for n, line in enumerate((ROOT / "README.md").read_text("utf-8").splitlines(), start=1)
        if "install 'asyncfront[" in line
    ]
    assert offenders == []


def test_a_missing_demo_package_names_the_checkout_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The demo's missing-package error says .venv/bin/pip install -e '.[demo]', from the root."""
    import importlib.util
    import tomllib

    from asyncfront._install import install_hint
    from asyncfront.demo import DemoDependencyError
    from asyncfront.demo._deps import require

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"][
        "optional-dependencies"
    ]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pocketsphinx" else real(name)
    )
    with pytest.raises(DemoDependencyError) as error:
        require("pocketsphinx")
    message = str(error.value)
    assert f"install -e '.[demo]' (from the repository root, {ROOT})" in message
    command = message.split(": ", 1)[1].split(" (from")[0]
    assert command.endswith("pip install -e '.[demo]'") and "demo" in extras
    for extra in ("torch", "gds", "demo"):
        assert extra in extras and f"'.[{extra}]'" in install_hint(extra)
