"""Screenshot an onnxws HTML report in headless Chromium (to check what a person sees).

    python tools/screenshot_report.py path/to/report.html out.png [--height 3000]

Needs Debian's Chromium (`apt-get install -y chromium`); exits 1 with a message if it is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("error: Chromium not found; install it with `apt-get install -y chromium`", file=sys.stderr)
        return 1
    if not args.html.is_file():
        print(f"error: no such report: {args.html}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}", "--hide-scrollbars",
               f"--screenshot={args.png.resolve()}", args.html.resolve().as_uri()]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not args.png.exists():
        print(f"error: Chromium failed ({result.returncode}): {result.stderr.strip()[-300:]}", file=sys.stderr)
        return 1
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
