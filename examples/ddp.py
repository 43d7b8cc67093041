"""DDP on two processes: the clipping norm and the statistics are global.

    python examples/ddp.py                      # 2 CPU processes (gloo); GPUs where present
    python examples/ddp.py --steps 100 --devices 4
    python examples/ddp.py --help

Each rank trains on its own half of every global batch (Lightning's DistributedSampler),
so the ranks' local losses differ; `L0L1Clipping` runs after DDP's all-reduce and
computes the norm of the *global* gradient, so every rank sees the same
`l0l1/grad_norm` at every step and applies the same scale. A small callback records, per
step and per rank, the local loss and `cb.latest()["l0l1/grad_norm"]`; at the end the
ranks gather their records with `trainer.strategy.all_gather` and rank 0 prints the
table and writes `OUT/ddp_summary.json`. The loggers (rank zero only) get the l0l1
statistics: a CSVLogger in `OUT/ddp_csv/version_0/metrics.csv` and W&B (offline by default).

`strategy="ddp"` re-runs this command line for rank 1, so run it as a script (not from
a notebook or inside pytest).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from _shared import add_seed_arg, example_parser, finish_wandb, make_logger, mlp, parse_example_args, regression_data
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_l0l1 import L0L1Clipping


class MLP(pl.LightningModule):
    def __init__(self, dim: int, hidden: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(dim, hidden, depth=1)
        self.local_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.local_losses.append(float(loss.detach()))  # this rank's half of the batch only
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class RecordNorms(Callback):
    """After `L0L1Clipping` in the callback list: the norm it saw at each step (a host read per step)."""

    def __init__(self, clip: L0L1Clipping) -> None:
        self.clip = clip
        self.norms: list[float] = []
        self.scales: list[float] = []
        self.table: Optional[dict[str, Any]] = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        stats = self.clip.latest()
        self.norms.append(stats["l0l1/grad_norm"])
        self.scales.append(stats["l0l1/scale"])

    def on_train_end(self, trainer, pl_module) -> None:
        mine = torch.tensor([self.norms, self.scales, pl_module.local_losses], dtype=torch.float64)
        # (world, 3, steps) on every rank: one collective, every rank must call it.
        every = trainer.strategy.all_gather(mine.to(pl_module.device)).cpu()
        if every.dim() == 2:  # a single process: no leading world dimension
            every = every.unsqueeze(0)
        self.table = {
            "norms": every[:, 0].tolist(),
            "scales": every[:, 1].tolist(),
            "local_losses": every[:, 2].tolist(),
            "world_size": trainer.world_size,
        }


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--devices", type=int, default=2, help="processes (CPU) or GPUs")
    parser.add_argument(
        "--accelerator", default="auto", help="auto: GPUs where there are --devices of them, else CPU (gloo)"
    )
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch on each rank")
    add_seed_arg(parser)
    args = parse_example_args(parser, argv, "steps", "devices", "hidden", "batch_size")

    torch.set_num_threads(1)
    accelerator = args.accelerator
    if accelerator == "auto" and torch.cuda.device_count() < args.devices:
        accelerator = "cpu"  # e.g. one GPU: run the two processes on the CPU instead
    pl.seed_everything(args.seed, verbose=False)
    dim = 16
    ds = regression_data(args.steps * args.batch_size * args.devices, dim, args.seed)
    clip = L0L1Clipping(mode="clip", max_norm=args.max_norm, log_every_n_steps=1)
    record = RecordNorms(clip)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=args.devices,
        strategy="ddp",
        max_steps=args.steps,
        callbacks=[clip, record],
        logger=[CSVLogger(args.out, name="ddp_csv", version=0), *filter(None, [make_logger(args, "ddp")])],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=not args.no_progress,
        enable_model_summary=False,
    )
    try:
        trainer.fit(MLP(dim, args.hidden, args.lr), DataLoader(ds, batch_size=args.batch_size, shuffle=True))
    finally:
        finish_wandb(trainer.is_global_zero and any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers))
        # Training is over and nothing below communicates: close the process group on every rank, so that
        # its threads stop before the interpreter exits (left to exit, gloo can abort the process there).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return {}

    t = record.table
    assert t is not None
    world, steps = len(t["norms"]), len(t["norms"][0])
    print(f"\nworld size {world}: the global gradient norm each rank saw, and its own local loss")
    head = "step | " + " | ".join(f"norm rank{r}" for r in range(world)) + " | "
    head += " | ".join(f"loss rank{r}" for r in range(world)) + " | scale"
    print(head)
    for s in range(steps):
        row = f"{s:4d} | " + " | ".join(f"{t['norms'][r][s]:10.5f}" for r in range(world)) + " | "
        row += " | ".join(f"{t['local_losses'][r][s]:10.5f}" for r in range(world))
        print(row + f" | {t['scales'][0][s]:.4f}")
    max_norm_diff = max(abs(t["norms"][r][s] - t["norms"][0][s]) for r in range(world) for s in range(steps))
    max_loss_diff = max(
        abs(t["local_losses"][r][s] - t["local_losses"][0][s]) for r in range(world) for s in range(steps)
    )
    latest = clip.latest()
    summary = {
        "world_size": float(world),
        "steps": float(steps),
        "max_norm_diff_between_ranks": max_norm_diff,
        "max_local_loss_diff_between_ranks": max_loss_diff,
        "final_grad_norm": latest["l0l1/grad_norm"],
        "clip_rate": latest["l0l1/clip_rate"],
    }
    print(f"\nlargest difference between the ranks' norms: {max_norm_diff:.3g} (the norm is global)")
    print(f"largest difference between the ranks' local losses: {max_loss_diff:.3g} (the data are not)")
    print(f"l0l1 statistics (rank zero): {trainer.loggers[0].log_dir}/metrics.csv")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_summary.json").write_text(json.dumps(dict(summary, table=t), indent=1))
    return summary


if __name__ == "__main__":
    main()
