"""One training run of a benchmark, through the path users run or through the plain loop.

``via="lightning"`` fits a ``lightning.pytorch`` ``Trainer`` with the :class:`L0L1Clipping` callback
(automatic optimization: the callback runs inside ``optimizer.step(closure)``); ``via="loop"`` is a
plain loop around :class:`GradientClipper` (``backward``, ``clipper.step``, ``optimizer.step``). Both see
the same model, optimizer and batches in the same order, and give the same losses bit for bit
(``tests/test_parity.py`` checks the equivalence on every optimizer; ``--check-via`` in the benchmarks
re-checks it on theirs).

A run stops early, as the plain loops always did, when the loss is not finite or above ``stop_above``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_l0l1 import GradientClipper

VIA = ("lightning", "loop")


def run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    clipper: Optional[dict[str, Any]],
    via: str,
    steps: int,
    stop_above: float = math.inf,
    before_step: Optional[Callable[[torch.optim.Optimizer], Any]] = None,
) -> list[float]:
    """The training losses of ``steps`` steps (fewer where the run stopped).

    Args:
        clipper: the settings of the clipper (``GradientClipper(**clipper)`` or ``L0L1Clipping(**clipper)``);
            ``None``: this package is not in the run.
        before_step: something else called between ``backward`` and ``step`` (a peer's or torch's clipping),
            in the plain loop only.
    """
    if via == "loop" or clipper is None:
        return _loop(model, optimizer, batches, loss_fn, clipper, steps, stop_above, before_step)
    if via != "lightning":
        raise ValueError(f"`via` must be one of {VIA}, got {via!r}")
    if before_step is not None:
        raise ValueError("`before_step` runs in the plain loop only")
    return _lightning(model, optimizer, batches, loss_fn, clipper, steps, stop_above)


def _loop(model, optimizer, batches, loss_fn, clipper, steps, stop_above, before_step) -> list[float]:
    clip = GradientClipper(**clipper) if clipper is not None else None
    losses: list[float] = []
    for batch in batches:
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            clip.step(optimizer)
        if before_step is not None:
            before_step(optimizer)
        optimizer.step()
        losses.append(float(loss.detach()))
        if len(losses) == steps or not math.isfinite(losses[-1]) or losses[-1] > stop_above:
            break
    return losses


def _lightning(model, optimizer, batches, loss_fn, clipper, steps, stop_above) -> list[float]:
    import lightning.pytorch as pl

    from lightning_l0l1.lightning import L0L1Clipping

    losses: list[float] = []
    threads = torch.get_num_threads()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = loss_fn(self.model, batch)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]) or losses[-1] > stop_above:
                self.trainer.should_stop = True
            return loss

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:  # the random stream (dropout) where the loop's is at its first batch
                torch.set_rng_state(rng)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer

    listed = _Listed(batches, steps)
    rng = torch.get_rng_state()  # Lightning's own DataLoader draws a seed from it before the first batch
    loader = torch.utils.data.DataLoader(listed, batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, callbacks=[L0L1Clipping(**clipper)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), loader)
    torch.set_num_threads(threads)
    return losses


class _Listed(torch.utils.data.Dataset):
    """The first ``steps`` batches, materialized in order (the loop draws them lazily in the same order)."""

    def __init__(self, batches: Iterable[Any], steps: int) -> None:
        self.items = []
        for b in batches:
            self.items.append(b)
            if len(self.items) == steps:
                break

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]
