"""Stochastic task: an LSTM language model on the English text that ships with Python.

Plain SGD at a large learning rate (the regime of the paper's Figure 2, where unclipped SGD
diverges), the same step budget for every run: unclipped, hard clipping at every threshold of a
grid, and ``auto`` with nothing tuned: with the default minibatch secant, and with the paper's
probe (``probe=True``: the gradient of the step's own batch at the step's midpoint, one extra
forward and backward pass per step). The runs that use this package go by default through a
``lightning.pytorch`` ``Trainer`` with the :class:`L0L1Clipping` callback, the path users run (``--via loop``:
a plain loop around :class:`lightning_l0l1.GradientClipper`, which gives the same losses bit for bit;
``auto+probe`` always runs in the plain loop, which calls :meth:`GradientClipper.probe` itself).

    python benchmarks/bench_lstm.py              # full: 3 seeds, the whole grid
    python benchmarks/bench_lstm.py --quick      # smoke test
    python benchmarks/bench_lstm.py --seeds 12 --configs clip=0.1,clip=0.25,clip=1,auto,auto+probe \
        --out benchmarks/results/bench_lstm_12seeds.md    # the spread over more seeds
    python benchmarks/bench_lstm.py --lrs 5,20,50,100 --out benchmarks/results/bench_lstm_lrs.md
        # one row per learning rate: the best threshold of a wider grid (it moves with the lr) against auto
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _via
from _common import emit, machine, table, windows

from lightning_l0l1 import GradientClipper

GRID = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: the learning-rate sweep's grid: wider below, where the best threshold goes at large learning rates
SWEEP_GRID = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def corpus() -> tuple[torch.Tensor, int]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(vocab)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


OPTIMIZERS = {"sgd": "plain SGD", "sgd-momentum": "SGD with momentum 0.9", "adamw": "AdamW"}


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    optimizer = getattr(args, "optimizer", "sgd")
    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9 if optimizer == "sgd-momentum" else 0.0)


def batches(ids: torch.Tensor, seed: int, args) -> Iterator[torch.Tensor]:
    """``args.steps`` batches of random windows of ``args.seq + 1`` characters, from the seed's own generator."""
    return windows(ids, seed, args.steps, args.batch, args.seq + 1)


