"""Per-step cost of the statistics (``log_stats``): off, published every step, published every 50 steps.

The callback's two per-step hooks (``on_before_optimizer_step``, then ``on_train_batch_end``, which
publishes when an interval is complete) run on synthetic gradients with a fake trainer and a no-op
logger, in blocks of 50 optimizer steps; the configurations alternate within every repetition and
the table gives the median time per step, the extra over ``log_stats=False`` and the host reads per
block (counted as the tests count them, ``tests/_sync.py``: ``aten._local_scalar_dense``,
``Tensor.tolist``/``numpy`` calls and CUDA-syncing kernels). ``mode="clip"`` with
``nonfinite="propagate"``: the clipping itself reads nothing on the host, so every read is the
statistics'.

    python benchmarks/bench_stats.py            # full: ~1M and 25M parameters
    python benchmarks/bench_stats.py --quick    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, fake_trainer, machine, make_params, table, time_cases

BLOCK = 50  # optimizer steps per timed call
CONFIGS = [
    ("log_stats=False", dict(log_stats=False)),
    ("log_stats=True, every step", dict(log_stats=True, log_every_n_steps=1)),
    (f"log_stats=True, every {BLOCK} steps", dict(log_stats=True, log_every_n_steps=BLOCK)),
]


class NoOpLogger:
    """Receives the published metrics and drops them (the cost of a real logger is not the callback's)."""

    def __init__(self) -> None:
        self.calls = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls += 1


def configs(params: list[torch.nn.Parameter]) -> dict[str, Any]:
    from lightning_l0l1 import L0L1Clipping

    cases = {}
    for label, kw in CONFIGS:
        opt = torch.optim.SGD(params, lr=0.1)
        trainer = fake_trainer(opt)
        trainer.loggers = [NoOpLogger()]
        trainer.is_global_zero = True
        trainer.log_every_n_steps = BLOCK
        trainer.current_epoch = 0
        cb = L0L1Clipping(mode="clip", max_norm=1.0, nonfinite="propagate", **kw)

        def block(cb=cb, trainer=trainer, opt=opt) -> None:
            for i in range(BLOCK):
                cb.on_before_optimizer_step(trainer, None, opt)
                trainer.global_step += 1
                cb.on_train_batch_end(trainer, None, None, None, i)
            cb.on_train_epoch_end(trainer, None)  # a block is an epoch: the per-epoch norm list is dropped

        cases[label] = block
    return cases


def run(sizes, devices, reps: int) -> str:
    out = [f"Machine: {machine()}\n"]
    for device in devices:
        for n in sizes:
            params = make_params(n, torch.float32, device)
            rows = time_cases(params, configs(params), "log_stats=False", reps, device, BLOCK)
            n_real = sum(p.numel() for p in params)
            out.append(
                f"\n### {device}, float32 gradients, {n_real / 1e6:.1f}M parameters ({len(params)} tensors), "
                f"blocks of {BLOCK} steps, median of {reps}\n"
            )
            out.append(
                table(
                    ["configuration", "ms / step (median)", "extra ms / step", "extra %",
                     f"host reads / {BLOCK} steps"],
                    rows,
                )
            )
    return "\n".join(out) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny size and few repetitions (smoke test)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_stats.md")
    args = ap.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        sizes, reps = [2e5], args.reps or 3
    else:
        sizes, reps = [1e6, 25e6], args.reps or 15
    return emit(run(sizes, devices, reps), args.out, args.quick)


if __name__ == "__main__":
    main()
