"""Per-step cost of the per-layer gradient norms (``layer_norms``) against mode ``clip`` without them,
and against Lightning's ``grad_norm`` utility.

The callback's hooks (``setup`` once, then per optimizer step ``on_before_optimizer_step`` and
``on_train_batch_end``, which publishes every 50 steps to a no-op logger) run on synthetic gradients of a
module of transformer-like blocks (11 tensors each: one "module" per block), with a fake trainer, in
blocks of 50 optimizer steps; the configurations alternate within every repetition. The table gives the
median time per step, the extra over plain ``clip`` and the host reads per block (counted as the tests
count them, ``tests/_sync.py``). ``nonfinite="propagate"``: the clipping itself reads nothing.

The last table times the per-layer work alone (the layer norms from the vector of per-tensor norms and the
interval's update), which on a shared machine is steadier than the difference of two whole steps.

The ``grad_norm`` row is ``clip`` plus what a module does with Lightning's utility: every step
``grad_norm(module, 2)`` (one norm per parameter, and their total), and at each of the 50-step logging
points each value read on the host (what Lightning's logger connection does with ``self.log_dict``).
Its total is built with ``torch.tensor`` over the per-parameter norms, which reads CPU memory directly
(not counted here) and on a GPU copies each norm to the host every step.

    python benchmarks/bench_layer_norms.py            # full: 96 blocks of width 64, 4 of width 768
    python benchmarks/bench_layer_norms.py --quick    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, fake_trainer, machine, sync, table, time_cases

BLOCK = 50  # optimizer steps per timed call, and the logging interval
CONFIGS = [
    ("clip", dict()),
    ("clip, layer_norms='module'", dict(layer_norms="module")),
    ("clip, layer_norms='parameter'", dict(layer_norms="parameter")),
]
GRAD_NORM = "clip + Lightning grad_norm() every step"


class NoOpLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


def block_params(d: int, blocks: int, device: str, seed: int = 0) -> list[nn.Parameter]:
    """``blocks`` transformer-like blocks of width ``d``: 4 matrices and 7 vectors each (float32 gradients)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for _ in range(blocks):
        for s in [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (3 * d,), (d,), (4 * d,), (d,), (d,), (d,), (d,)]:
            p = nn.Parameter(torch.empty(s, device=device))
            p.grad = torch.randn(s, generator=g).to(device)
            params.append(p)
    return params


def as_module(params: list[nn.Parameter]) -> nn.Module:
    """The parameters as a module of blocks of 11 (``block3.p7``): one layer per block for ``"module"``."""
    root = nn.Module()
    for b in range(0, len(params), 11):
        sub = nn.Module()
        for j, p in enumerate(params[b : b + 11]):
            sub.register_parameter(f"p{j}", p)
        root.add_module(f"block{b // 11}", sub)
    return root


def _grad_norm() -> Any:
    for ns in ("lightning.pytorch", "pytorch_lightning"):
        if importlib.util.find_spec(ns.split(".")[0]) is not None:
            return importlib.import_module(f"{ns}.utilities").grad_norm
    return None


def configs(params: list[nn.Parameter]) -> dict[str, Any]:
    from lightning_l0l1 import L0L1Clipping

    module = as_module(params)
    grad_norm = _grad_norm()
    cases = {}
    for label, kw in [*CONFIGS, *([(GRAD_NORM, {})] if grad_norm is not None else [])]:
        opt = torch.optim.SGD(params, lr=0.1)
        trainer = fake_trainer(opt)
        trainer.loggers = [NoOpLogger()]
        trainer.is_global_zero = True
        trainer.log_every_n_steps = BLOCK
        trainer.current_epoch = 0
        cb = L0L1Clipping(mode="clip", max_norm=1.0, nonfinite="propagate", **kw)
        cb.setup(trainer, module, "fit")
        with_grad_norm = label == GRAD_NORM

        def block(cb=cb, trainer=trainer, opt=opt, with_grad_norm=with_grad_norm) -> None:
            logged: dict[str, torch.Tensor] = {}
            for i in range(BLOCK):
                if with_grad_norm:
                    logged = grad_norm(module, norm_type=2)
                cb.on_before_optimizer_step(trainer, None, opt)
                trainer.global_step += 1
                cb.on_train_batch_end(trainer, None, None, None, i)
            if with_grad_norm:
                {k: v.item() for k, v in logged.items()}  # the logging point reads each value
            cb.on_train_epoch_end(trainer, None)

        cases[label] = block
    return cases


def added_work(n_tensors: int, per_layer: int, device: str, reps: int, iters: int = 200) -> float:
    """Seconds per step of the per-layer work alone: the layer norms from the vector of per-tensor norms
    (``LayerGrouping.step``) and the interval's update (``LayerStatistics.update``), without the gradient
    passes around it (which dominate, and vary, on a shared machine)."""
    import statistics
    import time

    from lightning_l0l1.publish import LayerGrouping, LayerStatistics

    vec = torch.rand(n_tensors, device=device)
    segments = [(list(range(n_tensors)), vec)]
    grouping = LayerGrouping({i: f"block{i // per_layer}.p{i % per_layer}" for i in range(n_tensors)}, "module", 2.0)
    names, _ = grouping.step(segments)
    agg = LayerStatistics(len(names)).to(device)
    finite, scale = torch.tensor(True, device=device), torch.tensor(0.5, device=device)
    times = []
    for _ in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            _, norms = grouping.step(segments)
            agg.update(norms, finite, scale)
        sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times[2:])


def run(sizes, devices, reps: int) -> str:
    out = [f"Machine: {machine()}\n"]
    for device in devices:
        for d, blocks in sizes:
            params = block_params(d, blocks, device)
            rows = time_cases(params, configs(params), "clip", reps, device, BLOCK)
            n_real = sum(p.numel() for p in params)
            out.append(
                f"\n### {device}, float32 gradients, {n_real / 1e6:.1f}M parameters ({len(params)} tensors, "
                f"{(len(params) + 10) // 11} modules), blocks of {BLOCK} steps, median of {reps}\n"
            )
            out.append(
                table(
                    ["configuration", "ms / step (median)", "extra ms / step", "extra %",
                     f"host reads / {BLOCK} steps"],
                    rows,
                )
            )
        out.append(f"\n### {device}: the per-layer work alone (per step, median of {reps} x 200 steps)\n")
        rows = [[f"{n} tensors, {n // 11} modules", added_work(n, 11, device, reps) * 1e3] for n in (44, 1056, 11000)]
        out.append(table(["model", "ms / step"], rows))
    return "\n".join(out) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny size and few repetitions (smoke test)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_layer_norms.md")
    args = ap.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        sizes, reps = [(64, 8)], args.reps or 3
    else:  # many small layers (1,056 tensors, 4.7M parameters), few large ones (44 tensors, 28M)
        sizes, reps = [(64, 96), (768, 4)], args.reps or 15
    return emit(run(sizes, devices, reps), args.out, args.quick)


if __name__ == "__main__":
    main()
