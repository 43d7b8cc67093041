"""The first steps of the GPT benchmark under AdamW: the highest loss of the first 20 steps, over many seeds.

The model, data and optimizer of ``bench_gpt.py`` (AdamW, betas 0.9, 0.95, weight decay 0.1), 20 steps
per run and 8 seeds per cell by default: unclipped, ``clip_grad_norm_`` at the given thresholds, and
``auto`` with each ``initial_step`` given (``auto`` through a ``lightning.pytorch`` ``Trainer`` with the
callback by default, ``--via loop`` for the plain loop). With ``--steps 300`` the table also gives the
final loss (mean of the last 10% of steps).

    python benchmarks/bench_gpt_early.py                       # results/bench_gpt_early.md
    python benchmarks/bench_gpt_early.py --initial-steps 0.1,0.2 --steps 300 --seeds 3 --out /tmp/x.md
    python benchmarks/bench_gpt_early.py --quick               # smoke test (writes nothing)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _via
import bench_gpt
from _common import emit, machine, table


def run(config: str, seed: int, lr: float, ids: torch.Tensor, vocab: int, args) -> list[float]:
    torch.manual_seed(seed)
    model = bench_gpt.GPT(vocab, args.d_model, args.layers, args.heads, args.ctx)
    opt = bench_gpt.make_optimizer(model, "adamw", lr)
    clipper = None
    before = None
    if config.startswith("auto"):
        clipper = {"mode": "auto", "initial_step": float(config.split("=")[1])}
    else:
        before = bench_gpt.make_clip(config, model)
    return _via.run(model, opt, bench_gpt.batches(ids, seed, args), bench_gpt.gpt_loss, clipper, args.via,
                    args.steps, stop_above=50, before_step=before)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lrs", type=str, default="1e-2,3e-2,1e-1")
    ap.add_argument("--thresholds", type=str, default="0.05,0.5,1")
    ap.add_argument("--initial-steps", type=str, default="0.1,0.15,0.2,0.3")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--via", choices=_via.VIA, default="lightning")
    ap.add_argument("--out", type=Path, default=bench_gpt.RESULTS / "bench_gpt_early.md")
    args = ap.parse_args(argv)
    args.layers, args.d_model, args.heads, args.ctx, args.batch = 3, 64, 4, 64, 16
    lrs = [float(x) for x in args.lrs.split(",")]
    configs = ["unclipped", *[f"clip={t}" for t in args.thresholds.split(",")],
               *[f"auto initial_step={s}" for s in args.initial_steps.split(",")]]
    if args.quick:
        args.steps, args.seeds, args.layers, args.d_model, args.heads, args.ctx, args.batch = 4, 1, 1, 16, 2, 16, 4
        lrs, configs = [1e-2], ["unclipped", "clip=0.5", "auto initial_step=0.2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    where = machine()  # with the thread count the runs use
    t0 = time.time()
    ids, vocab = bench_gpt.corpus()
    rows = []
    try:
        for c in configs:
            row = [c]
            for lr in lrs:
                runs = [run(c, s, lr, ids, vocab, args) for s in range(args.seeds)]
                peak = statistics.mean(max(r[:20]) for r in runs)
                cell = f"{peak:.2f}"
                if args.steps > 20:
                    finals = [statistics.mean(r[-max(1, args.steps // 10):]) if len(r) == args.steps else math.inf
                              for r in runs]
                    cell += f" ({statistics.mean(finals):.4f})"
                row.append(cell)
                print(f"{c} lr {lr:g}: {cell}", flush=True)
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    what = "highest loss of the first 20 steps" + (", (final loss)" if args.steps > 20 else "")
    report = (
        f"Machine: {where}\n\nThe GPT of bench_gpt.py under AdamW, {args.steps} steps, {args.seeds} seeds per "
        "cell, "
        f"auto via {args.via}; {what}, mean over the seeds; {time.time() - t0:.0f} s\n\n"
        + table(["configuration", *[f"lr {lr:g}" for lr in lrs]], rows) + "\n"
    )
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
