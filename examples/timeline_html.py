"""Write the voice demo's HTML timeline, and optionally a screenshot of it.

    python examples/timeline_html.py traces/voice.html
    python examples/timeline_html.py traces/voice.html --screenshot docs/img/timeline.png

The screenshot needs Chromium (``apt-get install chromium``) on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncfront as af
from asyncfront.scenarios.laptop_voice import laptop_devices, run_voice_pipeline
from asyncfront.testing import run_virtual


async def voice_trace() -> af.TraceRecorder:
    """Two voice turns beside background indexing, traced."""
    async with af.open_runtime(laptop_devices()) as rt:
        await run_voice_pipeline(rt, utterances=2, batches=8)
    return rt.trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", help="where to write the HTML timeline")
    parser.add_argument("--screenshot", default=None, help="a PNG of the page, via Chromium")
    args = parser.parse_args()
    trace = run_virtual(voice_trace)
    os.makedirs(os.path.dirname(os.path.abspath(args.html)), exist_ok=True)
    trace.export_html(
        args.html,
        title="laptop voice-to-chat: two voice turns beside background indexing (virtual time)",
    )
    print(f"HTML timeline written to {args.html}")
    if args.screenshot:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            print("no Chromium on PATH: no screenshot", file=sys.stderr)
            return 1
        shot = os.path.abspath(args.screenshot)
        url = Path(args.html).resolve().as_uri()
        subprocess.run(
            [
                chromium,
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--hide-scrollbars",
                "--window-size=1400,400",
                f"--screenshot={shot}",
                url,
            ],
            check=True,
            capture_output=True,
        )
        print(f"screenshot written to {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
