"""Lightning Fabric: your own loop, Fabric for devices and precision, `lightning_l0l1.functional` to clip.

    python examples/fabric.py
    python examples/fabric.py --mode adaptive --steps 100
    python examples/fabric.py --help

Clip after `fabric.backward(loss)` (which unscales mixed-precision gradients and, under
DDP, has all-reduced them), before `optimizer.step()`. `clip_gradients_` returns the global
norm before scaling as a tensor: nothing is read on the host in the loop, except the W&B
log every --log-every steps (offline by default). The data are synthetic.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from _shared import add_output_args, mlp, progress, regression_data, require_positive, wandb_run
from lightning_fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader

from lightning_l0l1.functional import clip_gradients_, grad_norm


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="clip", choices=["clip", "adaptive"])
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights and data order)")
    parser.add_argument("--log-every", type=int, default=10, help="W&B logging interval in steps")
    add_output_args(parser)
    args = parser.parse_args(argv)
    require_positive(parser, args, "steps", "hidden", "batch_size", "log_every")

    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(args.seed, verbose=False)
    dim = 16
    model = mlp(dim, args.hidden, depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    model, opt = fabric.setup(model, opt)
    loader = fabric.setup_dataloaders(
        DataLoader(regression_data(args.steps * args.batch_size, dim, args.seed), batch_size=args.batch_size,
                   shuffle=True)
    )
    run = wandb_run(args, f"fabric {args.mode}", vars(args)) if fabric.is_global_zero else None

    norms, after, losses = [], [], []
    try:
        for step, (x, y) in enumerate(progress(loader, len(loader), args, f"Fabric, {args.mode}")):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            norms.append(clip_gradients_(model.parameters(), args.max_norm, mode=args.mode))
            after.append(grad_norm(model.parameters()))
            opt.step()
            losses.append(loss.detach())
            if run is not None and (step + 1) % args.log_every == 0:
                row = {"train_loss": loss.detach(), "grad_norm": norms[-1], "grad_norm_scaled": after[-1]}
                run.log({k: float(v) for k, v in row.items()}, step=step)
    finally:
        if run is not None:
            run.finish()

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
