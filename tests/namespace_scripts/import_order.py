"""``lightning_l0l1.L0L1Clipping`` used before ``lightning.pytorch`` is imported, with both packages installed.

    python import_order.py OUT_DIR

``L0L1Clipping`` is resolved first (to ``pytorch_lightning``, the namespace preferred while none is
imported); then a ``lightning.pytorch`` Trainer fits with it, with ``EarlyStopping`` and
``ModelCheckpoint`` monitoring ``l0l1/*`` keys. Writes OUT_DIR/result.json. Importing this file does
nothing (pytest's ``--doctest-modules`` collects it).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any


def main() -> None:
    out = Path(sys.argv[1])
    from lightning_l0l1 import L0L1Clipping  # resolved now: no namespace imported yet

    first_class = f"{L0L1Clipping.__module__}.{L0L1Clipping.__qualname__}"
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    data = DataLoader(TensorDataset(x, (x**2).sum(1, keepdim=True)), batch_size=8)
    class RawNorms(L.Callback):  # placed before L0L1Clipping: the raw norm of each step, in float64
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad.double().reshape(-1) for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))

    raw = RawNorms()
    cb = L0L1Clipping(mode="clip", max_norm=0.5)
    stop = EarlyStopping(monitor="l0l1/clip_rate", mode="max", patience=10, check_on_train_epoch_end=True)
    ckpt = ModelCheckpoint(dirpath=str(out / "ckpt"), monitor="l0l1/grad_norm", mode="min")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=2, log_every_n_steps=3, callbacks=[raw, cb, stop, ckpt])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Tiny(), data)
    result = {
        "first_class": first_class,
        "class_after_fit": f"{type(cb).__module__}.{type(cb).__qualname__}",
        "is_lightning_callback": isinstance(cb, L.Callback),
        "warnings": [str(w.message) for w in caught if "L0L1Clipping" in str(w.message)],
        "callback_metrics": sorted(k for k in trainer.callback_metrics if k.startswith("l0l1/")),
        "stop_best": float(stop.best_score),
        "ckpt_best": float(ckpt.best_model_score),
        "grad_norm": float(trainer.callback_metrics["l0l1/grad_norm"]),
        "clip_rate": float(trainer.callback_metrics["l0l1/clip_rate"]),
        "steps": cb.latest()["l0l1/steps"],
        "raw_norms": raw.norms,
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
