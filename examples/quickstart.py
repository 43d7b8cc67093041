"""Quickstart: train a small LSTM language model with `L0L1Clipping` and print what it did.

    python examples/quickstart.py                    # 256 steps, 15 s to 2.5 min on a 2-core CPU
    python examples/quickstart.py --seqs 4096 --hidden 256 --epochs 10  # bigger
    python examples/quickstart.py --mode clip --max-norm 0.25   # a hand-tuned threshold instead
    python examples/quickstart.py --help

The text is the English documentation that ships with Python (`pydoc_data.topics`),
so nothing is downloaded. Plain SGD at a large learning rate (30, where unclipped SGD does
not train: see examples/figure2.py) with `L0L1Clipping()`, whose default `mode="auto"` sets
its threshold and step from the smoothness it measures along the way; the callback also
fits the smoothness constants (L0, L1) of the loss (`estimate=True`, always on in auto) and
the script prints them with the learning rate they suggest.

Writes to --out (default examples/out/): quickstart_loss.png (training loss per step) and
quickstart_grad_norm.png (per step: the gradient norm against the threshold, with the clipped
steps marked, and below it the effective learning rate lr x s the step used). Logs to
Weights & Biases in offline mode when wandb is installed (`wandb sync` the run directory
under --out later), `--wandb-online` to log online, `--no-wandb` for no logger.
"""

from __future__ import annotations

import math
from pathlib import Path

from _shared import (
    add_char_lm_args,
    add_seed_arg,
    example_parser,
    fit_char_lm,
    fitted_constants,
    fmt,
    json_safe,
    parse_char_lm_args,
    plain_log_ticks,
    pyplot,
    recorder,
    save_png,
)

from lightning_l0l1 import L0L1Clipping


def plot(rows: list[dict[str, float]], out: Path, lr: float, mode: str) -> list[Path]:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    paths = [out / "quickstart_loss.png", out / "quickstart_grad_norm.png"]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats/char)")
    ax.set_title(f"Char LSTM, SGD lr {lr:g}, L0L1Clipping mode={mode}")
    ax.grid(alpha=0.3)
    save_png(fig, paths[0])

    # Top: the norm against the threshold it is compared with (above it, the step is clipped).
    # Bottom: what the step then used, the effective learning rate lr * s, against the lr set; under
    # auto it also carries the base step (the flattest curvature measured), so it is shown apart from
    # the comparison above rather than as a "scaled norm" next to the threshold.
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True)
    norm = [r["l0l1/grad_norm"] for r in rows]
    threshold = [r["l0l1/max_norm"] for r in rows]
    clipped = [(t, n) for t, n, g in zip(steps, norm, threshold) if n > g]
    top.plot(steps, norm, lw=1.5, label="gradient norm ‖g‖")
    top.plot(steps, threshold, lw=1, color="gray", ls=":", label="threshold (clipped above it)")
    if clipped:
        top.scatter(*zip(*clipped), s=10, color="C3", zorder=3, label="clipped steps")
    top.set_yscale("log")
    plain_log_ticks(top, "y")
    top.set_ylabel("global gradient norm (log)")
    top.set_title(f"Gradient norm and the step it got (mode={mode})")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    bottom.plot(steps, [r["l0l1/lr_effective"] for r in rows], lw=1.5, color="C2", label="effective lr = lr x s")
    if mode == "auto":  # what the effective lr is below the threshold: auto's own learning rate
        base = [base_step(r["l0l1/lr_effective"], r["l0l1/grad_norm"], r["l0l1/max_norm"]) for r in rows]
        bottom.plot(steps, base, lw=1.3, color="C1", ls="--", zorder=3,
                    label="base step: auto's lr, 1/(smallest curvature measured); clipped steps dip below it")
    bottom.axhline(lr, lw=1, color="gray", ls=":", label=f"learning rate set ({lr:g})")
    bottom.set_yscale("log")
    bottom.set_ylim(top=lr * 1.6)
    plain_log_ticks(bottom, "y")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("learning rate (log)")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3, which="both")
    save_png(fig, paths[1])
    return paths


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it is under it (the summary reads the same anywhere)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def base_step(lr_effective: float, norm: float, threshold: float) -> float:
    """``auto``'s base step, from a step's record: its effective lr is the base step times
    ``min(1, threshold / norm)`` (``lightning_l0l1.rules.auto_scale``), so dividing that factor out gives it."""
    return lr_effective / min(1.0, threshold / norm) if norm > 0 and math.isfinite(threshold) else lr_effective


