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

import os
import sys
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.strategies import DDPStrategy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared Recorder
import dist_common as C
from _models import Recorder

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


def main(out_dir: str) -> None:
    clip = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=EVERY)
    before, after = Recorder(), Recorder(clip)  # around the callback: the raw norm, then its latest()
    recorder = RecordingLogger()
    module = Module()
    logger = [CSVLogger(os.path.join(out_dir, "csv"), name="run", version=0), recorder]
    strategy = DDPStrategy(timeout=timedelta(seconds=120))
    trainer = C.fit_on_ranks(module, strategy, callbacks=[before, clip, after], logger=logger)
    # After the fit: the callback's on_train_end has published the last, partial interval.
    out = dict(pre=before.norms, cb_norm=[latest["l0l1/grad_norm"] for latest in after.latest],
               rank=trainer.global_rank, seen=module.seen, published=recorder.calls, every=EVERY, max_norm=MAX_NORM,
               callback_metrics={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("l0l1/")})
    torch.save(out, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
