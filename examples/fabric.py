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

from typing import Optional

import torch
from _shared import LoopRecord, example_parser, mlp, parse_loop_args, print_summary, progress, regression_data
from lightning_fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader

from lightning_l0l1.functional import clip_gradients_, grad_norm


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    parser.add_argument("--mode", default="clip", choices=["clip", "adaptive"])
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parse_loop_args(parser, argv)  # and --steps, --hidden, --batch-size, --seed, --log-every, --out ...

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
    # the norms as tensors; W&B (rank zero) every --log-every steps
    with LoopRecord(args, f"fabric {args.mode}", wandb=fabric.is_global_zero) as record:
        for step, (x, y) in enumerate(progress(loader, len(loader), args, f"Fabric, {args.mode}")):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            norm = clip_gradients_(model.parameters(), args.max_norm, mode=args.mode)
            record.add(step, loss, norm, after=grad_norm(model.parameters()))
            opt.step()

    summary = record.summary("steps", "first_loss", "final_loss", "mean_grad_norm", "max_grad_norm_after",
                             "clipped_fraction")
    print_summary(f"mode={args.mode} max_norm={args.max_norm} lr={args.lr}", summary, echo=fabric.print)
    return summary


if __name__ == "__main__":
    main()
