"""Static typing of the public API, as a user's code sees it: mypy over ``tests/typing/``.

``tests/typing/ok_*.py`` must type-check cleanly; each ``tests/typing/bad_*.py`` must give exactly
the errors its ``# E: [<error code>]`` comments announce, on those lines. Mypy runs once for every file
(one subprocess: its start-up is the slow part), with the project's ``[tool.mypy]`` configuration
and the repository's ``.mypy_cache``; the tests then read its output per file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy) : the typing tests need it")

ROOT = Path(__file__).resolve().parent.parent
TYPING = ROOT / "tests" / "typing"
OK_FILES = sorted(TYPING.glob("ok_*.py"))
BAD_FILES = sorted(TYPING.glob("bad_*.py"))

_ERROR = re.compile(r"^(?P<path>[^:\n]+\.py):(?P<line>\d+): error: (?P<msg>.*?)(?:  \[(?P<code>[a-z0-9-]+)\])?$")
_EXPECTED = re.compile(r"#\s*E:\s*\[(?P<code>[a-z0-9-]+)\]")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.fixture(scope="module")
def mypy_errors() -> dict[str, list[tuple[int, str, str]]]:
    """``{file: [(line, code, message), ...]}`` for every file of ``tests/typing``, from one mypy run."""
    files = [_rel(p) for p in [*OK_FILES, *BAD_FILES]]
    cmd = [
        sys.executable, "-m", "mypy", "--config-file", "pyproject.toml",
        "--no-pretty", "--no-error-summary", "--show-error-codes", "--no-color-output", *files,
    ]
    env = {**os.environ, "MYPY_FORCE_COLOR": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    # 0: clean, 1: type errors (expected, from bad_mode.py); anything else is a crash or a usage error.
    assert proc.returncode in (0, 1), f"mypy failed (exit {proc.returncode}):\n{output}"
    errors: dict[str, list[tuple[int, str, str]]] = {f: [] for f in files}
    for line in output.splitlines():
        m = _ERROR.match(line.strip())
        if m is None:
            continue
        path = Path(m["path"]).as_posix()
        assert path in errors, f"mypy reported an error outside tests/typing:\n{output}"
        errors[path].append((int(m["line"]), m["code"] or "", m["msg"]))
    return errors


def _expected(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines()
    return [(i, m["code"]) for i, text in enumerate(lines, start=1) if (m := _EXPECTED.search(text))]


def test_files_found() -> None:
    assert OK_FILES, "no tests/typing/ok_*.py"
    for path in BAD_FILES:
        assert _expected(path), f"{_rel(path)} announces no error"


@pytest.mark.parametrize("path", OK_FILES, ids=lambda p: p.name)
def test_ok(mypy_errors: dict[str, list[tuple[int, str, str]]], path: Path) -> None:
    assert mypy_errors[_rel(path)] == [], "\n".join(f"{_rel(path)}:{n}: {msg} [{code}]"
                                                    for n, code, msg in mypy_errors[_rel(path)])


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.name)
def test_bad(mypy_errors: dict[str, list[tuple[int, str, str]]], path: Path) -> None:
    found = [(n, code) for n, code, _ in mypy_errors[_rel(path)]]
    assert found == _expected(path), "\n".join(f"{_rel(path)}:{n}: {msg} [{code}]"
                                               for n, code, msg in mypy_errors[_rel(path)])


def test_bad_mode_messages(mypy_errors: dict[str, list[tuple[int, str, str]]]) -> None:
    """The errors name the argument and the allowed modes (what a user reads)."""
    messages = [msg for _, _, msg in mypy_errors["tests/typing/bad_mode.py"]]
    assert len(messages) == 2
    assert 'Argument "mode" to "GradientClipper"' in messages[0] and "'clamp'" in messages[0]
    assert "Literal['auto', 'clip', 'adaptive', 'l0l1']" in messages[0]
    assert 'Argument "mode" to "clip_gradients_"' in messages[1] and "'l0l1'" in messages[1]
    assert "Literal['clip', 'adaptive']" in messages[1]
