"""Lightning Fabric: your own loop, Fabric for devices and precision, `lightning_l0l1.functional` to clip.

    python examples/fabric.py
    python examples/fabric.py --mode adaptive --steps 100
    python examples/fabric.py --help

Clip after `fabric.backward(loss)` (which unscales mixed-precision gradients and, under
DDP, has all-reduced them), before `optimizer.step()`. `clip_gradients_` returns the global
norm before scaling as a tensor: nothing is read on the host in the loop. The data are
synthetic.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

import torch
from lightning_fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_l0l1.functional import clip_gradients_, grad_norm


def make_data(n: int, dim: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, generator=g) / math.sqrt(dim)
    y = 3 * torch.sin(x @ w).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="clip", choices=["clip", "adaptive"])
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(args.seed, verbose=False)
    dim = 16
    model = nn.Sequential(nn.Linear(dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    model, opt = fabric.setup(model, opt)
    loader = fabric.setup_dataloaders(
        DataLoader(make_data(args.steps * args.batch_size, dim, args.seed), batch_size=args.batch_size, shuffle=True)
    )

    norms, after, losses = [], [], []
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        norms.append(clip_gradients_(model.parameters(), args.max_norm, mode=args.mode))
        after.append(grad_norm(model.parameters()))
        opt.step()
        losses.append(loss.detach())

    norms_t, after_t, losses_t = torch.stack(norms), torch.stack(after), torch.stack(losses)
    tail = max(1, len(losses) // 10)
    summary = {
        "steps": float(len(losses)),
        "first_loss": float(losses_t[0]),
        "final_loss": float(losses_t[-tail:].mean()),
        "mean_grad_norm": float(norms_t.mean()),
        "max_grad_norm_after": float(after_t.max()),
        "clipped_fraction": float((after_t < norms_t * (1 - 1e-4)).float().mean()),
    }
    fabric.print(f"mode={args.mode} max_norm={args.max_norm} lr={args.lr}")
    for k, v in summary.items():
        fabric.print(f"  {k:22s} {v:.4g}")
    return summary


if __name__ == "__main__":
    main()
