"""How close the sampled snapshot's secant is to the exact one, along real training trajectories.

At every step of a training run (driven by ``auto`` with the full snapshot, so the trajectory is the
exact estimator's), the exact differences ``||g_t - g_{t-1}||``, ``||theta_t - theta_{t-1}||`` are
computed from whole copies kept by this script, and the sampled estimates from a
:class:`lightning_l0l1.snapshots.SampledSnapshot` fed the same tensors. The table gives the
distribution of the relative error of each, and of the secant smoothness (their ratio), over the
steps, and the estimator's outputs (``low``, ``ratio``, ``L0``, ``L1``) at the end of the run from
each set of pairs.

    python benchmarks/bench_secant_accuracy.py            # an LSTM (hidden 256) and a 4-layer MLP
    python benchmarks/bench_secant_accuracy.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, table
from bench_lstm import CharLSTM, corpus

from lightning_l0l1 import GradientClipper
from lightning_l0l1.estimator import envelope_init, envelope_update, secant_pair
from lightning_l0l1.snapshots import SAMPLE_BLOCK, SAMPLE_MIN_BLOCKS, SAMPLE_STRIDE, SampledSnapshot


def lstm_task(hidden: int, seed: int):
    ids, vocab = corpus()
    torch.manual_seed(seed)
    model = CharLSTM(vocab, hidden)
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    g = torch.Generator().manual_seed(seed)
    n = len(ids) - 33

    def loss() -> torch.Tensor:
        chunk = ids[torch.randint(n, (16,), generator=g)[:, None] + torch.arange(33)]
        return nn.functional.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())

    return model, opt, loss, f"char LSTM (2 layers, hidden {hidden}), SGD lr 20"


def mlp_task(width: int, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                          nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 10, generator=g)

    def loss() -> torch.Tensor:
        x = torch.randn(64, 64, generator=g)
        return nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1))

    return model, opt, loss, f"MLP 64-{width}-{width}-{width}-10, SGD lr 0.5 momentum 0.9"


def quantiles(xs: list[float]) -> list[float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return [statistics.median(xs), pick(0.9), xs[-1]]


def measure(task, steps: int, sample: dict) -> tuple[list[list], list[list], int, int]:
    model, opt, loss_fn, _ = task
    clipper = GradientClipper(mode="auto", snapshot="full", nonfinite="propagate")
    params = [p for p in model.parameters()]
    sampled = SampledSnapshot(**sample)
    prev = None
    errors: dict[str, list[float]] = {"gradient difference norm": [], "step length": [], "secant smoothness": []}
    env_exact, env_sampled = envelope_init(), envelope_init()
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        grads = [p.grad.detach() for p in params]
        theta = [p.detach() for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
        if prev is not None:
            pg, pt, pnorm = prev
            exact = [torch.linalg.vector_norm(torch.cat([(a - b).reshape(-1) for a, b in zip(old, new)]).double())
                     for old, new in ((pg, grads), (pt, theta))]
            dg, dp = sampled.differences(grads, theta, 2.0)
            est = [torch.linalg.vector_norm(torch.cat(d).double()) for d in (dg, dp)]
            for name, e, x in (("gradient difference norm", est[0], exact[0]), ("step length", est[1], exact[1]),
                               ("secant smoothness", est[0] / est[1], exact[0] / exact[1])):
                errors[name].append(abs(float(e / x) - 1.0))
            env_exact = envelope_update(env_exact, *secant_pair(exact[0], exact[1], pnorm, norm))
            env_sampled = envelope_update(env_sampled, *secant_pair(est[0], est[1], pnorm, norm))
        sampled.take(grads, theta, norm, t)
        prev = ([x.clone() for x in grads], [x.clone() for x in theta], norm)
        clipper.step(opt)
        opt.step()
    rows = [[name, *quantiles(v)] for name, v in errors.items()]
    outputs = []
    for name in ("low", "ratio", "l0", "l1"):
        a, b = float(getattr(env_exact, name)), float(getattr(env_sampled, name))
        outputs.append([name, a, b, b / a - 1.0 if a else float("nan")])
    n_params = sum(p.numel() for p in params)
    kept = sum(b.numel() for b in sampled.grads)
    return rows, outputs, n_params, kept


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--min-blocks", type=int, default=None)
    ap.add_argument("--tasks", type=str, default="lstm,mlp")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_secant_accuracy.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    known = {"lstm": lambda: lstm_task(256, 0), "mlp": lambda: mlp_task(1024, 0)}
    tasks = [known[k] for k in args.tasks.split(",")]
    sample = dict(block=args.block, stride=args.stride, min_blocks=args.min_blocks)
    if args.quick:
        args.steps, tasks = 5, [lambda: mlp_task(256, 0)]
    out = [f"Machine: {machine()}\n\nSampled snapshot: one block of {SAMPLE_BLOCK} elements in {SAMPLE_STRIDE}, "
           f"tensors of fewer than {2 * SAMPLE_BLOCK * SAMPLE_MIN_BLOCKS} elements whole; {args.steps} steps per "
           "run, the trajectory of `auto` with the full snapshot.\n"]
    for make in tasks:
        t0 = time.time()
        task = make()
        rows, outputs, n_params, kept = measure(task, args.steps, sample)
        out.append(f"\n### {task[3]}: {n_params / 1e6:.2f}M parameters, {kept / n_params:.1%} of them sampled; "
                   f"{time.time() - t0:.0f} s\n")
        out.append(table(["relative error of", "median", "90th percentile", "max"], rows))
        out.append("\nThe estimates after the run, from the exact pairs and from the sampled ones:\n")
        out.append(table(["estimate", "exact pairs", "sampled pairs", "relative difference"], outputs))
    return emit("\n".join(out) + "\n", args.out, args.quick)


if __name__ == "__main__":
    main()
