"""Host memory one optimizer step of each configuration holds and uses, against the gradient bytes.

Each configuration runs in a fresh process (so allocator caches do not carry over), on the CPU, in
three phases read from ``/proc/self/status``:

* **held**: the growth of the process's anonymous resident memory (``RssAnon``: what allocations
  occupy) over the first 12 steps (the estimator takes its snapshot on the first step, forms its first
  pair on the second and first folds its hull on the ninth: every code path has run);
* **transient**: the peak resident memory over 10 more steps, above the resident memory before them
  (the peak is reset first, through ``/proc/self/clear_refs``): what a step allocates and frees;
* **library code**: the growth of file-backed resident memory (``RssFile``) over the first 12 steps:
  the pages of torch's own kernels read from disk the first time an operation runs. They are shared
  with every process that uses them and freed under memory pressure; a count of bytes, not of the
  model's size, and reported apart from what the configuration allocates.

``extra over L0L1 clip`` is held plus transient beyond ``L0L1 clip``'s; the snapshot buffers column
counts the estimator's buffers exactly. Held memory can come out below the buffers when the allocator
places them in pages the process had already touched and freed (making the bfloat16 gradients frees
their float32 originals). Linux only (on a GPU, ``torch.cuda.max_memory_allocated``
would be the measure).

    python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
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


def status() -> dict[str, int]:
    """Resident memory from ``/proc/self/status``, in bytes: total, its peak, anonymous, file-backed."""
    wanted = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[wanted[key]] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset the peak resident set size to the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


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

    start = status()
    for _ in range(12):
        step()
    warm = status()
    reset_peak()
    before = status()["rss"]
    for _ in range(10):
        step()
    transient = status()["peak"] - before
    held = 0
    if kw is not None:  # the estimator's snapshot buffers, counted exactly
        for st in cb.clipper._states.values():
            if st.estimator is not None:
                held += st.estimator.snapshot.nbytes
    return dict(grad_bytes=grad_bytes, anon=warm["anon"] - start["anon"], transient=transient,
                code=warm["file"] - start["file"], buffers=held)


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
                [name, r["anon"] / gb, r["transient"] / gb,
                 (r["anon"] + r["transient"] - base["anon"] - base["transient"]) / gb, r["buffers"] / gb,
                 r["code"] / 2**20]
                for name, r in results.items()
            ]
            out.append(f"\n### {dtype} gradients, {n / 1e6:.0f}M parameters, {gb / 1e6:.0f} MB\n")
            out.append(table(["configuration", "held / grad bytes", "transient / grad bytes",
                              "extra over L0L1 clip / grad bytes", "snapshot buffers / grad bytes",
                              "library code paged in (MB)"], rows))
    report = "\n".join(out) + "\n"
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
