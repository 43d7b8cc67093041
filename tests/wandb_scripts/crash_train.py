"""Train with a ``WandbLogger`` (offline) and die with ``os._exit(1)`` in the middle of the run.

Usage::

    python crash_train.py OUT_DIR CRASH_AT

The W&B settings come from the environment (``WANDB_MODE=offline``, ``WANDB_DIR``,
``WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL``). The callback logs every optimizer step. After each
step the script appends the step's ``cb.latest()`` to ``OUT_DIR/steps.json`` (rewritten and
fsynced, so it survives the crash). Once ``trainer.global_step == CRASH_AT`` it waits for W&B to
flush its transaction log (wandb-core writes it every ``WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL``
seconds and loses what it has not written when its parent dies), then exits without any
cleanup: no ``wandb.finish()``, no ``on_train_end``, no Python ``atexit`` handlers.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _models import Regressor, loader, make_data, make_net, trainer

from lightning_l0l1 import L0L1Clipping

MIN_WAIT_S = float(os.environ.get("CRASH_MIN_WAIT_S", "3"))  # several flush intervals
MAX_WAIT_S = 30.0


def wait_for_flush() -> None:
    """Until the run's ``.wandb`` file is non-empty and has not grown for 2 s (at least ``MIN_WAIT_S``)."""
    pattern = os.path.join(os.environ["WANDB_DIR"], "wandb", "offline-run-*", "run-*.wandb")
    start = last_change = time.monotonic()
    last_size = -1
    while time.monotonic() - start < MAX_WAIT_S:
        time.sleep(0.25)
        size = sum(os.path.getsize(f) for f in glob.glob(pattern))
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        elif size > 0 and now - last_change >= 2.0 and now - start >= MIN_WAIT_S:
            return


class CrashAfter(Callback):
    """Placed after ``L0L1Clipping``: its ``on_train_batch_end`` runs after the callback's flush."""

    def __init__(self, cb: L0L1Clipping, out_dir: str, crash_at: int) -> None:
        self.cb, self.out_dir, self.crash_at = cb, out_dir, crash_at
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.steps.append({"global_step": trainer.global_step, **self.cb.latest()})
        path = os.path.join(self.out_dir, "steps.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(self.steps, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(path + ".tmp", path)
        if trainer.global_step >= self.crash_at:
            wait_for_flush()
            os._exit(1)


def main(out_dir: str, crash_at: int) -> None:
    cb = L0L1Clipping(mode="clip", max_norm=45.0, log_every_n_steps=1)
    tr = trainer(
        logger=WandbLogger(project="l0l1-crash", save_dir=out_dir),
        callbacks=[cb, CrashAfter(cb, out_dir, crash_at)],
        max_epochs=10,
    )
    tr.fit(Regressor(make_net()), loader(make_data()))
    raise SystemExit("the run was not interrupted")  # pragma: no cover


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
