"""Tiny models, plain-torch reference loops and the recording callback shared by the Lightning tests."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from _reference import ref_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N, D = 48, 6


def make_data(n: int = N, d: int = D, seed: int = 0, scale: float = 3.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x**2).sum(1, keepdim=True) * scale + torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_net(seed: int = 0, frozen: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    if frozen:
        net[2].requires_grad_(False)
    if dtype is not None:
        net[4].to(dtype)
    return net


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = net[:4](x)
    return net[4](h.to(net[4].weight.dtype)).to(x.dtype)


class Regressor(pl.LightningModule):
    """MSE regression; ``nan_at`` makes the loss NaN at those global steps."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        two_groups: bool = False,
        nan_at: Sequence[int] = (),
        optimizer: str = "sgd",
        fused: bool = False,
        return_none: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.two_groups, self.nan_at, self.optimizer_name, self.fused = two_groups, set(nan_at), optimizer, fused
        self.return_none = return_none

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(forward(self.net, x), y)
        if self.global_step in self.nan_at:
            loss = loss * float("nan")
        return None if self.return_none else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(
            self.net, self.lr, self.momentum, self.wd, self.two_groups, self.optimizer_name, self.fused
        )


def make_optimizer(
    net: nn.Module,
    lr: float,
    momentum: float = 0.9,
    wd: float = 0.0,
    two_groups: bool = False,
    name: str = "sgd",
    fused: bool = False,
) -> torch.optim.Optimizer:
    trainable = [p for p in net.parameters() if p.requires_grad]
    if two_groups:
        params: Any = [{"params": trainable[:2]}, {"params": trainable[2:], "lr": lr * 3}]
    else:
        params = trainable
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


def trainer(**kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=2,
        deterministic=True,
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def loader(ds: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def reference_loop(
    net: nn.Module,
    ds: TensorDataset,
    scale_fn: Callable[[torch.optim.Optimizer], None],
    *,
    epochs: int = 2,
    batch_size: int = 8,
    accumulate: int = 1,
    lr: float = 0.05,
    momentum: float = 0.9,
    wd: float = 0.0,
    two_groups: bool = False,
    skip_steps: Sequence[int] = (),
    zero_steps: Sequence[int] = (),
) -> nn.Module:
    """Plain PyTorch training of a copy of ``net`` with ``scale_fn`` between backward and step."""
    net = copy.deepcopy(net)
    opt = make_optimizer(net, lr, momentum, wd, two_groups)
    step = 0
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(loader(ds, batch_size)):
            loss = nn.functional.mse_loss(forward(net, x), y) / accumulate
            loss.backward()
            if (i + 1) % accumulate:
                continue
            if step in skip_steps:
                pass
            elif step in zero_steps:
                for p in net.parameters():
                    if p.grad is not None:
                        p.grad.zero_()
                opt.step()
            else:
                scale_fn(opt)
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    return net


def params_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class TwoOptimizers(pl.LightningModule):
    """Manual optimization, two optimizers over disjoint parameters (lr 0.05 and 0.02)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        self.manual_backward(nn.functional.mse_loss(self.net(x), y))
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.05),
            torch.optim.SGD(list(self.net[2].parameters()) + list(self.net[4].parameters()), lr=0.02),
        ]


class Recorder(pl.Callback):
    """What the optimizer is about to step with, recorded at every ``on_before_optimizer_step``.

    Lightning calls the callbacks' hooks in the order of ``callbacks``: placed before the clipping
    callback a recorder sees the raw gradients, placed after it the scaled ones. Per optimizer step:

    * ``norms``: the global 2-norm of the optimizer's gradients (float64 ``ref_norm``; NaN without any);
    * ``keys``: the optimizer's index in ``trainer.optimizers`` (None if it is not there);
    * ``lrs``: the learning rate of each of its param groups;
    * ``scales``: the precision plugin's GradScaler scale (1.0 without one);
    * ``global_steps``, ``epochs``: ``trainer.global_step`` (before this step) and ``trainer.current_epoch``;
    * ``latest``: ``clip.latest()``, when a clipping callback ``clip`` is given (then place it after that one).
    """

    def __init__(self, clip: Optional[Any] = None) -> None:
        self.clip = clip
        self.norms: list[float] = []
        self.keys: list[Optional[int]] = []
        self.lrs: list[list[float]] = []
        self.scales: list[float] = []
        self.global_steps: list[int] = []
        self.epochs: list[int] = []
        self.latest: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(ref_norm(grads, 2.0) if grads else math.nan)
        keys = [i for i, opt in enumerate(trainer.optimizers)
                if opt is optimizer or getattr(opt, "_optimizer", None) is optimizer]
        self.keys.append(keys[0] if keys else None)
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else 1.0)
        self.global_steps.append(trainer.global_step)
        self.epochs.append(trainer.current_epoch)
        if self.clip is not None:
            self.latest.append(self.clip.latest())
