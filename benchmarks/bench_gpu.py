"""Per-step cost of ``auto`` against ``clip_grad_norm_`` on a GPT-2-small-shaped set of parameters, on a GPU.

The parameters have GPT-2 small's shapes (124M parameters in 148 tensors: token and position
embeddings, 12 blocks of attention and MLP matrices with their biases and layer norms). Each
configuration runs the callback's hook (``L0L1Clipping.on_before_optimizer_step``, Lightning's trainer
reduced to what the hook reads) or torch's function on the same gradients; the table gives the median
time per step (CUDA-synchronised, interleaved repetitions), the ratio to ``clip_grad_norm_``, and the GPU
kernels one step launches, counted with ``torch.profiler`` (kernels, copies and fills on the device).
On a machine without CUDA it runs on the CPU (a smoke test; no kernel count).

    python benchmarks/bench_gpu.py                      # float32 and bfloat16 gradients
    python benchmarks/bench_gpu.py --quick              # 2 blocks, a few repetitions
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, fake_trainer, interleaved, machine, params_of, sync, table


def gpt2_small_shapes(blocks: int = 12, vocab: int = 50257, context: int = 1024, d: int = 768) -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes (Hugging Face's layout: ``Conv1D`` weights are ``(in, out)``)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def kernels(fn: Callable[[], Any], device: str) -> Optional[int]:
    """GPU kernels, copies and fills one call launches (``None`` off CUDA)."""
    if not device.startswith("cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def cases(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], Any]]:
    from lightning_l0l1 import L0L1Clipping

    opt = torch.optim.AdamW(params, lr=1e-4, fused=params[0].is_cuda)
    trainer = fake_trainer(opt)
    out: dict[str, Callable[[], Any]] = {
        "torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
    }
    for label, kw in [
        ("L0L1 clip", dict(mode="clip", max_norm=1.0, nonfinite="propagate")),
        ("L0L1 auto", dict(mode="auto", nonfinite="propagate")),
        ("L0L1 auto, nonfinite='skip'", dict(mode="auto")),
    ]:
        cb = L0L1Clipping(**kw)  # type: ignore[arg-type]
        for _ in range(3):  # a snapshot, then pairs: the steady state
            cb.on_before_optimizer_step(trainer, None, opt)  # type: ignore[arg-type]
        out[label] = lambda cb=cb: cb.on_before_optimizer_step(trainer, None, opt)  # type: ignore[misc]
    return out


def measure(params: list[torch.nn.Parameter], reps: int, device: str) -> list[list[Any]]:
    saved = [p.grad.clone() for p in params]  # type: ignore[union-attr]

    def reset() -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g)  # type: ignore[union-attr]

    fns = cases(params)
    times = interleaved(fns, reset, reps, device)
    rows = []
    for name, fn in fns.items():
        reset()
        n = kernels(fn, device)
        rows.append([name, times[name] * 1e3, times[name] / times["torch clip_grad_norm_"], "-" if n is None else n])
    return rows


def main(argv: Optional[list[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="repeat the interleaved measurement; medians")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_gpu.md")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = gpt2_small_shapes(blocks=2, vocab=5000, context=256) if args.quick else gpt2_small_shapes()
    reps = args.reps or (3 if args.quick else 30)
    rounds = 1 if args.quick else args.rounds
    n = sum(torch.Size(s).numel() for s in shapes)
    out = [f"Machine: {machine()}", f"GPT-2-small-shaped parameters: {n / 1e6:.1f}M in {len(shapes)} tensors, "
           f"AdamW; median of {reps} interleaved repetitions, median over {rounds} round(s), on {device}."]
    for dtype in (torch.float32, torch.bfloat16):
        params = params_of(shapes, dtype, device)
        runs = [measure(params, reps, device) for _ in range(rounds)]
        rows = [[r[0][0], statistics.median(x[1] for x in r), statistics.median(x[2] for x in r), r[0][3]]
                for r in zip(*runs)]
        out.append(f"\n### {str(dtype).replace('torch.', '')} gradients\n")
        out.append(table(["configuration", "ms per step", "x clip_grad_norm_", "GPU kernels per step"], rows))
        del params
    return emit("\n\n".join(out) + "\n", args.out, args.quick)


if __name__ == "__main__":
    main()
