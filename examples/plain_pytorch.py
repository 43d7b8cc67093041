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

from typing import Optional

import torch
from _shared import LoopRecord, example_parser, mlp, parse_loop_args, print_summary, progress, regression_data
from torch import nn

from lightning_l0l1 import GradientClipper
from lightning_l0l1.functional import clip_gradients_, grad_norm


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    parser.add_argument("--mode", default="clip", choices=["clip", "adaptive", "l0l1", "none"])
    parser.add_argument("--max-norm", type=float, default=0.5, help="gamma for clip/adaptive")
    parser.add_argument("--l0", type=float, default=1.0, help="L0 for --mode l0l1")
    parser.add_argument("--l1", type=float, default=1.0, help="L1 for --mode l0l1")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    args = parse_loop_args(parser, argv)  # and --steps, --hidden, --batch-size, --seed, --log-every, --out ...

    torch.manual_seed(args.seed)
    dim = 16
    x, y = regression_data(4096, dim, args.seed).tensors
    model = mlp(dim, args.hidden, depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    clipper = GradientClipper(mode="l0l1", l0=args.l0, l1=args.l1) if args.mode == "l0l1" else None

    gen = torch.Generator().manual_seed(args.seed + 1)
    with LoopRecord(args, f"plain_pytorch {args.mode}") as record:  # the norms as tensors; W&B every --log-every
        for step in progress(range(args.steps), args.steps, args, f"plain PyTorch, {args.mode}"):
            idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.mode in ("clip", "adaptive"):
                norm = clip_gradients_(model.parameters(), args.max_norm, mode=args.mode)
            elif clipper is not None:
                out = clipper.step(opt, loss=loss)  # scales in place; the loss feeds auto's divergence watch
                assert out is not None
                norm = out.norm
            else:
                norm = grad_norm(model.parameters())
            record.add(step, loss, norm, after=grad_norm(model.parameters()))
            opt.step()

    summary = record.summary("final_loss", "first_loss", "mean_grad_norm", "max_grad_norm", "max_grad_norm_after",
                             "clipped_fraction")
    if clipper is not None:
        summary.update({k.split("/", 1)[1]: v for k, v in clipper.latest().items() if "lr_effective" in k})
    print_summary(f"mode={args.mode} lr={args.lr} steps={args.steps}", summary)
    return summary


if __name__ == "__main__":
    main()
