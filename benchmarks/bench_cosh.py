"""The paper's speed-up claim on f(x) = (L0/L1^2) cosh(L1 x), which is exactly (L0, L1)-smooth.

From x0 = 10/L1 (gradient norm ~1e4 for L0 = L1 = 1), iterations to reach |f'(x)| <= 1e-6:
fixed-step gradient descent with the best step of a grid, the (L0,L1) step with the true
constants (``l0l1``, lr = 1/L0: clipped GD), and ``auto`` with no constant given (lr = 1e3,
so the estimated rule is what limits the step). Full batch, float64. The last column is the
``l0l1`` rule fed with the same estimator's constants at every step (``min(lr, 1/(L0_hat +
L1_hat ||g||))``, with ``auto``'s doubling first-steps bound): the shape ``auto`` had before it
became hard clipping at ``1/L_low``, kept as a measurement (not a mode of the library).

    python benchmarks/bench_cosh.py           # prints the table and writes results/bench_cosh.md
    python benchmarks/bench_cosh.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, table

from lightning_l0l1 import GradientClipper
from lightning_l0l1.functional import clip_gradients_


def run(l0: float, l1: float, x0: float, rule: str, lr: float, max_iter: int, tol: float = 1e-6):
    """Iterations to |f'| <= tol (inf if not reached or diverged), and the clipper (or None)."""
    x = torch.nn.Parameter(torch.tensor([x0], dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=lr)
    clipper = None
    if rule == "l0l1":
        clipper = GradientClipper("l0l1", l0=l0, l1=l1, nonfinite="propagate")
    elif rule == "auto":
        clipper = GradientClipper("auto", nonfinite="propagate")
    elif rule == "l0l1-shape":  # the estimator only; the rule is applied below (host reads: a measurement)
        clipper = GradientClipper("clip", max_norm=1e300, estimate=True, nonfinite="propagate")
    for it in range(max_iter + 1):
        opt.zero_grad()
        f = (l0 / l1**2) * torch.cosh(l1 * x).sum()
        f.backward()
        g = float(x.grad.abs().max())
        if not math.isfinite(g):
            return math.inf, clipper
        if g <= tol:
            return it, clipper
        if clipper is not None:
            clipper.step(opt)
        if rule == "l0l1-shape":
            est = clipper.latest()  # type: ignore[union-attr]
            l0h, l1h = est["l0l1/L0"], est["l0l1/L1"]
            # auto's first-steps bound: step length <= 1e-3 * max(|x0|, 1), doubling every step
            step = min(lr * g, 1e-3 * max(abs(x0), 1.0) * 2.0 ** min(it, 1000))
            if l0h + l1h > 0:
                step = min(step, g / (l0h + l1h * g))
            clip_gradients_([x], step / lr)
        opt.step()
    return math.inf, clipper


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_cosh.md")
    args = ap.parse_args(argv)
    cases = [(1.0, 1.0), (2.0, 0.5), (0.1, 3.0)] if not args.quick else [(1.0, 1.0)]
    max_iter = 20000 if not args.quick else 3000
    rows = []
    for l0, l1 in cases:
        x0 = 10.0 / l1
        g0 = (l0 / l1) * math.sinh(l1 * x0)
        # Fixed step: a grid around the only stable choice on [0, x0], 1/max f'' = 1/(L0 cosh(L1 x0)).
        lmax = l0 * math.cosh(l1 * x0)
        grid = [c / lmax for c in (0.5, 1.0, 1.5, 1.9, 2.5, 4.0)]
        fixed = {lr: run(l0, l1, x0, "fixed", lr, max_iter)[0] for lr in grid}
        best_lr = min(fixed, key=lambda k: fixed[k])
        true_rule = run(l0, l1, x0, "l0l1", 1.0 / l0, max_iter)[0]
        auto, clipper = run(l0, l1, x0, "auto", 1e3, max_iter)
        shape = run(l0, l1, x0, "l0l1-shape", 1e3, max_iter)[0]
        st = clipper.latest()
        rows.append(
            [f"L0={l0:g}, L1={l1:g}", f"{g0:.3g}", fixed[best_lr], f"{best_lr * lmax:g}/max f''", true_rule, auto,
             auto / true_rule, f"{st['l0l1/L0']:.4g}", f"{st['l0l1/L1']:.4g}", shape]
        )
    fmt = lambda v: v if not (isinstance(v, float) and math.isinf(v)) else f"> {max_iter}"  # noqa: E731
    rows = [[fmt(v) for v in r] for r in rows]
    report = (
        "f(x) = (L0/L1^2) cosh(L1 x) from x0 = 10/L1; iterations to |f'| <= 1e-6\n\n"
        + table(["function", "f'(x0)", "fixed step, best of grid", "best step", "l0l1, true constants",
                 "auto, no constants", "auto / true", "auto's L0", "auto's L1",
                 "l0l1 shape, estimated (not a mode)"], rows)
        + "\n"
    )
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
