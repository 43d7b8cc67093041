"""The front pages and the site: tables that render on the package index and the repository hosts,
formulas rendered at build time, no remote asset.

* README.md and PYPI.md rendered with a CommonMark + GFM-tables renderer (markdown-it-py, as the
  repository hosts and the package index read them): every table row has the header's number of
  cells, none empty (a ``|`` inside a cell, even in backticks, splits it);
* ``docs/hooks.py`` turns every formula into MathML; ``.ci/check_site.py`` (run on the built site by
  ``.ci/run``) finds a page that loads anything from another host or leaves a formula as TeX.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _source_cells(line: str) -> int:
    """The cells of a table row's source line as GFM splits it: at every unescaped ``|``, code spans too."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return len(re.split(r"(?<!\\)\|", body))


def table_rows(markdown: str) -> list[tuple[int, list[str], list[list[str]]]]:
    """Each table as rendered: (its first line, the header cells, the body rows' cells). A row whose
    source has more cells than it renders (GFM drops the excess) gets an empty cell appended."""
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    lines = markdown.splitlines()
    tables, current, row, line, extra = [], None, None, 0, 0
    for tok in tokens:
        if tok.type == "table_open":
            current, line = [], (tok.map or [0])[0] + 1
        elif tok.type == "tr_open":
            row = []
            extra = _source_cells(lines[tok.map[0]]) if tok.map else 0
        elif tok.type == "inline" and row is not None:
            row.append(tok.content.strip())
        elif tok.type == "tr_close":
            assert current is not None and row is not None
            current.append(row + [""] * max(0, extra - len(row)))
            row = None
        elif tok.type == "table_close":
            assert current
            tables.append((line, current[0], current[1:]))
            current = None
    return tables


def broken_rows(markdown: str) -> list[str]:
    """The rows whose cell count differs from the header's, or with an empty cell."""
    out = []
    for line, header, rows in table_rows(markdown):
        for k, cells in enumerate(rows):
            if len(cells) != len(header) or not all(cells):
                out.append(f"table at line {line}, row {k + 1}: {cells}")
    return out


@pytest.mark.parametrize("name", ["README.md", "PYPI.md"])
def test_every_table_row_renders_with_the_headers_cells(name: str) -> None:
    text = (ROOT / name).read_text(encoding="utf-8")
    tables = table_rows(text)
    assert len(tables) >= 2, f"{name}: its tables were not found"  # the modes and the results tables at least
    assert broken_rows(text) == []
    assert any(any("‖g‖" in c for r in rows for c in r) for _, _, rows in tables)  # the modes table's norm


def test_a_pipe_inside_a_code_span_breaks_the_row() -> None:
    """The check can fail: GFM splits a cell at a ``|`` even inside backticks (what ``||g||`` did)."""
    broken = "| mode | step |\n|---|---|\n| clip | `g * min(1, m / ||g||)` |\n"
    assert len(broken_rows(broken)) == 1
    assert broken_rows(broken.replace("||g||", "‖g‖")) == []


# ---------------------------------------------------------------------------- offline site


def test_formulas_become_mathml() -> None:
    hooks = _load(ROOT / "docs" / "hooks.py")
    page = ('<p>With <span class="arithmatex">\\(0 \\le s \\le 1\\)</span>:</p>\n'
            '<div class="arithmatex">\\[\n\\eta_\\text{eff} = \\min(\\eta, 1/\\underline L, '
            '2/(\\tilde r\\lVert g\\rVert))\n\\]</div>')
    out = hooks.render_math(page)
    assert out.count("<math") == 2 and 'display="block"' in out and 'display="inline"' in out
    assert "\\(" not in out and "\\[" not in out and "&#x02264;" in out  # ≤ as MathML
    with pytest.raises(ValueError, match=r"cannot render the formula '\\\\left\( x'"):
        hooks.render_math('<span class="arithmatex">\\(\\left( x\\)</span>')


def test_the_site_check_finds_remote_assets_and_tex(tmp_path: Path) -> None:
    check = _load(ROOT / ".ci" / "check_site.py")
    (tmp_path / "index.html").write_text(
        '<link rel="stylesheet" href="assets/main.css"><script src="assets/app.js"></script>'
        '<link rel="canonical" href="https://example.org/"><a href="https://arxiv.org/abs/1905.11881">paper</a>'
    )
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "main.css").write_text("body { background: url(img/bg.png) }")
    assert check.problems(tmp_path) == []
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "index.html").write_text(
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
        '<link href="https://fonts.googleapis.com/css?family=Roboto" rel="stylesheet">'
        '<span class="arithmatex">\\(g\\)</span>'
    )
    (tmp_path / "toc").mkdir()  # a heading's formula in the table of contents, nothing else
    (tmp_path / "toc" / "index.html").write_text(
        '<a class="md-nav__link"><span class="md-ellipsis"> The step: \\(2/r\\)</span></a>')
    (tmp_path / "assets" / "font.css").write_text("@import url('//fonts.example.com/x.css');")
    found = check.problems(tmp_path)
    assert any("cdn.jsdelivr.net" in f for f in found) and any("fonts.googleapis.com" in f for f in found)
    assert any("left as TeX" in f for f in found) and any("fonts.example.com" in f for f in found)
    assert "toc/index.html: a formula left as TeX source" in found
    assert len(found) == 5, found  # the TeX check reports a page once


def test_mkdocs_config_loads_nothing_remote() -> None:
    """The configuration the build starts from: no remote extra script or stylesheet, no web font."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "font: false" in text
    assert "http" not in "".join(line for line in text.splitlines() if "extra_" in line or line.startswith("  - "))
