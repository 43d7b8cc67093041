"""DDP (2 CPU processes, gloo) with ``log_stats`` on: what reaches the loggers, and from which rank.

Usage (Lightning's launcher re-runs this same command line for rank 1)::

    python stats_ddp.py OUT_DIR

Every rank gets a ``CSVLogger`` with the same ``save_dir`` (``OUT_DIR/csv``) and a
``RecordingLogger`` that is *not* rank-zero-only, so a callback that published from rank 1 would
be seen. Every rank writes ``OUT_DIR/rank{r}.pt`` with, per optimizer step, the plain-torch norm
of the (all-reduced) gradient before the callback and the callback's ``latest()`` norm, the
sample indices it trained on, and every ``log_metrics`` call its recording logger received.
"""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C

from lightning_l0l1 import L0L1Clipping

EVERY = 3  # C.STEPS = 4 optimizer steps: one full interval, then a partial one at the end
MAX_NORM = 1000.0  # far above the norms: the parameters follow plain SGD, like the reference loop


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call, on every rank (Lightning's own loggers write on rank zero only)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Any = None) -> None:
        self.calls.append((int(step), dict(metrics)))


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = C.make_net()
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        return C.loss_fn(self.net, x, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=C.LR)


def _norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return math.sqrt(math.fsum(float(g.double().pow(2).sum()) for g in grads))


class Before(Callback):
    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.rec["pre"].append(_norm(optimizer))


class After(Callback):
    def __init__(self, clip: L0L1Clipping, recorder: RecordingLogger, rec: dict[str, Any]) -> None:
        self.clip, self.recorder, self.rec = clip, recorder, rec

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.rec["cb_norm"].append(self.clip.latest()["l0l1/grad_norm"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the callback's own on_train_end (the last, partial interval is already published).
        out = dict(self.rec, rank=trainer.global_rank, seen=pl_module.seen, published=self.recorder.calls,
                   every=EVERY, max_norm=MAX_NORM)
        torch.save(out, os.path.join(self.rec["out_dir"], f"rank{trainer.global_rank}.pt"))


def main(out_dir: str) -> None:
    rec: dict[str, Any] = {"pre": [], "cb_norm": [], "out_dir": out_dir}
    clip = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=EVERY)
    recorder = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=C.WORLD,
        strategy=DDPStrategy(timeout=timedelta(seconds=120)),
        max_steps=C.STEPS,
        accumulate_grad_batches=C.ACCUMULATE,
        callbacks=[Before(rec), clip, After(clip, recorder, rec)],
        logger=[CSVLogger(os.path.join(out_dir, "csv"), name="run", version=0), recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    x, y = C.make_data()
    loader = DataLoader(TensorDataset(x, y, torch.arange(C.N)), batch_size=C.MICRO_BATCH, shuffle=False)
    trainer.fit(Module(), loader)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
