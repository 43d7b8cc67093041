"""Plain PyTorch: clip the global gradient in your own loop with `lightning_l0l1.functional`.

    python examples/plain_pytorch.py                   # hard clipping (clip_gradients_)
    python examples/plain_pytorch.py --mode adaptive   # gamma / (||g|| + gamma)
    python examples/plain_pytorch.py --mode l0l1       # the (L0,L1) step (GradientClipper)
    python examples/plain_pytorch.py --mode none       # no clipping, for comparison
    python examples/plain_pytorch.py --help

Only torch is imported (no Lightning). `clip_gradients_` scales the gradients in place
and returns the norm before scaling; `grad_norm` measures the norm after it;
`GradientClipper.step(optimizer)` applies the `l0l1` rule per param group (it needs the
learning rates, so it takes the optimizer). The data are synthetic. Logs the loss and
the norms to W&B every --log-every steps (offline by default: one host read per log).
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from _shared import add_output_args, mlp, progress, regression_data, require_positive, wandb_run
from torch import nn

from lightning_l0l1 import GradientClipper
from lightning_l0l1.functional import clip_gradients_, grad_norm


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="clip", choices=["clip", "adaptive", "l0l1", "none"])
    parser.add_argument("--max-norm", type=float, default=0.5, help="gamma for clip/adaptive")
    parser.add_argument("--l0", type=float, default=1.0, help="L0 for --mode l0l1")
    parser.add_argument("--l1", type=float, default=1.0, help="L1 for --mode l0l1")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights and data order)")
    parser.add_argument("--log-every", type=int, default=10, help="W&B logging interval in steps")
    add_output_args(parser)
    args = parser.parse_args(argv)
    require_positive(parser, args, "steps", "hidden", "batch_size", "log_every")

    torch.manual_seed(args.seed)
    dim = 16
    x, y = regression_data(4096, dim, args.seed).tensors
    model = mlp(dim, args.hidden, depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    clipper = GradientClipper(mode="l0l1", l0=args.l0, l1=args.l1) if args.mode == "l0l1" else None

    norms, scaled, losses = [], [], []
    gen = torch.Generator().manual_seed(args.seed + 1)
    run = wandb_run(args, f"plain_pytorch {args.mode}", vars(args))
    try:
        for step in progress(range(args.steps), args.steps, args, f"plain PyTorch, {args.mode}"):
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
            if run is not None and (step + 1) % args.log_every == 0:
                row = {"train_loss": loss.detach(), "grad_norm": norm.detach(), "grad_norm_scaled": after}
                run.log({k: float(v) for k, v in row.items()}, step=step)
    finally:
        if run is not None:
            run.finish()

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
