"""The README's picture of the report, taken from a real run's reports/report.html: the title,
then everything from one heading on (the setup tables are long and the same for every run),
as headless Chromium shows it, trimmed of the empty page below.

    uv run python bench/report_picture.py --report reports/report.html --out docs/report.png
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.common import PipelineError, atomic_path, run_cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def from_heading(html: str, heading: str) -> str:
    """`html` with the content between its <h1> and the <h2> named `heading` left out."""
    title = html.find("</h1>")
    start = html.find(f"<h2>{heading}</h2>")
    if title < 0 or start < 0:
        found = ", ".join(re.findall(r"<h2>([^<]*)</h2>", html)) or "none"
        raise PipelineError(f"--from {heading!r}: no such heading in the report (it has: {found})")
    title += len("</h1>")
    return html[:title] + html[start:]


def trimmed(image: Image.Image, margin: int = 24) -> Image.Image:
    """The image cut below its last row that is not plain background."""
    pixels = np.asarray(image.convert("L"))
    rows = np.flatnonzero((pixels < 250).any(axis=1))
    bottom = min(pixels.shape[0], (rows[-1] + 1 + margin) if len(rows) else pixels.shape[0])
    return image.crop((0, 0, image.width, bottom))


def screenshot(html: str, out: Path, width: int, height: int) -> None:
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise PipelineError(f"no browser found ({', '.join(BROWSERS)}): install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        page, shot = Path(tmp) / "report.html", Path(tmp) / "shot.png"
        page.write_text(html)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        size = f"--window-size={width},{height}"
        cmd = [browser, *flags, size, f"--screenshot={shot}", page.as_uri()]
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        if not shot.is_file():
            raise PipelineError(f"{browser} wrote no screenshot of {page.name}")
        with atomic_path(out) as tmp_out:
            trimmed(Image.open(shot)).save(tmp_out, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("reports/report.html"))
    parser.add_argument("--out", type=Path, default=Path("docs/report.png"))
    parser.add_argument("--from", dest="heading", default="Test metrics", help="first heading")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4000, help="cut to the content below")
    args = parser.parse_args(argv)
    try:
        html = args.report.read_text()
    except OSError as exc:
        raise PipelineError(f"--report {args.report}: {exc.strerror}") from None
    screenshot(from_heading(html, args.heading), args.out, args.width, args.height)
    print(args.out)


if __name__ == "__main__":
    run_cli(main)
