"""Per-step cost of the callback's gradient work against torch and Lightning, and the memory-traffic floor.

For each model size and gradient dtype, on the CPU (and on the GPU when there is one), the
configurations below run interleaved on the same gradients; the table gives the median time,
the ratio to ``torch.nn.utils.clip_grad_norm_`` (foreach; with ``--rounds R`` the whole interleaved
measurement is repeated R times and the table gives the median over the rounds and the range of the
ratio, since on a shared machine the memory bandwidth drifts between rounds), the achieved fraction of the
memory-traffic floor (3 x gradient bytes / bandwidth, bandwidth measured in the same run by a
plain copy of the same size), the host syncs per step and the bytes the step allocates.

    python benchmarks/bench_step.py            # full: ~1M, 25M, 100M parameters
    python benchmarks/bench_step.py --quick    # seconds; what the test suite runs
    python benchmarks/bench_step.py --devices cuda --out benchmarks/results/bench_step_cuda.md   # GPU rows only
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OpCounter, emit, fake_trainer, interleaved, machine, make_params, sync, table


def configs(params, max_norm: float = 1.0):
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.utilities.grads import grad_norm as pl_grad_norm

    from lightning_l0l1 import L0L1Clipping

    opt = torch.optim.SGD(params, lr=0.1)
    trainer = fake_trainer(opt)
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList(params)
    precision = Precision()
    cases = {
        "no clipping": lambda: None,
        "torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True),
        "Lightning gradient_clip_val": lambda: precision.clip_gradients(opt, max_norm),
        "Lightning grad_norm (logging utility)": lambda: pl_grad_norm(module, 2.0),
    }
    for label, kw in [
        ("L0L1 clip", dict(mode="clip", max_norm=max_norm, nonfinite="propagate")),
        ("L0L1 adaptive", dict(mode="adaptive", max_norm=max_norm, nonfinite="propagate")),
        ("L0L1 l0l1", dict(mode="l0l1", l0=1.0, l1=1.0, nonfinite="propagate")),
        ("L0L1 clip, nonfinite=skip", dict(mode="clip", max_norm=max_norm, nonfinite="skip")),
        ("L0L1 auto (sampled snapshot)", dict(mode="auto", nonfinite="propagate")),
        ("L0L1 auto, full snapshot", dict(mode="auto", nonfinite="propagate", snapshot="full")),
        ("L0L1 auto, full, estimate_every=4", dict(mode="auto", nonfinite="propagate", snapshot="full",
                                                   estimate_every=4)),
        ("L0L1 auto, full snapshot on cpu", dict(mode="auto", nonfinite="propagate", snapshot_device="cpu")),
    ]:
        cb = L0L1Clipping(**kw)
        cases[label] = lambda cb=cb: cb.on_before_optimizer_step(trainer, None, opt)
    return cases


def run(sizes, dtypes, devices, reps: int, rounds: int = 1) -> str:
    out = [f"Machine: {machine()}\n"]
    for device in devices:
        for dtype in dtypes:
            for n in sizes:
                params = make_params(n, dtype, device)
                saved = [p.grad.clone() for p in params]
                grad_bytes = sum(g.numel() * g.element_size() for g in saved)
                # Filled, not `empty`: untouched pages all map to the zero page and read far faster
                # than real memory (measured: a norm of an `empty` 113 MB tensor ran 3.8x faster).
                flat_src = torch.ones(grad_bytes // 4, dtype=torch.float32, device=device)
                flat_dst = torch.zeros_like(flat_src)

                def reset(params=params, saved=saved):
                    for p, g in zip(params, saved):
                        if p.grad is None:
                            p.grad = g.clone()
                        else:
                            p.grad.copy_(g)

                cases = configs(params)
                cases["plain copy (bandwidth probe)"] = lambda s=flat_src, d=flat_dst: d.copy_(s)
                per_round = [interleaved(cases, reset, reps, device) for _ in range(rounds)]
                times = {k: statistics.median(r[k] for r in per_round) for k in cases}
                ratios = {k: [r[k] / r["torch clip_grad_norm_"] for r in per_round] for k in cases}
                bandwidth = 2 * grad_bytes / times.pop("plain copy (bandwidth probe)")
                floor = 3 * grad_bytes / bandwidth
                rows = []
                for name, t in times.items():
                    reset()
                    counter = OpCounter()
                    with counter:
                        cases[name]()
                    sync(device)
                    rows.append(
                        [
                            name,
                            t * 1e3,
                            statistics.median(ratios[name]),
                            floor / t if name != "no clipping" else float("nan"),
                            counter.syncs,
                            counter.alloc_bytes / grad_bytes,
                            f"{min(ratios[name]):.3g}-{max(ratios[name]):.3g}" if rounds > 1 else "-",
                        ]
                    )
                n_real = sum(p.numel() for p in params)
                out.append(
                    f"\n### {device}, {str(dtype).replace('torch.', '')} gradients, {n_real / 1e6:.1f}M parameters "
                    f"({len(params)} tensors), bandwidth {bandwidth / 1e9:.1f} GB/s, floor {floor * 1e3:.3f} ms\n"
                )
                out.append(
                    table(
                        ["configuration", "ms (median)", "x clip_grad_norm_", "floor / time", "host syncs",
                         "allocated / grad bytes", f"x clip_grad_norm_, range over {rounds} rounds"],
                        rows,
                    )
                )
    return "\n".join(out) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (smoke test)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--devices", type=str, default=None,
                    help="comma-separated, e.g. cuda (default: cpu, and cuda where there is one)")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated parameter counts, e.g. 25e6,100e6")
    ap.add_argument("--rounds", type=int, default=None,
                    help="repeat the interleaved measurement this many times (default 5; --quick 1)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_step.md")
    args = ap.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.quick:
        sizes, reps = [2e5], args.reps or 3
    else:
        sizes, reps = [1e6, 25e6, 100e6], args.reps or 15
    if args.sizes:
        sizes = [float(x) for x in args.sizes.split(",") if x.strip()]
    rounds = args.rounds or (1 if args.quick else 5)
    if rounds < 1:
        ap.error(f"--rounds takes a positive number, got {rounds}")
    report = run(sizes, [torch.float32, torch.bfloat16], devices, reps, rounds)
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
