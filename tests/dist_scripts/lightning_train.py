"""Train the tiny model of ``dist_common`` under a multi-process Lightning strategy.

Usage (Lightning's launcher re-runs this same command line for the other rank)::

    python lightning_train.py OUT_DIR {ddp|fsdp2}

Also importable: :func:`run` is what the in-process ``ddp_fork`` test calls.

Every rank writes ``OUT_DIR/rank{r}.pt`` with, per optimizer step, the norm the
callback reported, plain-torch norms of the whole (gathered) gradient before and
after the callback, the naive norm of the local shards only, and at the end the
whole parameters. The test compares all of it with a single-process reference.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C

from lightning_l0l1 import L0L1Clipping


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _norm(ts: list[torch.Tensor]) -> float:
    if not ts:  # a skipped step: the callback set the gradients to None
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in ts])))


class Module(pl.LightningModule):
    def __init__(self, fsdp2: bool) -> None:
        super().__init__()
        self.fsdp2 = fsdp2
        self.net = C.make_net()
        self.seen: list[list[int]] = []  # the sample indices of every micro-batch, in order

    def configure_model(self) -> None:
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        return C.loss_fn(self.net, x, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.net.parameters())
        # Two param groups (same lr as the reference): the norm must still take one all-reduce.
        return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=C.LR)


def count_all_reduces(clip: L0L1Clipping, rec: dict[str, list]) -> None:
    """Wrap the callback's hook: record how many all-reduces each of its steps issues.

    Counted at the Python entry points every all-reduce goes through, nested ones included
    (a DTensor redistribution calls ``funcol.all_reduce`` from inside its own dispatch, where a
    ``TorchDispatchMode`` would not see it).
    """
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d

    inner = clip.on_before_optimizer_step
    targets = [(funcol, "all_reduce"), (funcol, "all_reduce_inplace"), (c10d, "all_reduce"), (dist, "all_reduce")]

    def counted(*args: Any, **kwargs: Any) -> None:
        n = 0
        saved = [(mod, name, getattr(mod, name)) for mod, name in targets if hasattr(mod, name)]

        def wrap(fn: Any) -> Any:
            def call(*a: Any, **k: Any) -> Any:
                nonlocal n
                n += 1
                return fn(*a, **k)

            return call

        seen: dict[int, Any] = {}
        for mod, name, fn in saved:
            seen.setdefault(id(fn), wrap(fn))  # dist.all_reduce is c10d.all_reduce: count it once
            setattr(mod, name, seen[id(fn)])
        try:
            inner(*args, **kwargs)
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)
        rec["all_reduces"].append(n)

    clip.on_before_optimizer_step = counted  # type: ignore[method-assign]


class Before(Callback):
    """Placed before L0L1Clipping: the whole gradient's norm by plain torch, and the naive local one."""

    def __init__(self, rec: dict[str, list]) -> None:
        self.rec = rec

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.rec["true_pre"].append(_norm([_full(g) for g in grads]))
        self.rec["naive_pre"].append(_norm([_local(g) for g in grads]))
        self.rec["dtensor_grads"].append(all(hasattr(g, "full_tensor") for g in grads))


class After(Callback):
    """Placed after L0L1Clipping: what the callback reported, and the whole clipped gradient's norm."""

    def __init__(self, clip: L0L1Clipping, rec: dict[str, list]) -> None:
        self.clip, self.rec = clip, rec

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        stats = self.clip.latest()
        for key in ("L0", "L1", "smoothness", "max_norm", "lr_effective"):
            if f"l0l1/{key}" in stats:
                self.rec.setdefault(f"cb_{key}", []).append(stats[f"l0l1/{key}"])
        self.rec["cb_norm"].append(stats["l0l1/grad_norm"])
        self.rec["cb_scaled"].append(stats["l0l1/grad_norm_scaled"])
        self.rec["cb_scale"].append(stats["l0l1/scale"])
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.rec["true_post"].append(_norm([_full(g) for g in grads]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [_full(p.detach()).clone() for p in pl_module.net.parameters()]
        out = dict(self.rec, params=params, rank=trainer.global_rank, world=trainer.world_size)
        out["latest"] = self.clip.latest()
        out["state"] = self.clip.state_dict()  # the estimator's (auto's) state: identical on every rank
        out["global_step"] = trainer.global_step
        out["seen"] = pl_module.seen
        torch.save(out, os.path.join(self.rec["out_dir"], f"rank{trainer.global_rank}.pt"))


class NanOnOneRank(Callback):
    """Placed before L0L1Clipping: makes rank ``rank``'s gradient NaN at global step ``step`` only, after
    DDP's all-reduce (as a user's hook could), so that the ranks' gradients disagree."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad.view(-1)[0] = (
                float("nan")
            )


def run(
    out_dir: str, strategy: str, mode: str = "clip", nan_rank: Any = None, sync_nonfinite: Any = None
) -> pl.Trainer:
    """Fit under ``strategy``: ``"ddp"`` (subprocess script launcher), ``"ddp_fork"`` or ``"fsdp2"``,
    with ``L0L1Clipping(mode="clip", max_norm=MAX_NORM)`` or, for ``mode="auto"``, ``L0L1Clipping()``;
    with ``nan_rank``, that rank's gradient is made NaN at step 2 after the all-reduce."""
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

    timeout = timedelta(seconds=120)  # a rank that dies must not leave the other waiting for 30 min
    fsdp2 = strategy == "fsdp2"
    if fsdp2:
        strat: Any = ModelParallelStrategy(data_parallel_size=C.WORLD, tensor_parallel_size=1, timeout=timeout)
    elif strategy == "ddp":
        strat = DDPStrategy(timeout=timeout)
    elif strategy == "ddp_fork":
        strat = DDPStrategy(start_method="fork", timeout=timeout)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    rec: dict[str, Any] = {
        k: []
        for k in (
            "true_pre", "naive_pre", "dtensor_grads", "cb_norm", "cb_scaled", "cb_scale", "true_post", "all_reduces"
        )
    }
    rec["out_dir"] = out_dir
    kw = {"mode": "clip", "max_norm": C.MAX_NORM} if mode == "clip" else {}
    clip = L0L1Clipping(**kw, sync_nonfinite=sync_nonfinite)
    count_all_reduces(clip, rec)
    inject = [] if nan_rank is None else [NanOnOneRank(nan_rank, 2)]
    return C.fit_on_ranks(Module(fsdp2), strat, callbacks=[*inject, Before(rec), clip, After(clip, rec)])


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], *sys.argv[3:4])
