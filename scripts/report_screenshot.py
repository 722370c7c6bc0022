"""Screenshot a report.html in headless Chromium, scaled down and palette-compressed for the README.

    .venv/bin/python scripts/report_screenshot.py out/report.html docs/report.png
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

WIDTH, HEIGHT, SHOWN_WIDTH = 1280, 1500, 860


def main(html: str, png: str) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={tmp}/profile", f"--window-size={WIDTH},{HEIGHT}",
                        f"--screenshot={shot}", Path(html).resolve().as_uri()], check=True, capture_output=True)
        with Image.open(shot) as im:
            small = im.convert("RGB").resize((SHOWN_WIDTH, HEIGHT * SHOWN_WIDTH // WIDTH), Image.Resampling.LANCZOS)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    small.quantize(colors=64).save(png, optimize=True)  # a few dozen KB: fine to keep in the repository
    print(f"{png}: {Path(png).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