def summary_lines(stats: dict[str, float], mode: str, lr: float, l0: float, l1: float, gamma: float, loss: float,
                  vocab: int, paths: list[Path]) -> list[str]:
    """The printed summary: what the callback did, in words (the lines docs/getting-started.md shows)."""
    norm, scaled = stats["l0l1/grad_norm"], stats["l0l1/grad_norm_scaled"]
    threshold, lr_eff = stats["l0l1/max_norm"], stats["l0l1/lr_effective"]
    scale = scaled / norm if norm > 0 else 1.0
    above = norm > threshold
    lines = ["", "L0L1Clipping summary",
             f"  mode                 {mode}",
             f"  optimizer steps      {int(stats['l0l1/steps'])}",
             f"  learning rate set    {lr:g}"]
    if mode == "auto":
        base = base_step(lr_eff, norm, threshold)
        lines += [
            f"  base step            {base:.4g}  (auto's own learning rate, 1 / the smallest curvature measured;",
            f"                       every step uses at most this: lr {lr:g} is scaled by {base / lr:.2f}"
            " before any clipping)",
            f"  threshold in use     {threshold:.4g}  (a gradient norm above it gets a shorter step still,",
            "                       base step x threshold / norm: that is clipping)",
        ]
    else:
        lines.append(f"  threshold in use     {threshold:.4g}  (a gradient norm above it is scaled down to it)")
    lines += [
        f"  clip rate (all run)  {stats['l0l1/clip_rate']:.2f}  (the fraction of steps whose norm was above"
        " the threshold)",
        f"  last step            norm {norm:.4g} ({'above' if above else 'below'} the threshold) -> "
        f"{scaled:.4g}, scale {scale:.2f}"
        + ("  (the base step alone)" if mode == "auto" and not above else ""),
        f"  effective lr         {lr_eff:.4g}  (lr x scale: the step size the optimizer used)",
        f"  non-finite steps     {int(stats['l0l1/nonfinite_steps'])}",
        # the envelope fit: the constants of the loss (what auto steps by is the threshold above)
        f"  fitted L0, L1        {fmt(l0)}, {fmt(l1)}"
        + ("  (L0 not identified yet: no small-gradient pair)" if l0 == 0 else ""),
        f"  their L0/L1          {fmt(gamma)}  (the threshold the (L0,L1) theory suggests)",
        f"  suggested lr 1/L0    {fmt(stats.get('l0l1/lr_suggested', math.nan))}",
        f"  final train loss     {loss:.4f} (uniform guess: {math.log(vocab):.4f})",
        "  figures              " + ", ".join(_shown(p) for p in paths),
    ]
    return lines


def main(argv: list[str] | None = None) -> dict[str, float | None]:
    """Train, plot, print the summary; return it (``None`` for what is not identified yet, e.g. the
    suggested lr while the fit's L0 is still 0 in a short run)."""
    parser = example_parser(__doc__)
    parser.add_argument("--mode", default="auto", choices=["auto", "clip", "adaptive", "l0l1"],
                        help="the rule (auto: nothing to tune; the others use --max-norm or --l0/--l1)")
    parser.add_argument("--max-norm", type=float, default=0.25, help="gamma for clip/adaptive")
    parser.add_argument("--l0", type=float, default=0.05, help="L0 for mode=l0l1")
    parser.add_argument("--l1", type=float, default=0.2, help="L1 for mode=l0l1")
    parser.add_argument("--lr", type=float, default=30.0, help="SGD learning rate (large on purpose)")
    add_char_lm_args(parser)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--summary-out", type=Path, default=None,
                        help="also write the printed summary to this file (docs/quickstart_output.txt is one)")
    add_seed_arg(parser)
    args = parse_char_lm_args(parser, argv, "epochs")

    fixed = {"clip": {"max_norm": args.max_norm}, "adaptive": {"max_norm": args.max_norm},
             "l0l1": {"l0": args.l0, "l1": args.l1}, "auto": {}}[args.mode]
    clip = L0L1Clipping(mode=args.mode, **fixed, estimate=True, log_every_n_steps=5)
    rec = recorder(clip)  # after the clipping callback: it sees this step's statistics
    trainer, vocab = fit_char_lm(args, args.lr, [clip, rec], f"quickstart {args.mode}", seed=args.seed,
                                 max_epochs=args.epochs, log_every_n_steps=5)
    stats = clip.latest()
    loss = float(trainer.callback_metrics["train_loss"])
    l0, l1 = fitted_constants(stats)
    gamma = l0 / l1 if l0 > 0 and l1 > 0 else math.nan
    paths = plot(rec.rows, args.out, args.lr, args.mode)
    lines = summary_lines(stats, args.mode, args.lr, l0, l1, gamma, loss, vocab, paths)
    print("\n".join(lines))
    if args.summary_out is not None:
        args.summary_out.write_text("\n".join(lines).strip("\n") + "\n")
    return json_safe({**stats, "gamma": gamma, "train_loss": loss})


if __name__ == "__main__":
    main()
