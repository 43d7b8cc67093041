"""Peak extra host memory of one optimizer step of each configuration, against the gradient bytes.

Each configuration runs in a fresh process (so allocator caches do not carry over): the peak
resident set size is read after the gradients exist, after two steps (the estimator takes its
snapshot on the first and forms its first pair on the second), then after ten more steps; the last
difference, over the gradient bytes, is the step's transient memory. The estimator's
snapshot is allocated at the first step and counted separately as its resident size. The last
columns are what a configuration holds beyond ``L0L1 clip`` (the estimator's whole cost, including
a few MB of one-time allocations the first pair's code paths make, whatever the model's size) and the
bytes of the estimator's snapshot buffers, counted exactly. CPU only
(on a GPU, ``torch.cuda.max_memory_allocated`` would be the measure).

    python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, fake_trainer, machine, make_params, table

CONFIGS = {
    "torch clip_grad_norm_": None,
    "L0L1 clip": dict(mode="clip", max_norm=1.0, nonfinite="propagate"),
    "L0L1 adaptive": dict(mode="adaptive", max_norm=1.0, nonfinite="propagate"),
    "L0L1 l0l1": dict(mode="l0l1", l0=1.0, l1=1.0, nonfinite="propagate"),
    "L0L1 auto (sampled snapshot)": dict(mode="auto", nonfinite="propagate"),
    "L0L1 auto, full snapshot": dict(mode="auto", nonfinite="propagate", snapshot="full"),
    "L0L1 auto, full snapshot on cpu": dict(mode="auto", nonfinite="propagate", snapshot_device="cpu"),
}


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(name: str, n: float, dtype: str) -> dict:
    params = make_params(n, getattr(torch, dtype), "cpu")
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    kw = CONFIGS[name]
    if kw is None:
        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    else:
        from lightning_l0l1 import L0L1Clipping

        opt = torch.optim.SGD(params, lr=0.1)
        trainer = fake_trainer(opt)
        cb = L0L1Clipping(**kw)

        def step():
            cb.on_before_optimizer_step(trainer, None, opt)

    before_first = maxrss()
    step()
    step()  # the estimator forms its first pair on the second step: its code paths have all run
    after_first = maxrss()
    for _ in range(10):
        step()
    after = maxrss()
    held = 0
    if kw is not None:  # the estimator's snapshot buffers, counted exactly
        for st in cb.clipper._states.values():
            if st.estimator is not None:
                snap = st.estimator.snapshot
                held += snap.nbytes
    return dict(grad_bytes=grad_bytes, first=after_first - before_first, steady=after - after_first, held=held)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_memory.md")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.child[2])))
        return ""
    sizes = [2e5] if args.quick else [25e6, 100e6]
    configs = list(CONFIGS)[:2] if args.quick else list(CONFIGS)
    out = [f"Machine: {machine()}\n"]
    for n in sizes:
        for dtype in ("float32", "bfloat16"):
            results = {}
            for name in configs:
                res = subprocess.run(
                    [sys.executable, __file__, "--child", name, str(n), dtype], capture_output=True, text=True,
                    check=True,
                )
                results[name] = json.loads(res.stdout.strip().splitlines()[-1])
            gb = results[configs[0]]["grad_bytes"]
            base = results["L0L1 clip"]
            rows = [
                [name, r["first"] / gb, r["steady"] / gb,
                 (r["first"] + r["steady"] - base["first"] - base["steady"]) / gb, r["held"] / gb]
                for name, r in results.items()
            ]
            out.append(f"\n### {dtype} gradients, {n / 1e6:.0f}M parameters, {gb / 1e6:.0f} MB\n")
            out.append(table(["configuration", "first two steps (buffers) / grad bytes",
                              "later steps peak / grad bytes", "extra over L0L1 clip / grad bytes",
                              "snapshot buffers / grad bytes"], rows))
    report = "\n".join(out) + "\n"
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
