"""LightningCLI: configure the model, the data and `L0L1Clipping` from one YAML file.

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --print_config
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_epochs=1
    python examples/cli.py --help

The YAML puts `lightning_l0l1.L0L1Clipping` in `trainer.callbacks` with typed `init_args`:
`mode` is a Literal, so a typo such as `mode: clipp` is rejected by the CLI before training
starts. The data are synthetic (made in code, nothing is downloaded). The YAML logs to
W&B in offline mode under examples/out/ (`--trainer.logger=false` for no logger; set
`offline: false` in the YAML to log online).
"""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from _shared import mlp, print_summary, regression_data
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_l0l1 import L0L1Clipping


class SyntheticRegression(pl.LightningDataModule):
    """y = 3 sin(x . w) + noise, x in R^dim: a smooth target an MLP fits in a few epochs."""

    def __init__(self, n: int = 512, dim: int = 16, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.n, self.dim, self.batch_size, self.seed = n, dim, batch_size, seed
        self.train_set: Optional[TensorDataset] = None

    def setup(self, stage: str) -> None:
        self.train_set = regression_data(self.n, self.dim, self.seed)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class MLP(pl.LightningModule):
    """A two-hidden-layer MLP trained by SGD (a large learning rate: clipping keeps it stable)."""

    def __init__(self, dim: int = 16, hidden: int = 64, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(dim, hidden, depth=2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    """Run the CLI on ``argv`` (``sys.argv[1:]`` if None); return the clipping statistics of the last step."""
    cli = LightningCLI(
        MLP,
        SyntheticRegression,
        args=argv,  # None: sys.argv[1:]
        save_config_callback=None,  # do not write config.yaml next to the logs
    )
    if any(type(lg).__name__ == "WandbLogger" for lg in cli.trainer.loggers):
        import wandb

        wandb.finish()
    clip = next((cb for cb in cli.trainer.callbacks if isinstance(cb, L0L1Clipping)), None)
    if clip is None:
        print("no L0L1Clipping in trainer.callbacks")
        return {}
    summary = dict(clip.latest())
    loss = cli.trainer.callback_metrics.get("train_loss")
    if loss is not None:
        summary["train_loss"] = float(loss)
    print_summary(f"mode={clip.mode} max_norm={clip.max_norm}", summary, width=28)
    return summary


if __name__ == "__main__":
    main()
