"""Open a report in headless Chromium: a PNG screenshot, and a check that every plot decoded.

    python -m sae.eval.screenshot runs/x/final/topk/eval/report.html report.png

prints how many images loaded (from the page's own ``data-images-ok`` mark, read through
``--dump-dom``) and writes the screenshot; exits 1 if an image is broken. Needs the Debian
``chromium`` package (``launch/setup.sh`` installs it when run as root) or any Chrome on PATH.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=5000"]


def find_browser() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium on PATH; install it (Debian: apt-get install chromium, or bash "
                                "launch/setup.sh as root)")
    with tempfile.TemporaryDirectory(prefix="sae-chromium-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def screenshot(html: str | Path, png: str | Path, width: int = 1200, height: int = 2000,
               timeout: float = 120) -> Path:
    """Render ``html`` at ``width`` x ``height`` into ``png``.

    Raises:
        FileNotFoundError: no browser. RuntimeError: the browser wrote no screenshot.
    """
    html, png = Path(html).resolve(), Path(png).resolve()
    png.unlink(missing_ok=True)
    proc = _run([f"--screenshot={png}", f"--window-size={width},{height}", html.as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {html} (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def images_loaded(html: str | Path, timeout: float = 120) -> tuple[int, int]:
    """(images decoded, images on the page) after the page's load event, via ``--dump-dom``.

    Raises:
        RuntimeError: the page never set its ``data-images-ok`` mark (scripts did not run).
    """
    proc = _run(["--dump-dom", Path(html).resolve().as_uri()], timeout)
    m = re.search(r'data-images-ok="(\d+)/(\d+)"', proc.stdout)
    if m is None:
        raise RuntimeError(f"the page set no data-images-ok mark (exit {proc.returncode}); stderr: "
                           f"{proc.stderr[-2000:]}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args(argv)
    ok, total = images_loaded(args.html)
    path = screenshot(args.html, args.png, args.width, args.height)
    print(f"images decoded: {ok}/{total}; screenshot: {path}")
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
