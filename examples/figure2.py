"""The paper's Figure 2/4: training loss of SGD with and without clipping, and of the `auto` mode.

    python examples/figure2.py                   # five runs of 500 steps, about 50 s on 2 CPU cores
    python examples/figure2.py --steps 2000 --hidden 128 --seqs 4096 --seeds 3   # closer to the paper
    python examples/figure2.py --help

The same character LSTM language model on Python's own English docs
(``pydoc_data.topics``), the same data order and the same step budget, trained five ways:

1. SGD at a small learning rate, no clipping (``--lr-small``);
2. SGD at a large learning rate, no clipping (``--lr-large``): the paper's unstable baseline;
3. SGD at the large learning rate with hard clipping, ``L0L1Clipping(mode="clip", max_norm=...)``;
4. SGD at the large learning rate with ``L0L1Clipping(mode="auto")`` (the default): no threshold,
   the step is set from the smoothness measured online;
5. the same with ``probe_loss=``: the estimate from the paper's noise-free measurement (one extra
   forward and backward pass per step).

Writes OUT/figure2.png (the loss curves, smoothed over ``--smooth`` steps; the band is the
range over seeds) and OUT/figure2.json, prints the final losses, and logs every run to W&B
(offline by default). A run whose loss becomes non-finite is marked where it diverged.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional

from _shared import (
    add_char_lm_args,
    example_parser,
    fit_char_lm_for_steps,
    fmt,
    parse_char_lm_args,
    plain_log_ticks,
    pyplot,
    recorder,
    save_png,
    smooth,
    write_figure_and_data,
)

from lightning_l0l1 import L0L1Clipping


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The five runs: (key, label, lr, callback arguments or None)."""
    return [
        {"key": "unclipped_small_lr", "label": f"SGD lr {args.lr_small:g}, no clipping", "lr": args.lr_small,
         "clip": None},
        {"key": "unclipped_large_lr", "label": f"SGD lr {args.lr_large:g}, no clipping", "lr": args.lr_large,
         "clip": None},
        {"key": "clip", "label": f"SGD lr {args.lr_large:g}, clip at {args.max_norm:g}", "lr": args.lr_large,
         "clip": {"mode": "clip", "max_norm": args.max_norm}},
        {"key": "auto", "label": f"SGD lr {args.lr_large:g}, mode=auto", "lr": args.lr_large,
         "clip": {"mode": "auto"}},
        {"key": "auto_probe", "label": f"SGD lr {args.lr_large:g}, mode=auto + probe", "lr": args.lr_large,
         "clip": {"mode": "auto", "probe_loss": probe_loss}},
    ]


def probe_loss(module, batch):
    """The loss of ``batch`` as ``training_step`` computes it, without logging: for ``probe_loss=``."""
    return module.loss(batch)


