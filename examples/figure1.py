"""The paper's Figure 1: local smoothness against gradient norm along the training trajectory.

    python examples/figure1.py                 # two runs of 500 steps, about 20 s on 2 CPU cores
    python examples/figure1.py --steps 2000 --hidden 128 --seqs 4096    # closer to the paper's scale
    python examples/figure1.py --help

A character LSTM language model on the English text that ships with Python
(``pydoc_data.topics``) is trained twice with plain SGD: at a large learning rate with
hard clipping (``L0L1Clipping(mode="clip")``), and at a small learning rate without
clipping. After every step, the script measures the local smoothness along the step
the way Zhang et al. (2020) do, on the step's own minibatch B:

    L_hat = ||grad f_B(theta_{t+1}) - grad f_B(theta_t)|| / ||theta_{t+1} - theta_t||

(one extra forward and backward pass per measured step: ``--measure-every`` thins it),
and plots it against ||grad f_B(theta_t)|| on log-log axes, coloured by step, with the
least-squares line L0 + L1 ||g|| (L0, L1 >= 0) and the Pearson correlation of the logs.
The paper finds a strong positive correlation in the clipped large-learning-rate run:
smoothness grows with the gradient norm, the (L0,L1) condition. Whatever the numbers
are on this machine, the script prints them.

Writes OUT/figure1.png and OUT/figure1.json; logs both runs to W&B (offline by default).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from _shared import (
    add_char_lm_args,
    add_seed_arg,
    example_parser,
    fit_char_lm_for_steps,
    fitted_constants,
    fmt,
    parse_char_lm_args,
    plain_log_ticks,
    pyplot,
    save_png,
    write_figure_and_data,
)

from lightning_l0l1 import L0L1Clipping


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double().pow(2).sum() for t in tensors]).sum()


class SmoothnessProbe(pl.Callback):
    """Same-minibatch secant smoothness along each step. Goes *before* the clipping callback in the list.

    ``on_before_optimizer_step`` sees the raw gradient (before clipping) and copies it with the
    parameters; ``on_train_batch_end`` re-evaluates the gradient of the same batch at the new
    parameters. Host reads per measured step: fine for a figure, not for a hot path.
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []
        self._snap: Optional[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._snap = None
        if trainer.global_step % self.every:
            return
        params = [p for p in pl_module.parameters() if p.grad is not None]
        self._snap = (params, [p.detach().clone() for p in params], [p.grad.detach().clone() for p in params])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._snap is None:
            return
        params, before, grads = self._snap  # the same parameters, in the same order, as the snapshot
        self._snap = None
        with torch.enable_grad():
            new_grads = torch.autograd.grad(pl_module.loss(batch), params)
        step = math.sqrt(_sq_norm([p.detach() - b for p, b in zip(params, before)]))
        diff = math.sqrt(_sq_norm([n - g for n, g in zip(new_grads, grads)]))
        norm = math.sqrt(_sq_norm(grads))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.rows.append({
            "step": trainer.global_step - 1,
            "grad_norm": norm,
            "smoothness": diff / step if step > 0 else math.nan,
            "loss": float(loss),
        })


def fit_line(norms: list[float], smooth: list[float]) -> tuple[float, float]:
    """Least squares ``L ~ L0 + L1 * ||g||`` with ``L0, L1 >= 0`` (the two-variable NNLS in closed form)."""
    n = len(norms)
    mx, my = sum(norms) / n, sum(smooth) / n
    sxx = sum((x - mx) ** 2 for x in norms)
    sxy = sum((x - mx) * (y - my) for x, y in zip(norms, smooth))
    l1 = sxy / sxx if sxx > 0 else 0.0
    l0 = my - l1 * mx
    if l1 < 0:  # no growth: a constant
        return my, 0.0
    if l0 < 0:  # through the origin
        return 0.0, sum(x * y for x, y in zip(norms, smooth)) / sum(x * x for x in norms)
    return l0, l1


def log_correlation(norms: list[float], smooth: list[float]) -> float:
    """Pearson correlation of ``log ||g||`` and ``log L`` (the paper's log-log view)."""
    lx, ly = torch.tensor(norms).log(), torch.tensor(smooth).log()
    if len(norms) < 3 or float(lx.std()) == 0 or float(ly.std()) == 0:
        return math.nan
    return float(torch.corrcoef(torch.stack([lx, ly]))[0, 1])


def run(args: argparse.Namespace, name: str, lr: float, clip: bool) -> dict[str, Any]:
    probe = SmoothnessProbe(args.measure_every)
    callbacks: list[pl.Callback] = [probe]
    clipping = None
    if clip:
        clipping = L0L1Clipping(mode="clip", max_norm=args.max_norm, estimate=True, log_every_n_steps=10)
        callbacks.append(clipping)
    fit_char_lm_for_steps(args, lr, callbacks, name, group="figure1", seed=args.seed)
    rows = [r for r in probe.rows if math.isfinite(r["smoothness"]) and r["smoothness"] > 0 and r["grad_norm"] > 0]
    norms, smooth = [r["grad_norm"] for r in rows], [r["smoothness"] for r in rows]
    l0, l1 = fit_line(norms, smooth) if rows else (math.nan, math.nan)
    out: dict[str, Any] = {
        "name": name, "lr": lr, "clipped": clip, "points": len(rows),
        "correlation_log": log_correlation(norms, smooth) if rows else math.nan,
        "fit_L0": l0, "fit_L1": l1,
        "final_loss": probe.rows[-1]["loss"] if probe.rows else math.nan,
        "rows": rows,
    }
    if clipping is not None:  # the callback's own online estimate, from minibatch-to-minibatch secants
        stats = clipping.latest()
        online_l0, online_l1 = fitted_constants(stats)
        out.update(online_L0=online_l0, online_L1=online_l1, clip_rate=stats["l0l1/clip_rate"])
    return out


def plot(runs: list[dict[str, Any]], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.8), squeeze=False)
    for ax, r in zip(axes[0], runs):
        rows = r["rows"]
        if not rows:
            ax.set_title(f"{r['name']}: no finite measurement")
            continue
        x = [p["grad_norm"] for p in rows]
        y = [p["smoothness"] for p in rows]
        sc = ax.scatter(x, y, c=[p["step"] for p in rows], cmap="viridis", s=12, alpha=0.8)
        fig.colorbar(sc, ax=ax, label="optimizer step")
        grid = torch.logspace(math.log10(min(x)), math.log10(max(x)), 50).tolist()
        ax.plot(grid, [r["fit_L0"] + r["fit_L1"] * g for g in grid], color="crimson", lw=2,
                label=f"fit $L_0 + L_1\\|g\\|$: $L_0$={r['fit_L0']:.3g}, $L_1$={r['fit_L1']:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_ticks(ax)
        ax.set_xlabel(r"gradient norm $\|\nabla f_B(\theta_t)\|$ (log)")
        ax.set_ylabel(r"local smoothness $\hat L_t$ (log)")
        kind = f"clipped at {r['max_norm']:g}" if r["clipped"] else "no clipping"
        ax.set_title(f"SGD lr {r['lr']:g}, {kind}\ncorrelation of logs: {r['correlation_log']:.2f}")
        ax.legend(loc="upper left")
    fig.suptitle("Local smoothness vs gradient norm along training (char LSTM, pydoc text)")
    save_png(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = example_parser(__doc__)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    parser.add_argument("--lr-large", type=float, default=30.0, help="learning rate of the clipped run")
    parser.add_argument("--max-norm", type=float, default=0.25, help="clipping threshold of the clipped run")
    parser.add_argument("--lr-small", type=float, default=0.5, help="learning rate of the unclipped run")
    add_char_lm_args(parser)
    parser.add_argument("--measure-every", type=int, default=1, help="measure the smoothness every K steps")
    add_seed_arg(parser)
    args = parse_char_lm_args(parser, argv, "steps", "measure_every")

    runs = [
        run(args, f"clipped lr {args.lr_large:g}", args.lr_large, clip=True),
        run(args, f"unclipped lr {args.lr_small:g}", args.lr_small, clip=False),
    ]
    for r in runs:
        r["max_norm"] = args.max_norm
    png, js = write_figure_and_data(args.out, "figure1", lambda path: plot(runs, path), runs)

    print("\nFigure 1: local smoothness vs gradient norm (same-minibatch secant along each step)")
    print(f"{'run':22s} {'points':>6s} {'corr(log)':>9s} {'fit L0':>9s} {'fit L1':>9s} {'final loss':>10s}")
    for r in runs:
        print(f"{r['name']:22s} {r['points']:6d} {r['correlation_log']:9.2f} {fmt(r['fit_L0']):>9s} "
              f"{fmt(r['fit_L1']):>9s} {r['final_loss']:10.4f}")
    clipped = runs[0]
    print(f"L0L1Clipping's online estimate in the clipped run (minibatch secants, biased up by noise): "
          f"L0 {fmt(clipped.get('online_L0', math.nan))}, L1 {fmt(clipped.get('online_L1', math.nan))}; "
          f"clip rate {clipped.get('clip_rate', math.nan):.2f}")
    print(f"figure: {png}\ndata:   {js}")
    return {
        "clipped_correlation_log": clipped["correlation_log"],
        "unclipped_correlation_log": runs[1]["correlation_log"],
        "clipped_fit_L0": clipped["fit_L0"], "clipped_fit_L1": clipped["fit_L1"],
        "clipped_final_loss": clipped["final_loss"], "unclipped_final_loss": runs[1]["final_loss"],
        "clipped_points": float(clipped["points"]), "unclipped_points": float(runs[1]["points"]),
    }


if __name__ == "__main__":
    main()