def lstm_loss(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(chunk[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())


def train(config: str, seed: int, ids: torch.Tensor, vocab: int, args) -> tuple[float, list[float]]:
    """Final training loss (mean over the last 10% of steps; inf if it diverged) and the curve."""
    torch.manual_seed(seed)
    model = CharLSTM(vocab, args.hidden)
    opt = make_optimizer(model, args)
    if config == "auto+probe":
        return _train_probe(model, opt, seed, ids, args)
    clipper: Optional[dict[str, Any]] = None
    if config == "auto":
        clipper = {"mode": "auto", "snapshot": getattr(args, "snapshot", None)}
    elif config != "unclipped":
        clipper = {"mode": "clip", "max_norm": float(config.split("=")[1])}
    losses = _via.run(model, opt, batches(ids, seed, args), lstm_loss, clipper, getattr(args, "via", "loop"),
                      args.steps, stop_above=50)
    return _final(losses, args), losses


def _final(losses: list[float], args) -> float:
    if len(losses) < args.steps or any(not math.isfinite(v) or v > 50 for v in losses):
        return math.inf
    return statistics.mean(losses[-max(1, args.steps // 10) :])


def _train_probe(model: nn.Module, opt: torch.optim.Optimizer, seed: int, ids: torch.Tensor, args
                 ) -> tuple[float, list[float]]:
    """``auto`` with ``probe=True``: a plain loop that calls :meth:`GradientClipper.probe` after each step."""
    clipper = GradientClipper(mode="auto", probe=True)
    losses: list[float] = []
    for chunk in batches(ids, seed, args):
        loss = lstm_loss(model, chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipper.step(opt)
        opt.step()
        clipper.probe(0, lambda ps, chunk=chunk: torch.autograd.grad(lstm_loss(model, chunk), ps, allow_unused=True))
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or losses[-1] > 50:
            break
    return _final(losses, args), losses


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                    help="the optimizer the clipping runs in front of (default: plain SGD)")
    ap.add_argument("--lrs", type=str, default=None,
                    help="comma-separated learning rates: one summary row each (best of a wider grid vs auto)")
    ap.add_argument("--configs", type=str, default=None,
                    help="comma-separated subset, e.g. clip=0.1,auto (default: unclipped, the grid, auto, auto+probe)")
    ap.add_argument("--snapshot", choices=["sampled", "full"], default=None,
                    help="auto's snapshot (default: sampled; full: the exact differences, for comparison)")
    ap.add_argument("--via", choices=_via.VIA, default="lightning",
                    help="how the runs that use this package run: a Trainer with the L0L1Clipping callback "
                         "(default), or a plain loop around GradientClipper")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_lstm.md")
    args = ap.parse_args(argv)
    grid = GRID
    if args.quick:
        args.steps, args.hidden, args.seq, args.batch, args.seeds, grid = 6, 16, 16, 4, 1, (0.5,)
    torch.set_num_threads(2)
    ids, vocab = corpus()
    if args.lrs:
        try:
            lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--lrs takes comma-separated learning rates, got {args.lrs!r}")
        if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            ap.error(f"--lrs takes positive learning rates, got {args.lrs!r}")
        return lr_sweep(lrs, grid if args.quick else SWEEP_GRID, ids, vocab, args)
    configs = ["unclipped", *[f"clip={t:g}" for t in grid], "auto", "auto+probe"]
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in configs if c not in ("unclipped", "auto", "auto+probe") and not c.startswith("clip=")]
        if bad or not any(c.startswith("clip=") for c in configs):
            ap.error("--configs takes unclipped, clip=<threshold>, auto, auto+probe, with at least one "
                     f"clip=<threshold>; got {args.configs!r}")
    results: dict[str, list[float]] = {c: [] for c in configs}
    t0 = time.time()
    for seed in range(args.seeds):
        for c in configs:
            final, _ = train(c, seed, ids, vocab, args)
            results[c].append(final)
            print(f"seed {seed} {c:>10}: {final:.4f}", flush=True)
    means = {c: statistics.mean(v) if all(math.isfinite(x) for x in v) else math.inf for c, v in results.items()}
    clip_cfgs = [c for c in configs if c.startswith("clip=")]
    best = min(clip_cfgs, key=lambda c: means[c])
    rows = []
    for c in configs:
        ratio = means[c] / means[best] if math.isfinite(means[c]) else math.inf
        rows.append([c, *[f"{x:.4f}" if math.isfinite(x) else "diverged" for x in results[c]],
                     f"{means[c]:.4f}" if math.isfinite(means[c]) else "diverged",
                     f"{statistics.stdev(results[c]):.3f}" if math.isfinite(means[c]) and args.seeds > 1 else "-",
                     f"{ratio:.3f}"])
    report = (
        f"Machine: {machine()}\n\nChar LSTM (2 layers, hidden {args.hidden}) on pydoc_data.topics, "
        f"{OPTIMIZERS[args.optimizer]} lr {args.lr}, this package's runs via {args.via}, "
        f"{args.steps} steps of {args.batch} x {args.seq} tokens; training loss = mean of the last 10% of steps; "
        f"{time.time() - t0:.0f} s\n\n"
        + table(["configuration", *[f"seed {s}" for s in range(args.seeds)], "mean", "sd", "/ best clip"], rows)
        + f"\n\nBest clip threshold: {best}"
        + "".join(f"; {c} / best clip = {means[c] / means[best]:.3f}" for c in ("auto", "auto+probe") if c in means)
        + "\n"
    )
    return emit(report, args.out, args.quick)


def lr_sweep(lrs: list[float], grid, ids: torch.Tensor, vocab: int, args) -> str:
    """One row per learning rate: unclipped, the best threshold of ``grid`` and ``auto``, mean over seeds."""
    t0 = time.time()
    rows, every = [], []
    for lr in lrs:
        args.lr = lr
        configs = ["unclipped", *[f"clip={t:g}" for t in grid], "auto"]
        res: dict[str, list[float]] = {c: [] for c in configs}
        for seed in range(args.seeds):
            for c in configs:
                res[c].append(train(c, seed, ids, vocab, args)[0])
        means = {c: statistics.mean(v) if all(math.isfinite(x) for x in v) else math.inf for c, v in res.items()}
        clips = [c for c in configs if c.startswith("clip=")]
        best = min(clips, key=lambda c: means[c])
        edge = " (grid edge)" if best in (clips[0], clips[-1]) else ""
        fmt = lambda v: f"{v:.4f}" if math.isfinite(v) else "diverged"  # noqa: E731
        ratio = means["auto"] / means[best] if math.isfinite(means["auto"]) else math.inf
        rows.append([f"{lr:g}", fmt(means["unclipped"]), best.split("=")[1] + edge, fmt(means[best]),
                     fmt(means["auto"]), f"{ratio:.3f}", f"{max(a / b for a, b in zip(res['auto'], res[best])):.3f}"])
        every.append([f"{lr:g}", *[fmt(means[c]) + (" *" if c == best else "") for c in clips], fmt(means["auto"])])
        print(f"lr {lr:g}: best {best} {means[best]:.4f}, auto {means['auto']:.4f} ({ratio:.3f}x)", flush=True)
    report = (
        f"Machine: {machine()}\n\nChar LSTM (2 layers, hidden {args.hidden}) on pydoc_data.topics, "
        f"{OPTIMIZERS[args.optimizer]}, this package's runs via {args.via}, "
        f"{args.steps} steps of {args.batch} x {args.seq} tokens, {args.seeds} seeds per cell; training loss = mean of "
        f"the last 10% of steps, averaged over the seeds; thresholds {', '.join(f'{t:g}' for t in grid)}; "
        f"{time.time() - t0:.0f} s\n\n"
        + table(["lr", "unclipped", "best threshold", "its loss", "auto", "auto / best", "worst seed"], rows)
        + "\n\nEvery threshold (mean loss; * the best at that lr):\n\n"
        + table(["lr", *[f"clip={t:g}" for t in grid], "auto"], every)
        + "\n"
    )
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
