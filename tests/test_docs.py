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
