"""Torch-only pieces shared by the distributed scripts and the test that checks them.

The data, the model and the plain single-process reference loop live here so that
the worker scripts and the reference in the test process build exactly the same
things. Nothing here imports ``lightning_l0l1``, and only :func:`fit_on_ranks` (the
Lightning scripts' training run) imports ``pytorch_lightning``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

N, D_IN, D_HID, D_OUT = 32, 4, 8, 3
LR = 0.1
MAX_NORM = 0.25  # small enough that every step of the reference loop is clipped
WORLD = 2
MICRO_BATCH = 2  # per rank
ACCUMULATE = 2
STEPS = 4  # optimizer steps: exactly one epoch of N samples
GLOBAL_BATCH = WORLD * MICRO_BATCH * ACCUMULATE


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, D_IN, generator=g)
    y = 3.0 * torch.randn(N, D_OUT, generator=g) + 2.0
    return x, y


def make_net(seed: int = 7) -> nn.Module:
    """Uneven shapes on purpose: the last layer's rows (3) do not split evenly over 2 ranks."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(net(x), y)


def fit_on_ranks(module: Any, strategy: Any, callbacks: list, logger: Any = False) -> Any:
    """Fit the LightningModule ``module`` on WORLD CPU ranks under ``strategy``: STEPS optimizer steps of
    ACCUMULATE micro-batches of MICRO_BATCH samples per rank, each batch ``(x, y, sample indices)``."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y, torch.arange(N)), batch_size=MICRO_BATCH, shuffle=False)
    trainer.fit(module, loader)
    # nothing after the fit communicates: stop gloo's threads before the interpreter exits (left to exit,
    # a rank can abort there with "terminate called without an active exception")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return trainer


def global_batches(seen: list[list[list[int]]]) -> list[list[int]]:
    """The sample indices of each optimizer step, from what each rank actually trained on.

    ``seen[r]`` is rank ``r``'s list of micro-batches (lists of sample indices) in order;
    optimizer step ``k`` consumed micro-batches ``k*ACCUMULATE ... (k+1)*ACCUMULATE - 1``
    of every rank. (Lightning's training sampler is a ``DistributedSampler`` that shuffles
    even for a ``shuffle=False`` loader, so the composition is read, not assumed.)
    """
    steps = []
    for k in range(STEPS):
        idx: list[int] = []
        for rank_batches in seen:
            for b in rank_batches[k * ACCUMULATE : (k + 1) * ACCUMULATE]:
                idx += b
        steps.append(sorted(idx))
    return steps


def reference_training(batches: list[list[int]], max_norm: float = MAX_NORM) -> dict[str, Any]:
    """Single process, plain torch: each global batch whole, mean loss, clip_grad_norm_, SGD."""
    x, y = make_data()
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    norms, post = [], []
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x[idx], y[idx]).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)))
        post.append(float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])))
        opt.step()
    return {"norms": norms, "post": post, "params": [p.detach().clone() for p in net.parameters()]}


def reference_auto(batches: list[list[int]], clipper: Any) -> dict[str, Any]:
    """Single process, plain torch: each global batch whole, mean loss, ``clipper.step`` (a
    ``GradientClipper()``, passed in: this module does not import the library), SGD; what it reports."""
    x, y = make_data()
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    rec: dict[str, list[float]] = {}
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x[idx], y[idx]).backward()
        clipper.step(opt)
        for key, value in clipper.latest().items():
            rec.setdefault(key, []).append(value)
        opt.step()
    return {"stats": rec, "params": [p.detach().clone() for p in net.parameters()]}
