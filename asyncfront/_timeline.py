"""The HTML timeline: one self-contained page drawn from a Chrome trace-event document.

The page embeds the same document :meth:`TraceRecorder.to_perfetto` produces (and
``export_perfetto`` writes), so the JSON and the picture cannot disagree: a lane per
queue grouped by device, a bar per submission, an arrow per semaphore dependency,
the frontier and timings on hover, zoom and pan. No network, no CDN.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

__all__ = ("dropped_notice", "read_trace", "render_html", "trace_title", "write_html")

DEFAULT_TITLE = "asyncfront timeline"


def trace_title(document: Mapping[str, Any]) -> str | None:
    """The title a trace-event document carries in ``otherData.title``, if any.

    ``python -m asyncfront demo`` and ``simulate`` store what the run was there, so a
    page made later with ``trace view`` gets the same title.
    """
    other = document.get("otherData")
    title = other.get("title") if isinstance(other, Mapping) else None
    return title if isinstance(title, str) and title else None


def render_html(document: Mapping[str, Any], *, title: str | None = None) -> str:
    """The timeline page for a trace-event document (``{"traceEvents": [...]}``).

    ``title`` defaults to the document's own (:func:`trace_title`), else
    ``DEFAULT_TITLE``.
    """
    if not isinstance(document.get("traceEvents"), list):
        raise ValueError("not a Chrome trace-event document: no 'traceEvents' list")
    if title is None:
        title = trace_title(document) or DEFAULT_TITLE
    template = resources.files(__package__).joinpath("_timeline.html").read_text("utf-8")
    # "<" escaped inside the JSON so no "</script>" in a name can end the data block.
    data = json.dumps(document, separators=(",", ":")).replace("<", "\\u003c")
    page = template.replace("__TITLE__", html.escape(title)).replace("__TRACE__", data)
    notice = dropped_notice(document)
    if notice:
        page = page.replace(
            "<body>",
            f'<body>\n<p id="dropped" style="{_NOTICE_STYLE}">{html.escape(notice)}</p>',
            1,
        )
    return page


_NOTICE_STYLE = "margin:0;padding:6px 12px;background:#5a4a12;color:#ffe9a8;font:13px sans-serif"


def dropped_notice(document: Mapping[str, Any]) -> str | None:
    """The line saying how many older records the trace dropped, or None if it kept all.

    Read from the document's ``otherData`` (as :meth:`TraceRecorder.to_perfetto` writes it),
    so a timeline drawn from a saved JSON file says it too.
    """
    other = document.get("otherData")
    dropped = other.get("dropped_records") if isinstance(other, Mapping) else None
    if not isinstance(dropped, int) or isinstance(dropped, bool) or dropped <= 0:
        return None
    kept = other.get("records") if isinstance(other, Mapping) else None
    shown = f"; the {kept:,} most recent are shown" if isinstance(kept, int) else ""
    return f"{dropped:,} older submissions were dropped from the trace{shown}."


def write_html(
    document: Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None
) -> None:
    """Write :func:`render_html` of ``document`` to ``path``."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(render_html(document, title=title))


def read_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a trace-event JSON file (as ``export_perfetto`` writes it).

    A bare list of events, which Chrome also accepts, is wrapped into a document.

    Raises:
        ValueError: the file holds no trace events.
    """
    with open(path, encoding="utf-8") as source:
        document = json.load(source)
    if isinstance(document, list):
        document = {"traceEvents": document}
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise ValueError(f"{os.fspath(path)!r} is not a Chrome trace-event document")
    return document