def train(args: argparse.Namespace, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    clip = L0L1Clipping(**cfg["clip"], log_every_n_steps=10) if cfg["clip"] else None
    rec = recorder(clip)
    fit_char_lm_for_steps(args, cfg["lr"], [c for c in (clip, rec) if c], f"{cfg['key']} seed {seed}",
                          group="figure2", seed=seed)
    losses = [r["loss"] for r in rec.rows]
    out = {"seed": seed, "losses": losses}
    if clip is not None:
        last = clip.latest()
        out.update({k: last[f"l0l1/{k}"] for k in ("clip_rate", "lr_effective", "L0", "L1") if f"l0l1/{k}" in last})
    return out


def final_loss(losses: list[float], tail: int) -> float:
    """Mean loss over the last ``tail`` steps; NaN if the run diverged (any non-finite loss)."""
    if not losses or not all(math.isfinite(v) for v in losses):
        return math.nan
    t = losses[-tail:]
    return sum(t) / len(t)


def plot(results: dict[str, dict[str, Any]], args: argparse.Namespace, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"unclipped_small_lr": "tab:blue", "unclipped_large_lr": "tab:red", "clip": "tab:green",
              "auto": "tab:purple", "auto_probe": "tab:orange"}
    for key, res in results.items():
        curves = [smooth(r["losses"], args.smooth) for r in res["runs"]]
        n = min(len(c) for c in curves)
        steps = list(range(n))
        cols = [[c[i] for c in curves] for i in range(n)]
        mean = [sum(v) / len(v) if all(math.isfinite(x) for x in v) else math.nan for v in cols]
        ax.plot(steps, mean, color=colors[key], lw=1.8, label=f"{res['label']}  (final {fmt(res['final_loss'])})")
        if len(curves) > 1:
            lo = [min(v) if all(math.isfinite(x) for x in v) else math.nan for v in cols]
            hi = [max(v) if all(math.isfinite(x) for x in v) else math.nan for v in cols]
            ax.fill_between(steps, lo, hi, color=colors[key], alpha=0.2, lw=0)
        bad = next((i for i, m in enumerate(mean) if not math.isfinite(m)), None)
        if bad is not None and bad > 0:
            ax.plot([bad - 1], [mean[bad - 1]], "x", color=colors[key], ms=12, mew=3)
            ax.annotate("diverged", (bad - 1, mean[bad - 1]), textcoords="offset points", xytext=(6, 6),
                        color=colors[key])
    ax.set_yscale("log")
    plain_log_ticks(ax, "y")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss, nats/char (log; mean of {args.smooth} steps)")
    seeds = f"{args.seeds} seeds, band = range" if args.seeds > 1 else "1 seed"
    ax.set_title(f"Char LSTM on pydoc text: clipping at a large learning rate ({seeds})")
    ax.legend(loc="upper right")
    save_png(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = example_parser(__doc__)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run (the same for all five)")
    parser.add_argument("--lr-small", type=float, default=0.5, help="learning rate of the small-lr baseline")
    parser.add_argument("--lr-large", type=float, default=30.0, help="learning rate of the other four runs")
    parser.add_argument("--max-norm", type=float, default=0.25, help="threshold of the hard-clipping run")
    add_char_lm_args(parser)
    parser.add_argument("--seeds", type=int, default=1, help="runs per configuration (seeds 0..N-1)")
    parser.add_argument("--smooth", type=int, default=10, help="plot a trailing mean over this many steps")
    args = parse_char_lm_args(parser, argv, "steps", "seeds", "smooth")

    tail = max(1, args.steps // 10)
    results: dict[str, dict[str, Any]] = {}
    for cfg in configs(args):
        runs = [train(args, cfg, seed) for seed in range(args.seeds)]
        finals = [final_loss(r["losses"], tail) for r in runs]
        results[cfg["key"]] = {
            "label": cfg["label"], "lr": cfg["lr"], "runs": runs,
            "final_loss": sum(finals) / len(finals),  # NaN if any seed diverged
            "diverged": sum(not math.isfinite(f) for f in finals),
        }
    png, js = write_figure_and_data(args.out, "figure2", lambda path: plot(results, args, path), results)

    print(f"\nFigure 2: training loss after {args.steps} steps (mean of the last {tail}, over {args.seeds} seed(s))")
    for res in results.values():
        note = f"  diverged in {res['diverged']}/{args.seeds}" if res["diverged"] else ""
        extra = ""
        last = res["runs"][-1]  # the callback's statistics: of the last seed
        which = f" (seed {last['seed']})" if args.seeds > 1 else ""
        if "lr_effective" in last:
            extra = f"  clip rate{which} {last['clip_rate']:.2f}, last effective lr {last['lr_effective']:.3g}"
        if "L0" in last:
            extra += f", L0 {fmt(last['L0'])}, L1 {fmt(last['L1'])}"
        print(f"  {res['label']:34s} {fmt(res['final_loss']):>8s}{note}{extra}")
    print(f"figure: {png}\ndata:   {js}")
    summary: dict[str, Any] = {f"final_loss_{k}": r["final_loss"] for k, r in results.items()}
    summary.update({f"diverged_{k}": float(r["diverged"]) for k, r in results.items()})
    return summary


if __name__ == "__main__":
    main()
