"""The HTML timeline: one self-contained page built from the Perfetto document."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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


# -- what a person sees: order, counts, titles, arrows ------------------------------------


def _ordering_trace() -> af.TraceRecorder:
    """Four GPUs met out of name order, a cross-lane and a same-lane dependency, a collective."""

    async def body() -> af.TraceRecorder:
        devices = [FakeDevice(name) for name in ("gpu10", "gpu1", "gpu2", "gpu0")]
        async with af.open_runtime(devices) as rt:
            ready, steps = af.TimelineSemaphore(name="ready"), af.TimelineSemaphore(name="steps")
            q10, q1 = rt.queue("gpu10"), rt.queue("gpu1")
            q10.submit(name="produce", cost=1.0, signals=[(ready, 1)])
            q1.submit(name="consume", cost=2.0, waits=[(ready, 1)])  # starts as produce ends
            q10.submit(name="same-lane", cost=0.5, waits=[(ready, 1)])
            ring = rt.collective([rt.queue("gpu2"), rt.queue("gpu0")], name="ring")
            for k in range(3):
                waits = [(steps, k)] if k else []
                ring.submit(name=f"step{k}", waits=waits, signals=[(steps, k + 1)], cost=1.0)
            await q1.submit(name="after", cost=1.0, waits=[(steps, 3)])
        return rt.trace

    return run_virtual(body)


_GEOMETRY_PROBE = """<script>
(function () {
  var body = document.body, bars = document.querySelectorAll("rect.bar"), report = [];
  document.querySelectorAll("path.arrow").forEach(function (path) {
    var length = path.getTotalLength(), end = path.getPointAtLength(length);
    var box = bars[+path.getAttribute("data-target")].getBBox(), maxX = -Infinity;
    for (var i = 0; i <= 50; i++) maxX = Math.max(maxX, path.getPointAtLength(length * i / 50).x);
    report.push({ semaphore: path.getAttribute("data-semaphore"), end: [end.x, end.y],
                  box: [box.x, box.y, box.width, box.height], max_x: maxX });
  });
  var rows = Array.from(document.querySelectorAll("g.device-row")).map(function (g) {
    return [g.getAttribute("data-device"), g.querySelector("rect").getBBox().y];
  });
  body.setAttribute("data-geometry", JSON.stringify({ arrows: report, rows: rows }));
})();
</script>
"""


def _probe_page(binary: str, page: Path, probe: str) -> dict[str, str | None]:
    """The body's attributes after ``probe`` ran in the page, checked free of errors."""
    probed = page.with_name("probed-" + page.name)
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"))
    dumped = _run_chromium(binary, "--dump-dom", probed.as_uri())
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "\n".join(console)
    dom = _Elements()
    dom.feed(dumped.stdout)
    body = next(attrs for tag, attrs in dom.found if tag == "body")
    assert body.get("data-ready") == "1" and "data-errors" not in body
    summary = re.search(r'<span id="summary">(.*?)</span>', dumped.stdout)
    body["summary"] = summary.group(1) if summary else None
    return body


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = _chromium()
    if binary is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set ASYNCFRONT_CHROMIUM)")
    return binary


def test_devices_sort_by_name_and_arrows_end_inside_their_target(
    chromium: str, tmp_path: Path
) -> None:
    """In Chromium: gpu0, gpu1, gpu2, gpu10 top to bottom; each arrow's tip inside its bar."""
    trace = _ordering_trace()
    met = [e["args"]["name"] for e in trace.to_perfetto()["traceEvents"]
           if e["name"] == "process_name"]  # fmt: skip
    assert met != sorted(met, key=lambda n: int(n[3:]))  # the trace meets them out of order
    page = tmp_path / "ordering.html"
    trace.export_html(page)
    body = _probe_page(chromium, page, _GEOMETRY_PROBE)
    geometry = json.loads(str(body["data-geometry"]))
    rows = geometry["rows"]
    assert [name for name, _ in rows] == ["gpu0", "gpu1", "gpu2", "gpu10"]
    assert [y for _, y in rows] == sorted(y for _, y in rows)
    arrows = geometry["arrows"]
    assert sorted(a["semaphore"] for a in arrows) == ["ready"] * 2 + ["steps"] * 5
    for arrow in arrows:
        (ex, ey), (bx, by, bw, bh) = arrow["end"], arrow["box"]
        assert bx < ex <= bx + bw and by <= ey <= by + bh, arrow  # the tip is in the box
        assert arrow["max_x"] <= ex + 0.5, arrow  # and the curve never passes it
    assert body["summary"] == "4 devices, 4 queues, 10 submissions, 7 dependencies, 4 s long"


def test_a_one_device_page_says_device_and_counts_collective_steps(
    chromium: str, tmp_path: Path
) -> None:
    """'1 device, 1 queue', and waits on a collective step's signals count as dependencies."""

    async def body() -> af.TraceRecorder:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            steps = af.TimelineSemaphore(name="steps")
            ring = rt.collective([rt.queue("gpu")], name="solo")
            ring.submit(name="first", signals=[(steps, 1)], cost=1.0)
            await ring.submit(name="second", waits=[(steps, 1)], cost=1.0)
        return rt.trace

    page = tmp_path / "one.html"
    run_virtual(body).export_html(page)
    summary = _probe_page(chromium, page, "")["summary"]
    assert summary == "1 device, 1 queue, 2 submissions, 1 dependency, 2 s long"


def test_simulate_writes_a_titled_html_timeline_beside_its_trace(tmp_path: Path) -> None:
    """simulate writes NAME.html beside NAME.json, titled with the scenario; trace view keeps it."""
    trace = tmp_path / "b4.json"
    out = subprocess.run(
        [sys.executable, "-m", "asyncfront", "simulate", "streaming_translation",
         "--depth", "2", "--trace", str(trace)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    page = tmp_path / "b4.html"
    assert f"HTML timeline written to {page}" in out.stdout
    title = "asyncfront simulate streaming_translation (B4): six-stage streaming translation"
    text = page.read_text(encoding="utf-8")
    assert f"<title>{title}" in text and f"<h1>{title}" in text
    assert _embedded(text)["otherData"]["title"].startswith(title)
    again = tmp_path / "again.html"
    assert main(["trace", "view", str(trace), "-o", str(again)]) == 0
    assert f"<title>{title}" in again.read_text(encoding="utf-8")


def _text_timeline(costs: list[float], width: int) -> str:
    async def body() -> str:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu", name="dense")
            for n, cost in enumerate(costs):
                last = q.submit(name=f"s{n}", cost=cost)
            await last
        return rt.trace.format_timeline(width=width)

    return run_virtual(body)


def test_the_text_timeline_keeps_back_to_back_submissions_apart() -> None:
    """Eight back-to-back submissions read as ##==##==..., not one solid bar."""
    text = _text_timeline([1.0] * 8, width=16)
    assert "dense [##==##==##==##==]" in text.splitlines()


def test_the_text_timeline_counts_submissions_too_short_to_draw() -> None:
    """Cells holding many short submissions show their count (* for ten or more)."""
    text = _text_timeline([0.25] * 12 + [3.0], width=6)  # 4 per cell in the first 3 cells
    row = next(line for line in text.splitlines() if line.startswith("dense"))
    assert row == "dense [444###]"
    assert "2-9,* submissions started in one cell" in text
    many = _text_timeline([0.01] * 30 + [1.0], width=2)
    assert "dense [*#]" in many.splitlines()
