"""Device operations per clipping step, counted, against the number of gradient tensors.

On a GPU the host pays about 5 us per kernel launch whatever the kernel's size, so what a step
costs there grows with the operations it issues. This script counts, with a ``TorchDispatchMode``,
the aten operations one step issues (on the CPU: the same operations a CUDA run would issue):

* ``ops``: every non-view operation, except allocations that launch nothing (``empty``), and with a
  ``_foreach`` call counted once per tensor when a tensor it gets is not dense (torch's multi-tensor
  kernels then fall back to a loop over the tensors, one launch each);
* ``launches (est.)``: ``ops`` with each dense ``_foreach`` call counted as the multi-tensor kernels
  torch would launch for it (at most 110/64/48/36/30 tensors for 1-5 tensor lists, and 320 chunks of
  65536 elements, per launch) and each ``cat`` as its batched kernel's launches (64 strided or 128
  contiguous inputs per launch). An estimate from torch's launch limits, not a measurement;
* ``host reads``: what ``tests/_sync.py`` counts (each a stall of the host on CUDA).

The tensors are ``--size`` x ``--size`` float32 gradients of as many parameters; ``auto`` is counted at
a step where it forms a secant pair (its most expensive kind of step).

    python benchmarks/bench_launches.py            # 10, 100 and 400 tensors
    python benchmarks/bench_launches.py --quick    # what the test suite runs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch._prims_common
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HostReads, emit, machine, table

_FREE = {"empty", "empty_strided", "empty_like", "_local_scalar_dense"}
#: torch's multi-tensor kernels: the most tensors one launch takes, by number of tensor lists
_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MAX_CHUNKS, _CHUNK = 320, 65536


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: what torch's multi-tensor fast path asks of every tensor."""
    return bool(torch._prims_common.is_non_overlapping_and_dense_or_false(t))


class OpCount(TorchDispatchMode):
    """``ops`` and ``launches`` as the module docstring defines them, and the ops by name (``by_name``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.launches = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in _FREE:
            ops, launches = self._cost(name, args)
            self.ops += ops
            self.launches += launches
            self.by_name[name] = self.by_name.get(name, 0) + ops
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _cost(name: str, args: Any) -> tuple[int, int]:
        if name == "cat" and args and isinstance(args[0], (list, tuple)) and len(args[0]) > 1:
            # one launch per 64 strided inputs (128 contiguous ones) in torch's batched CUDA kernel
            per = 128 if all(t.is_contiguous() for t in args[0]) else 64
            return 1, -(-len(args[0]) // per)
        if not name.startswith("_foreach_"):
            return 1, 1
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if not lists:
            return 1, 1
        n = len(lists[0])
        if not all(dense(t) for t in tree_flatten(lists)[0]):
            return n, n
        chunks = sum(-(-t.numel() // _CHUNK) for t in lists[0])
        per = _MAX_TENSORS.get(len(lists), 30)
        return 1, max(-(-n // per), -(-chunks // _MAX_CHUNKS), 1)


def count(fn: Callable[[], Any]) -> tuple[OpCount, HostReads]:
    reads = HostReads()
    with OpCount() as ops, reads:
        fn()
    return ops, reads


def setup(n: int, size: int, optimizer: str = "adamw", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(size, size, generator=g) * 0.02) for _ in range(n)]
    opt = (torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=0.1, momentum=0.9))

    def fill() -> None:
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.1

    return params, opt, fill


def measure(n: int, size: int, warm: int = 6) -> dict[str, tuple[OpCount, HostReads]]:
    """One row's counts: torch's clipping, then each mode's step (after ``warm`` steps)."""
    from lightning_l0l1 import GradientClipper

    params, opt, fill = setup(n, size)
    fill()
    out = {"torch clip_grad_norm_": count(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))}
    for label, kw in [
        ("clip", dict(mode="clip", max_norm=1.0)),
        ("adaptive", dict(mode="adaptive", max_norm=1.0)),
        ("l0l1", dict(mode="l0l1", l0=1.0, l1=1.0)),
        ("auto", dict(mode="auto")),
        ("auto, full snapshot", dict(mode="auto", snapshot="full")),
    ]:
        params, opt, fill = setup(n, size)
        clipper = GradientClipper(nonfinite="propagate", **kw)  # type: ignore[arg-type]
        for _ in range(warm):
            fill()
            clipper.step(opt)
            opt.step()
        fill()
        out[label] = count(lambda clipper=clipper, opt=opt: clipper.step(opt))
    out["auto, through L0L1Clipping"] = _through_callback(n, size, warm)
    return out


