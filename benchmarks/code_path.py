"""How much code a reader follows for one optimizer step: the package's functions one step runs.

Traces one call of the callback's ``on_before_optimizer_step`` (after a few warm-up steps, so
the estimator has state) and lists every function or method of ``lightning_l0l1`` it executed,
with its length in source lines (and without docstrings, comments and blank lines). The total is
what a reader walks through to follow that step.

    python benchmarks/code_path.py [--modes clip,auto] [--verbose]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import torch
from _common import fake_trainer, table

PACKAGE = str(Path(__file__).resolve().parent.parent / "lightning_l0l1")


def _units(fn: Any) -> set[CodeType]:
    seen: set[CodeType] = set()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        # comprehensions and lambdas are read as part of the function that holds them
        if event == "call" and code.co_filename.startswith(PACKAGE) and not code.co_name.startswith("<"):
            seen.add(code)
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return seen


def _length(code: CodeType) -> int:
    """Source lines of the function, from its ``def`` (decorators excluded) to its last line."""
    return len(inspect.getsourcelines(code)[0])


def _code_lines(code: CodeType) -> int:
    """The function's lines without its docstring, comments and blank lines."""
    lines = inspect.getsourcelines(code)[0]
    node = ast.parse(textwrap.dedent("".join(lines))).body[0]
    skip: set[int] = set()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        skip = set(range(body[0].lineno - 1, body[0].end_lineno or body[0].lineno))
    return sum(1 for i, ln in enumerate(lines) if i not in skip and ln.strip() and not ln.strip().startswith("#"))


def _step(mode: str) -> Iterator[Any]:
    from lightning_l0l1 import L0L1Clipping

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cb = L0L1Clipping(mode=mode, max_norm=1.0 if mode != "auto" else None)
    trainer = fake_trainer(opt)
    trainer.is_global_zero, trainer.loggers, trainer.log_every_n_steps = True, [], 50

    def one() -> None:
        opt.zero_grad()
        net(torch.randn(4, 8)).pow(2).sum().backward()
        cb.on_before_optimizer_step(trainer, None, opt)  # type: ignore[arg-type]
        opt.step()

    for _ in range(3):
        one()
    yield one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="clip,auto")
    parser.add_argument("--verbose", action="store_true", help="list the units")
    args = parser.parse_args()
    rows = []
    for mode in args.modes.split(","):
        units = _units(next(_step(mode)))
        files = {c.co_filename for c in units}
        rows.append([mode, len(units), len(files), sum(_length(c) for c in units), sum(_code_lines(c) for c in units),
                     max(_length(c) for c in units)])
        if args.verbose:
            for c in sorted(units, key=lambda c: (c.co_filename, c.co_firstlineno)):
                print(f"  {Path(c.co_filename).name}:{c.co_firstlineno} {c.co_qualname} ({_length(c)} lines)")
    print(table(["mode", "units (functions run)", "files", "lines to read", "of them code", "longest unit"], rows))


if __name__ == "__main__":
    main()
