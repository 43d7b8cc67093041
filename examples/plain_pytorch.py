"""Plain PyTorch: clip the global gradient in your own loop with `lightning_l0l1.functional`.

    python examples/plain_pytorch.py                   # hard clipping (clip_gradients_)
    python examples/plain_pytorch.py --mode adaptive   # gamma / (||g|| + gamma)
    python examples/plain_pytorch.py --mode l0l1       # the (L0,L1) step (GradientClipper)
    python examples/plain_pytorch.py --mode none       # no clipping, for comparison
    python examples/plain_pytorch.py --help

Only torch is imported (no Lightning). `clip_gradients_` scales the gradients in place
and returns the norm before scaling; `grad_norm` measures the norm after it;
`GradientClipper.step(optimizer)` applies the `l0l1` rule per param group (it needs the
learning rates, so it takes the optimizer). The data are synthetic.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

import torch
from torch import nn

from lightning_l0l1 import GradientClipper
from lightning_l0l1.functional import clip_gradients_, grad_norm


def make_data(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, generator=g) / math.sqrt(dim)
    y = 3 * torch.sin(x @ w).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="clip", choices=["clip", "adaptive", "l0l1", "none"])
    parser.add_argument("--max-norm", type=float, default=0.5, help="gamma for clip/adaptive")
    parser.add_argument("--l0", type=float, default=1.0, help="L0 for --mode l0l1")
    parser.add_argument("--l1", type=float, default=1.0, help="L1 for --mode l0l1")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    dim = 16
    x, y = make_data(4096, dim, args.seed)
    model = nn.Sequential(nn.Linear(dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden), nn.Tanh(),
                          nn.Linear(args.hidden, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    clipper = GradientClipper(mode="l0l1", l0=args.l0, l1=args.l1) if args.mode == "l0l1" else None

    norms, scaled, losses = [], [], []
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.mode in ("clip", "adaptive"):
            norm = clip_gradients_(model.parameters(), args.max_norm, mode=args.mode)
        elif clipper is not None:
            out = clipper.step(opt)  # scales in place; out.norm is the norm before scaling
            assert out is not None
            norm = out.norm
        else:
            norm = grad_norm(model.parameters())
        after = grad_norm(model.parameters())
        opt.step()
        # Kept as tensors: one host read at the end, none per step.
        norms.append(norm.detach())
        scaled.append(after)
        losses.append(loss.detach())

    norms_t, scaled_t, losses_t = torch.stack(norms), torch.stack(scaled), torch.stack(losses)
    tail = max(1, args.steps // 10)
    summary = {
        "final_loss": float(losses_t[-tail:].mean()),
        "first_loss": float(losses_t[0]),
        "mean_grad_norm": float(norms_t.mean()),
        "max_grad_norm": float(norms_t.max()),
        "max_grad_norm_after": float(scaled_t.max()),
        "clipped_fraction": float((scaled_t < norms_t * (1 - 1e-4)).float().mean()),
    }
    if clipper is not None:
        summary.update({k.split("/", 1)[1]: v for k, v in clipper.latest().items() if "lr_effective" in k})
    print(f"mode={args.mode} lr={args.lr} steps={args.steps}")
    for k, v in summary.items():
        print(f"  {k:22s} {v:.4g}")
    return summary


if __name__ == "__main__":
    main()
