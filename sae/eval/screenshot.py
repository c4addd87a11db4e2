"""Open a report in headless Chromium: a PNG screenshot, and checks that it rendered.

    python -m sae.eval.screenshot runs/x/final/topk/eval/report.html report.png

Two browser runs at the same window width: ``--dump-dom`` reads the marks the page's own script
sets after its load event (images decoded, the page boxes of images, tables and latent dashboard
panels, and the page height), then ``--screenshot`` renders the whole page (window as tall as the
page, at most ``max_height``). Every image, table or panel box inside the screenshot must hold
pixels that are not uniform (a broken or empty image renders blank). Prints the result and exits
1 on any failure. Needs the Debian ``chromium`` package (``launch/setup.sh`` installs it when
run as root) or any Chrome on PATH.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=5000"]
Box = tuple[int, int, int, int]


@dataclass
class PageMarks:
    """What the page's script recorded after its load event."""

    images_ok: int
    images: int
    image_boxes: list[Box]
    table_boxes: list[Box]
    panel_boxes: list[Box]
    """Latent dashboard panels (histogram, promoted/suppressed tokens, neighbours)."""
    height: int
    """Page height in CSS pixels (0 when the page did not say)."""


@dataclass
class PageCheck:
    images_ok: int
    images: int
    image_boxes: list[Box]
    table_boxes: list[Box]
    panel_boxes: list[Box]
    blank: list[Box]
    """Image/table/panel boxes inside the screenshot whose pixels are uniform."""
    screenshot_height: int

    @property
    def ok(self) -> bool:
        return self.images > 0 and self.images_ok == self.images and bool(self.table_boxes) and not self.blank


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


def _boxes(dom: str, attr: str) -> list[Box]:
    m = re.search(rf'{attr}="([^"]*)"', dom)
    if m is None or not m.group(1):
        return []
    return [tuple(int(v) for v in part.split(",")) for part in m.group(1).split(";")]


def page_marks(html: str | Path, width: int = 1200, height: int = 2000, timeout: float = 120) -> PageMarks:
    """The marks the page's script set after its load event.

    Raises:
        RuntimeError: the page set no ``data-images-ok`` mark (its script did not run).
    """
    proc = _run(["--dump-dom", f"--window-size={width},{height}", Path(html).resolve().as_uri()], timeout)
    m = re.search(r'data-images-ok="(\d+)/(\d+)"', proc.stdout)
    if m is None:
        raise RuntimeError(f"the page set no data-images-ok mark (exit {proc.returncode}); stderr: "
                           f"{proc.stderr[-2000:]}")
    h = re.search(r'data-page-height="(\d+)"', proc.stdout)
    return PageMarks(int(m.group(1)), int(m.group(2)), _boxes(proc.stdout, "data-image-boxes"),
                     _boxes(proc.stdout, "data-table-boxes"), _boxes(proc.stdout, "data-panel-boxes"),
                     int(h.group(1)) if h else 0)


def blank_boxes(png: str | Path, boxes: list[Box], min_std: float = 2.0) -> list[Box]:
    """Boxes (clipped to the image) whose pixels are uniform: grey-level std below ``min_std``."""
    from PIL import Image, ImageStat

    img = Image.open(png).convert("L")
    out = []
    for x, y, w, h in boxes:
        left, top, right, bottom = max(x, 0), max(y, 0), min(x + w, img.width), min(y + h, img.height)
        if right - left < 4 or bottom - top < 4:
            continue  # below the fold of the screenshot
        if ImageStat.Stat(img.crop((left, top, right, bottom))).stddev[0] < min_std:
            out.append((x, y, w, h))
    return out


def check_report(html: str | Path, png: str | Path, width: int = 1200, height: int = 2000,
                 max_height: int = 16000) -> PageCheck:
    """Screenshot the whole of ``html`` (up to ``max_height`` pixels) into ``png`` and check that
    images decoded and that image, table and panel areas are not blank."""
    m = page_marks(html, width, height)
    shot_h = max(height, min(m.height, max_height))
    screenshot(html, png, width, shot_h)
    return PageCheck(m.images_ok, m.images, m.image_boxes, m.table_boxes, m.panel_boxes,
                     blank_boxes(png, m.image_boxes + m.table_boxes + m.panel_boxes), shot_h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2000, help="window height for layout (the screenshot is as tall "
                    "as the page, up to --max-height)")
    ap.add_argument("--max-height", type=int, default=16000)
    args = ap.parse_args(argv)
    check = check_report(args.html, args.png, args.width, args.height, args.max_height)
    print(f"images decoded: {check.images_ok}/{check.images}; tables: {len(check.table_boxes)}; dashboard panels: "
          f"{len(check.panel_boxes)}; blank areas: {len(check.blank)}; screenshot ({check.screenshot_height} px "
          f"tall): {Path(args.png).resolve()}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
