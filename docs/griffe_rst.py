"""Griffe extension for the API reference: turns the docstrings' Sphinx markup into Markdown.

The package's docstrings are Google style with Sphinx roles. Before mkdocstrings renders them:

* ``:math:`x``` becomes ``$x$`` and a ``.. math::`` block becomes a ``$$ ... $$`` block
  (pymdownx.arithmatex then hands both to MathJax);
* ``:class:``, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:obj:``, ``:exc:`` become
  code that links to the entry in the API reference when the target resolves inside the package.
  The link is an *optional* autoref: a target that is not documented renders as plain code and
  never fails ``mkdocs build --strict``. ``~a.b.C`` shows ``C``; ``title <a.b.C>`` shows ``title``.

Registered in ``mkdocs.yml`` under the python handler's ``extensions``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|obj|exc|const):`([^`]+)`")
_DOCTEST_DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_BLOCK.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        body: list[str] = [m.group("rest")] if m.group("rest").strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        trailing_blank = True
        content = [line.strip() for line in body if line.strip()]
        out.append(f"{indent}$$")
        out.extend(f"{indent}{line}" for line in content)
        out.append(f"{indent}$$")
        if trailing_blank and i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def _doctests(text: str) -> str:
    """Fences each run of doctest lines (``>>>`` and its output) as a ``pycon`` code block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        block: list[str] = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(_DOCTEST_DIRECTIVE.sub("", lines[i][len(indent):]))
            i += 1
        out.append(f"{indent}```pycon")
        out.extend(f"{indent}{line}" for line in block)
        out.append(f"{indent}```")
    return "\n".join(out)


def _lookup(root: griffe.Object, path: str) -> griffe.Object | griffe.Alias | None:
    parts = path.split(".")
    if parts[0] != root.name:
        return None
    obj: Any = root
    for part in parts[1:]:
        try:
            obj = obj.members[part]
        except Exception:  # a missing member, or an alias to a module outside the package (torch)
            return None
    return obj


def _resolve(target: str, context: griffe.Object) -> str | None:
    """The documented path of ``target`` as written in ``context``'s docstring, or None."""
    root = context.package
    candidates = [target]
    scope: Any = context
    while scope is not None:
        candidates.append(f"{scope.path}.{target}")
        scope = scope.parent
    for path in candidates:
        obj = _lookup(root, path)
        if obj is None:
            continue
        if any(part.startswith("_") and not part.startswith("__") for part in path.split(".")):
            return None
        return path
    return None


def _convert(text: str, context: griffe.Object) -> str:
    text = _doctests(text)
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)

    def xref(m: re.Match[str]) -> str:
        role, body = m.group(1), m.group(2).strip()
        explicit = re.fullmatch(r"(.+?)\s*<([^>]+)>", body)
        if explicit:
            title, target = explicit.group(1), explicit.group(2)
        else:
            target = body.lstrip("~!")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        target = target.lstrip("~!.")
        if role in ("func", "meth") and not title.endswith(")"):
            title += "()"
        code = f"<code>{html.escape(title)}</code>"
        path = _resolve(target, context)
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return _XREF_ROLE.sub(xref, text)


class SphinxRoles(griffe.Extension):
    """Converts every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg, set())

    def _visit(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _convert(obj.docstring.value, obj)
        for member in obj.members.values():
            if member.is_alias:
                continue
            self._visit(member, seen)  # type: ignore[arg-type]
