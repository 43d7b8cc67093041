"""Fit, checkpoint resume, LightningCLI and loggers under ONE Lightning namespace, in a fresh process.

    python namespace_run.py {lightning,pytorch_lightning} OUT_DIR

Only the named namespace is imported (the test checks the other one stays out of ``sys.modules``), so
``lightning_l0l1.L0L1Clipping`` resolves the way it does in a user's program. Writes OUT_DIR/result.json.
Importing this file does nothing (pytest's ``--doctest-modules`` collects it).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    y = (x**2).sum(1, keepdim=True) * 3 + torch.randn(48, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class Run:
    """One namespace's checks; ``pl`` is ``lightning.pytorch`` or ``pytorch_lightning``."""

    def __init__(self, ns: str, out: Path) -> None:
        self.ns, self.out = ns, out
        self.pl: Any = importlib.import_module("lightning.pytorch" if ns == "lightning" else "pytorch_lightning")
        self.loggers: Any = importlib.import_module(f"{self.pl.__name__}.loggers")
        self.callbacks: Any = importlib.import_module(f"{self.pl.__name__}.callbacks")
        self.cli_module: Any = importlib.import_module(f"{self.pl.__name__}.cli")
        from lightning_l0l1 import L0L1Clipping  # resolved now that the namespace is imported

        self.L0L1Clipping = L0L1Clipping

        class Tiny(self.pl.LightningModule):  # type: ignore[misc,name-defined]
            def __init__(self, lr: float = 0.1) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.lr = lr
                self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

            def training_step(self, batch: Any, batch_idx: int) -> Any:
                x, y = batch
                return nn.functional.mse_loss(self.net(x), y)

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

            def train_dataloader(self) -> DataLoader:
                return data()

        self.Tiny = Tiny

    def trainer(self, **kw: Any) -> Any:
        args: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, deterministic=True)
        args.update(kw)
        return self.pl.Trainer(**args)

    def fit_and_resume(self) -> dict[str, Any]:
        full_cb, full = self.L0L1Clipping(), self.Tiny()
        csv = self.loggers.CSVLogger(str(self.out), name="csv", version=0)
        # monitors on the callback's keys (checked at each epoch's end, no validation loop)
        stop = self.callbacks.EarlyStopping(monitor="l0l1/clip_rate", mode="max", patience=100,
                                            check_on_train_epoch_end=True)
        best = self.callbacks.ModelCheckpoint(dirpath=str(self.out / "best"), monitor="l0l1/grad_norm", mode="min")
        self.trainer(callbacks=[full_cb, stop, best], logger=csv, max_epochs=4, log_every_n_steps=2,
                     enable_checkpointing=True).fit(full)
        ckpt = self.callbacks.ModelCheckpoint(dirpath=str(self.out / "ckpt"), save_last=True)
        self.trainer(callbacks=[self.L0L1Clipping(), ckpt], max_epochs=2, enable_checkpointing=True).fit(self.Tiny())
        resumed_cb, resumed = self.L0L1Clipping(), self.Tiny()
        self.trainer(callbacks=[resumed_cb], max_epochs=4).fit(resumed, ckpt_path=str(self.out / "ckpt" / "last.ckpt"))
        same = all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
        rows = (self.out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
        return {
            "class_module": type(full_cb).__module__,
            "is_callback": isinstance(full_cb, self.pl.Callback),
            "steps": full_cb.latest()["l0l1/steps"],
            "resume_bitwise": same and resumed_cb.latest() == full_cb.latest(),
            "csv_has_l0l1": "l0l1/grad_norm" in rows[0],
            "csv": rows,
            "stop_score": float(stop.best_score),
            "ckpt_score": float(best.best_model_score),
        }

    def legacy_key_resume(self) -> dict[str, Any]:
        """A `prefix="x/"` callback's state saved under the key it had before `prefix` entered it: resumed,
        with or without Lightning's "callbacks ... missing" warning."""
        ckpt_dir = self.out / "ckpt_legacy"
        cb_a = self.L0L1Clipping(mode="clip", max_norm=0.5, prefix="x/")
        ckpt = self.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)
        self.trainer(callbacks=[cb_a, ckpt], max_epochs=1, enable_checkpointing=True).fit(self.Tiny())
        data = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
        old_key = self.L0L1Clipping(mode="clip", max_norm=0.5).state_key
        data["callbacks"][old_key] = data["callbacks"].pop(cb_a.state_key)
        torch.save(data, ckpt_dir / "old.ckpt")
        cb_b = self.L0L1Clipping(mode="clip", max_norm=0.5, prefix="x/")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            self.trainer(callbacks=[cb_b], max_epochs=2).fit(self.Tiny(), ckpt_path=str(ckpt_dir / "old.ckpt"))
        return {"first": cb_a.latest()["x/steps"], "resumed": cb_b.latest()["x/steps"],
                "missing_warning": any("callbacks used to create the checkpoint" in str(w.message)
                                       and "L0L1Clipping" in str(w.message) for w in seen)}

    def cli(self, class_path: str) -> dict[str, Any]:
        config = self.out / f"cli_{class_path.replace('.', '_')}.yaml"
        config.write_text(
            f"trainer:\n  default_root_dir: {self.out}\n  accelerator: cpu\n  devices: 1\n  max_steps: 4\n"
            "  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
            f"  enable_model_summary: false\n  callbacks:\n    - class_path: {class_path}\n"
            "      init_args:\n        mode: clip\n        max_norm: 0.5\n"
        )
        run = self.cli_module.LightningCLI(self.Tiny, args=["fit", "--config", str(config)],
                                           save_config_kwargs={"overwrite": True})
        cb = next(c for c in run.trainer.callbacks if type(c).__name__ == "L0L1Clipping")
        return {"max_norm": cb.max_norm, "steps": cb.latest()["l0l1/steps"], "class_module": type(cb).__module__}

    def wandb_logger(self) -> dict[str, Any]:
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(self.out))
        logger = self.loggers.WandbLogger(project="l0l1-namespace", save_dir=str(self.out))
        cb = self.L0L1Clipping(mode="clip", max_norm=0.5, log_every_n_steps=2)
        self.trainer(callbacks=[cb], logger=logger, max_steps=4).fit(self.Tiny())
        import wandb

        wandb.finish()
        return {"steps": cb.latest()["l0l1/steps"], "sinks_found_wandb": cb.publisher.sinks([logger])[1] is not None}


def main() -> None:
    import lightning_l0l1

    ns, out = sys.argv[1], Path(sys.argv[2])
    run = Run(ns, out)
    warnings.filterwarnings("ignore")
    result = {
        "namespace": lightning_l0l1.namespace(),
        "fit": run.fit_and_resume(),
        "legacy": run.legacy_key_resume(),
        "cli_auto": run.cli("lightning_l0l1.L0L1Clipping"),
        "cli_explicit": run.cli(f"lightning_l0l1.{ns}.L0L1Clipping"),
        "wandb": run.wandb_logger(),
        "other_imported": ("pytorch_lightning" if ns == "lightning" else "lightning.pytorch") in sys.modules,
    }
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
