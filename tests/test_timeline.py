"""The HTML timeline: one self-contained page built from the Perfetto document."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront.__main__ import main
from asyncfront._timeline import read_trace, render_html
from asyncfront.scenarios.laptop_voice import laptop_devices, run_voice_pipeline
from asyncfront.testing import FakeDevice, run_virtual


def _voice_trace() -> af.TraceRecorder:
    async def body() -> af.TraceRecorder:
        async with af.open_runtime(laptop_devices()) as rt:
            await run_voice_pipeline(rt, utterances=2, batches=6)
        return rt.trace

    return run_virtual(body)


def _failing_trace() -> af.TraceRecorder:
    async def body() -> af.TraceRecorder:
        gpu = FakeDevice("gpu")
        async with af.open_runtime([gpu]) as rt:
            gpu.fail_next(name="bad")
            q = rt.queue("gpu", name="gpu.main")
            q.submit(name="good", cost=1.0)
            bad = q.submit(name="bad", cost=1.0)
            with pytest.raises(af.testing.FakeDeviceError):
                await bad
        return rt.trace

    return run_virtual(body)


def _embedded(page: str) -> dict[str, Any]:
    start = page.index('id="trace-data">') + len('id="trace-data">')
    end = page.index("</script>", start)
    data: dict[str, Any] = json.loads(page[start:end])
    return data


def test_page_embeds_the_perfetto_document(tmp_path: Path) -> None:
    """export_html writes one page whose data is exactly to_perfetto()'s document."""
    trace = _voice_trace()
    path = tmp_path / "timeline.html"
    trace.export_html(path, title="voice <demo>")
    page = path.read_text(encoding="utf-8")
    assert _embedded(page) == trace.to_perfetto()
    assert "<title>voice &lt;demo&gt;</title>" in page
    # Self-contained: nothing is fetched from anywhere.
    for needle in ("http://", "https://", "src=", "<link"):
        assert needle not in page.replace("http://www.w3.org/2000/svg", "")


def test_script_end_in_a_name_cannot_break_the_page() -> None:
    """A '</script>' inside a submission name stays data, escaped in the embedded JSON."""
    doc = {"traceEvents": [{"name": "</script><b>", "ph": "X", "ts": 0, "dur": 1, "pid": 1}]}
    page = render_html(doc)
    assert "</script><b>" not in page
    assert _embedded(page) == doc


def test_render_rejects_what_is_not_a_trace(tmp_path: Path) -> None:
    """render_html and read_trace refuse documents without traceEvents, and accept a bare list."""
    with pytest.raises(ValueError, match="traceEvents"):
        render_html({"events": []})
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a Chrome trace-event document"):
        read_trace(bad)
    bare = tmp_path / "bare.json"
    bare.write_text("[]")
    assert read_trace(bare) == {"traceEvents": []}


def test_cli_trace_view_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`asyncfront trace view TRACE.json -o OUT.html` turns an exported trace into the page."""
    trace = _voice_trace()
    source = tmp_path / "voice.json"
    trace.export_perfetto(source)
    out = tmp_path / "out.html"
    assert main(["trace", "view", str(source), "-o", str(out)]) == 0
    assert _embedded(out.read_text(encoding="utf-8")) == json.loads(source.read_text())
    assert str(out) in capsys.readouterr().out
    assert main(["trace", "view", str(source)]) == 0  # default: next to the trace
    assert (tmp_path / "voice.html").exists()


def test_cli_trace_view_reports_a_bad_file(tmp_path: Path) -> None:
    """A missing or malformed trace file is a usage error, not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["trace", "view", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2


# -- in a browser ------------------------------------------------------------------------


def _chromium() -> str | None:
    """The Chromium binary: $ASYNCFRONT_CHROMIUM, else chromium or chrome on PATH."""
    explicit = os.environ.get("ASYNCFRONT_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    command += ["--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


_PROBE = """<script>
(function () {
  var body = document.body, bar = document.querySelector("rect.bar");
  bar.dispatchEvent(new MouseEvent("mouseenter", {clientX: 300, clientY: 100}));
  body.setAttribute("data-tooltip", document.getElementById("tooltip").textContent);
  var before = bar.getBBox().width;
  document.getElementById("zoom-in").click();
  body.setAttribute("data-zoomed", bar.getBBox().width / before);
  var x = bar.getBBox().x, chart = document.getElementById("chart");
  chart.dispatchEvent(new MouseEvent("mousedown", {clientX: 400, bubbles: true}));
  window.dispatchEvent(new MouseEvent("mousemove", {clientX: 450}));
  window.dispatchEvent(new MouseEvent("mouseup", {clientX: 450}));
  body.setAttribute("data-panned", bar.getBBox().x - x);
  document.getElementById("zoom-reset").click();
  var fit = bar.getBBox().width;
  chart.dispatchEvent(new WheelEvent("wheel", {deltaY: -100, clientX: 600, cancelable: true}));
  body.setAttribute("data-wheeled", bar.getBBox().width / fit);
})();
</script>
"""


class _Elements(HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))

    def with_class(self, name: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.found if name in (a.get("class") or "").split()]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["voice", "failing"])
def test_page_draws_the_trace_in_chromium(which: str, tmp_path: Path) -> None:
    """In headless Chromium: no console errors, a lane per queue, a bar per submission."""
    binary = _chromium()
    if binary is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set ASYNCFRONT_CHROMIUM)")
    trace = _voice_trace() if which == "voice" else _failing_trace()
    doc = trace.to_perfetto()
    page = tmp_path / "timeline.html"
    trace.export_html(page)
    url = page.as_uri()

    dumped = _run_chromium(binary, "--dump-dom", url)
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "\n".join(console)
    dom = _Elements()
    dom.feed(dumped.stdout)
    body = next(attrs for tag, attrs in dom.found if tag == "body")
    assert body.get("data-ready") == "1" and "data-errors" not in body

    queues = [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"]
    devices = [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"]
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    flows = {e["id"] for e in doc["traceEvents"] if e["ph"] in {"s", "f"}}
    lanes = dom.with_class("lane")
    assert sorted(str(a["data-queue"]) for a in lanes) == sorted(queues)
    assert sorted(str(a["data-device"]) for a in dom.with_class("device-row")) == sorted(devices)
    bars = dom.with_class("bar")
    assert len(bars) == len(slices)
    assert sorted(str(b["data-name"]) for b in bars) == sorted(e["name"] for e in slices)
    assert len(dom.with_class("failed")) == sum(e["cat"] == "failed" for e in slices)
    assert len(dom.with_class("arrow")) == len(flows)
    assert all(float(str(b["width"])) > 0 for b in bars)

    # Hover, zoom and pan, driven by a probe script appended to a copy of the page.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"))
    probed = _run_chromium(binary, "--dump-dom", probe.as_uri())
    console = [line for line in probed.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "\n".join(console)
    results = _Elements()
    results.feed(probed.stdout)
    body = next(attrs for tag, attrs in results.found if tag == "body")
    assert "data-errors" not in body
    tooltip = str(body["data-tooltip"])
    first = slices[0]
    assert first["name"] in tooltip and "frontier" in tooltip and "duration" in tooltip
    assert float(str(body["data-zoomed"])) == pytest.approx(2.0, rel=0.01)
    assert float(str(body["data-panned"])) == pytest.approx(50.0, abs=0.5)
    assert float(str(body["data-wheeled"])) == pytest.approx(1.25, rel=0.01)

    shot = tmp_path / "timeline.png"
    _run_chromium(binary, f"--screenshot={shot}", "--window-size=1400,420", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
