"""What every benchmark shares: interleaved runs, medians with spread, and its docs section.

Each benchmark measures its cases in rounds (every case once per round, so slow phases
of a shared machine land on all of them), reports the median and the range of the
samples, and rewrites its own section of ``docs/benchmarks.md`` between two markers,
with the command, the machine and the commit it measured, so no figure there is older
than the code it describes.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Figure:
    """Samples of one case: the median and the spread (min..max) of what was measured."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def format(self, digits: int = 2) -> str:
        """``median (low-high)``."""
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def interleaved(cases: Sequence[tuple[str, Callable[[], float]]], rounds: int) -> dict[str, Figure]:
    """Run every case once per round, ``rounds`` times; each call returns one sample."""
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(rounds):
        for name, run in cases:
            samples[name].append(run())
    return {name: Figure(tuple(values)) for name, values in samples.items()}


def ratio(ours: Figure, baseline: Figure) -> str:
    """The ratio of the medians, and the range of the per-round ratios."""
    per_round = [a / b for a, b in zip(ours.samples, baseline.samples, strict=True)]
    return f"{ours.median / baseline.median:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


def machine() -> str:
    """One line naming the machine: cores, processor, memory, OS, Python (and torch)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            kib = int(info.readline().split()[1])
            memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    parts = [f"{os.cpu_count()} cores ({cpu}){memory}", f"{platform.system()} {platform.release()}"]
    parts.append(f"Python {platform.python_version()}")
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def commit() -> str:
    """The commit measured (short hash, ``+changes`` when the tree differs from it)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+changes" if dirty else head


def command() -> str:
    """The command line that ran this benchmark, as a user would type it."""
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return shlex.join(["python", script, *sys.argv[1:]])


def provenance() -> str:
    """The Markdown lines that say how a section's figures were produced."""
    return f"Command: `{command()}`  \nMachine: {machine()}  \nCommit: `{commit()}`"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A Markdown table; ``align`` has one ``l`` or ``r`` per column (default: l, then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_section(name: str, title: str, body: str, path: Path = DOCS) -> None:
    """Replace (or append) the section ``name`` of ``docs/benchmarks.md``.

    A section runs from ``<!-- benchmark:NAME -->`` to ``<!-- /benchmark:NAME -->``;
    everything outside the markers is left as it is.
    """
    begin, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    section = f"{begin}\n## {title}\n\n{body.strip()}\n\n{provenance()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
    print(f"wrote the '{name}' section of {os.path.relpath(path, ROOT)}")


def print_samples(figures: dict[str, Figure]) -> None:
    """Print this process's samples as JSON, as :func:`pure_python_samples` reads them."""
    import asyncfront

    samples = {name: list(f.samples) for name, f in figures.items()}
    print(json.dumps({"core": asyncfront.core_build(), "samples": samples}))


def pure_python_samples(script: str, *args: str) -> dict[str, Figure]:
    """Run ``script`` with ``args --json`` in a child process on the pure-Python core
    (``ASYNCFRONT_PURE_PYTHON=1``) and return the samples it prints (:func:`print_samples`),
    case by case."""
    env = dict(os.environ, ASYNCFRONT_PURE_PYTHON="1")
    argv = [sys.executable, script, *args, "--json"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["core"].startswith("pure Python"), data["core"]
    return {name: Figure(tuple(values)) for name, values in data["samples"].items()}
