"""Screenshots of the built site, to check how it looks.

    python docs/screenshots.py [OUT_DIR]      # default OUT_DIR: docs/_screenshots/ (gitignored)

Builds the site (``mkdocs build --strict``) into a temporary folder, serves it with
``python -m http.server`` on 127.0.0.1 at a free port, takes a screenshot of the home, getting
started, how it works, benchmarks and API pages with headless Chromium, then stops the server.
Needs ``chromium`` (Debian: ``apt-get install -y chromium``). The formulas are MathML rendered at
build time (``docs/hooks.py``): they show as typeset math offline too, drawn by the browser itself.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = {
    "home": "",
    "getting-started": "getting-started/",
    "how-it-works": "how-it-works/",
    "benchmarks": "benchmarks/",
    "api": "api/",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("chromium not found: apt-get update && apt-get install -y chromium")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=ROOT / "docs" / "_screenshots")
    ap.add_argument("--size", default="1280,1600", help="window size, WIDTH,HEIGHT")
    args = ap.parse_args()
    browser = _chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                       cwd=ROOT, check=True)
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}/"
            for _ in range(100):
                try:
                    urllib.request.urlopen(base, timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            for name, path in PAGES.items():
                png = (args.out / f"{name}.png").resolve()
                subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--screenshot={png}", f"--window-size={args.size}", base + path],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
                print(png)
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