def _through_callback(n: int, size: int, warm: int) -> tuple[OpCount, HostReads]:
    """``auto``'s step as the callback's hook runs it (Lightning's trainer reduced to what the hook reads)."""
    from _common import fake_trainer

    from lightning_l0l1 import L0L1Clipping

    _, opt, fill = setup(n, size)
    cb = L0L1Clipping(mode="auto", nonfinite="propagate")
    trainer = fake_trainer(opt)
    for _ in range(warm):
        fill()
        cb.on_before_optimizer_step(trainer, None, opt)  # type: ignore[arg-type]
        opt.step()
    fill()
    return count(lambda: cb.on_before_optimizer_step(trainer, None, opt))  # type: ignore[arg-type]


#: The optimizers of the host-read table, made as a CUDA run would use them by default (``foreach``) or asked.
SYNC_OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD (foreach)": lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True),
    "SGD momentum 0.9 (foreach)": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "AdamW (foreach, CUDA's default)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "AdamW (fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
}


def host_reads(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], nonfinite: str,
               n: int = 8, size: int = 128, steps: int = 5) -> float:
    """Host reads per step that ``auto`` adds to ``clipper.step(opt); opt.step()``: the reads of the pair
    minus those of the optimizer stepping alone (torch's own reads of its CPU step counters, which are no
    syncs on CUDA either), over ``steps`` steps after a warm-up."""
    from lightning_l0l1 import GradientClipper

    def run(clip: bool) -> int:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(size, size, generator=g) * 0.02) for _ in range(n)]
        opt = make(params)
        clipper = GradientClipper(mode="auto", nonfinite=nonfinite)  # type: ignore[arg-type]
        reads = HostReads()
        for t in range(steps + 3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 0.1
            if t < 3:
                if clip:
                    clipper.step(opt)
                opt.step()
                continue
            with reads:
                if clip:
                    clipper.step(opt)
                opt.step()
        return reads.n

    return (run(True) - run(False)) / steps


def main(argv: Optional[list[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", default="10,100,400")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="10 and 40 tensors of 128 x 128 (sampled)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_launches.md")
    args = ap.parse_args(argv)
    ns = [10, 40] if args.quick else [int(x) for x in args.tensors.split(",")]
    size = 128 if args.quick else args.size
    results = {n: measure(n, size) for n in ns}
    labels = list(next(iter(results.values())))
    heads = ["configuration"] + [f"{what}, {n} tensors" for what in ("ops", "launches (est.)") for n in ns]
    rows = [[lab] + [results[n][lab][0].ops for n in ns] + [results[n][lab][0].launches for n in ns]
            for lab in labels]
    reads = [[lab] + [results[n][lab][1].n for n in ns] for lab in labels]
    big = results[ns[-1]]["auto"][0].by_name
    top = sorted(big.items(), key=lambda kv: -kv[1])[:12]
    report = "\n\n".join([
        f"Machine: {machine()}",
        f"One clipping step of {size} x {size} float32 gradients (AdamW, `nonfinite='propagate'`); `auto` at a "
        "step that forms a secant pair. `ops`: non-view aten operations, a `_foreach` call over a tensor that is "
        "not dense counted once per tensor; `launches (est.)`: dense `_foreach` calls and `cat` counted as the "
        "launches of torch's multi-tensor and batched-copy CUDA kernels (an estimate from their limits).",
        table(heads, rows),
        "Host reads per step:\n\n" + table(["configuration"] + [f"{n} tensors" for n in ns], reads),
        "Host reads per step that `auto` adds to an optimizer step (`clipper.step(opt); opt.step()`, minus the "
        "optimizer's own reads), by optimizer and `nonfinite` policy:\n\n"
        + table(["optimizer", "nonfinite='propagate'", "nonfinite='skip'"],
                [[name, host_reads(make, "propagate"), host_reads(make, "skip")]
                 for name, make in SYNC_OPTIMIZERS.items()]),
        f"`auto`'s operations at {ns[-1]} tensors, the most frequent:\n\n" + table(["op", "count"], top),
    ])
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
