"""Checks a built site (``mkdocs build``) works offline: no page loads a script, stylesheet, font or
image from another host, and no formula is left as TeX source for a browser-side renderer.

    python .ci/check_site.py SITE_DIR

Exits 1 listing each offending page and address. Links (``<a href>``) may point anywhere.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# what a page loads by itself: scripts, stylesheets (and preloads/preconnects), images, frames, CSS imports
_LOADS = [
    re.compile(r"<script\b[^>]*\bsrc=[\"']([^\"']+)", re.I),
    re.compile(r"<link\b[^>]*\bhref=[\"']([^\"']+)", re.I),
    re.compile(r"<(?:img|iframe|source|video|audio|embed)\b[^>]*\bsrc=[\"']([^\"']+)", re.I),
    re.compile(r"@import\s+(?:url\()?[\"']?([^\"')\s;]+)", re.I),
    re.compile(r"url\(\s*[\"']?([^\"')]+)", re.I),
]
_REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)
# a formula left for a browser-side renderer: an arithmatex span, or a heading's formula in a table of contents
_TEX = re.compile(r'class="arithmatex">\s*\\[(\[]|<span class="md-ellipsis">[^<]*\\[(\[]')


def problems(site: Path) -> list[str]:
    """Every remote load (``page: address``) and every formula left as TeX, over the site's HTML and CSS."""
    out = []
    for path in sorted([*site.rglob("*.html"), *site.rglob("*.css")]):
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(site)
        for pattern in _LOADS:
            for m in pattern.finditer(text):
                url = m.group(1)
                # a <link> that only names a page (rel="canonical", "alternate"...) loads nothing
                tag = text[m.start() : text.find(">", m.start()) + 1]
                if tag.lower().startswith("<link") and not re.search(
                        r"rel=[\"'](?:stylesheet|preload|preconnect|modulepreload|icon|dns-prefetch)", tag, re.I):
                    continue
                if _REMOTE.match(url):
                    out.append(f"{rel}: loads {url}")
        if path.suffix == ".html" and _TEX.search(text):
            out.append(f"{rel}: a formula left as TeX source")
    return list(dict.fromkeys(out))


def main() -> None:
    site = Path(sys.argv[1])
    if not (site / "index.html").is_file():
        sys.exit(f"{site} is not a built site (no index.html)")
    found = problems(site)
    if found:
        print("The site needs the network:", *found, sep="\n  ")
        sys.exit(1)
    print(f"{site}: no remote script, stylesheet, font or image; every formula rendered")


if __name__ == "__main__":
    main()
