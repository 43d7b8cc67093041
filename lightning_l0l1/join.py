"""The ranks' non-finite verdict under torch's ``Join`` context manager (uneven inputs).

``torch.distributed.algorithms.join.Join`` lets data-parallel ranks run out of data at different times: a
rank that has joined no longer steps, and in each iteration the others still run it *shadows* their
collectives (DDP's gradient all-reduce) so that every collective still has a partner. The verdict of
:func:`~lightning_l0l1.gradients.all_ranks_finite` is a collective too: passed as a plain function, the
ranks still training wait in it for a rank that has joined, which is in another collective (the
rendezvous fails with a collective mismatch or a closed connection). :class:`AllRanksFinite` is that
verdict as a :class:`~torch.distributed.algorithms.join.Joinable`: listed in ``Join``, the joined ranks
shadow it.

Imports only :mod:`torch` (this module is not imported by the package itself).

Example:
    .. code-block:: python

        agree = AllRanksFinite()  # device="cuda" with NCCL
        with Join([ddp_model, agree]):
            for batch in my_rank_batches:  # uneven across ranks
                loss_fn(ddp_model, batch).backward()
                clipper.step(opt, agree=agree)
                opt.step()
                opt.zero_grad()
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from lightning_l0l1.gradients import all_ranks_finite

__all__ = ["AllRanksFinite"]


class AllRanksFinite(Joinable):
    """:func:`~lightning_l0l1.gradients.all_ranks_finite` as a callable that ``Join`` knows: pass it as
    ``agree=`` to :meth:`~lightning_l0l1.clipper.GradientClipper.step`, and list it in ``Join`` after the
    model (the model's DDP notifies the context once per iteration).

    Each iteration of a rank that has not joined must call it exactly once (one ``GradientClipper.step``
    with it, on whole gradients): the joined ranks shadow one call per iteration.

    Args:
        device: where the flag lives (the gradients' device: ``"cpu"`` for gloo, the rank's CUDA device
            for NCCL).
        group: the process group (``None``: the default group).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", group: Any = None) -> None:
        super().__init__()
        self.device, self.group = torch.device(device), group

    def __call__(self, finite: Tensor) -> Tensor:
        Join.notify_join_context(self)
        return all_ranks_finite(finite, self.group)

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _Shadow(self)

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self) -> Any:
        return self.group if self.group is not None else dist.group.WORLD


class _Shadow(JoinHook):
    """On a joined rank, once per iteration of the others: the all-reduce :func:`all_ranks_finite` does,
    with the verdict "finite" (a maximum of 0 changes nobody's)."""

    def __init__(self, owner: AllRanksFinite) -> None:
        self.owner = owner

    def main_hook(self) -> None:
        bad = torch.zeros(1, dtype=torch.float32, device=self.owner.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.owner.group)

    def post_hook(self, is_last_joiner: bool) -> None:
        pass
