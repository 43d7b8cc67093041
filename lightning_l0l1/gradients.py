"""The gradients one optimizer is about to step, sorted by parameter group and by how they are distributed.

:meth:`Gradients.collect` is the first stage of a clipping step; every later stage (norms, the
estimator's differences, scaling) reads the gradients through it, so the way a gradient is
reduced (replicated, FSDP1 shard, DTensor) is decided once. Imports only :mod:`torch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_l0l1.norms import GradGroup, PerTensorNorms, group_norms, is_dtensor, require_dense, total_norm

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["Gradients", "all_ranks_finite", "average_over_ranks_"]

#: How one gradient is distributed: "r" replicated (whole on every rank), "s" a local shard of a
#: tensor sharded over the process group (FSDP1), "d" a DTensor (FSDP2, tensor parallel).
_KINDS = ("r", "s", "d")


def _kind(param: Tensor, is_shard: Optional[Callable[[Tensor], bool]]) -> str:
    """How ``param``'s gradient is distributed (one of :data:`_KINDS`)."""
    g = param.grad
    assert g is not None
    require_dense(g)
    if type(g) is not Tensor and is_dtensor(g):
        return "d"
    return "s" if is_shard is not None and is_shard(param) else "r"


@dataclass
class Gradients:
    """The gradients of one optimizer step.

    Attributes:
        params: per param group, the parameters that have a gradient.
        groups: per param group, their gradients as a :class:`~lightning_l0l1.norms.GradGroup`.
        entries: every ``(kind, gradient, parameter)`` in one fixed order (per group: replicated,
            sharded, DTensor): the order of :meth:`local`.
        process_group: the group FSDP1 shards are reduced over (``None``: the default group).
        sharded: FSDP1: every rank joins the all-reduce, whatever it holds.
        device: where a rank holding no gradient computes (the optimizer's first parameter's device).
        ids: per entry (in :attr:`entries` order), which parameter of the optimizer it is: its param
            group's index and its position in that group's ``params`` (stable while the optimizer lives,
            and the same after a resume; a parameter without a gradient has no entry).
        everyone: per param group, all its parameters, with a gradient or not.
    """

    params: list[list[Tensor]]
    groups: list[GradGroup]
    entries: list[tuple[str, Tensor, Tensor]]
    process_group: Any = None
    sharded: bool = False
    device: Optional[torch.device] = None
    ids: tuple[tuple[int, int], ...] = ()
    everyone: list[list[Tensor]] = dataclasses.field(default_factory=list)
    #: with ``norms(keep_per_tensor=True)``: the gradient norm of each parameter, as segments
    #: ``(ids of the parameters, 1-d device tensor of their norms)`` (FSDP1 shards have none).
    param_norms: Optional[PerTensorNorms] = None

    @classmethod
    def collect(
        cls, optimizer: Optimizer, process_group: Any = None, is_shard: Optional[Callable[[Tensor], bool]] = None
    ) -> Optional[Gradients]:
        """The gradients of ``optimizer``'s param groups; ``None`` if there are none (and no ``is_shard``:
        under FSDP1 a rank holding none of them still joins the all-reduce).

        Raises:
            RuntimeError: for a sparse gradient.
        """
        positions = [[j for j, p in enumerate(g["params"]) if p.grad is not None] for g in optimizer.param_groups]
        params = [[g["params"][j] for j in pos] for g, pos in zip(optimizer.param_groups, positions)]
        if not any(params) and is_shard is None:
            return None
        groups, entries, ids = [], [], []
        for group, (ps, pos) in enumerate(zip(params, positions)):
            found = sorted(((_kind(p, is_shard), i) for i, p in enumerate(ps)), key=lambda e: _KINDS.index(e[0]))
            group_entries = [(kind, ps[i].grad, ps[i]) for kind, i in found]
            groups.append(GradGroup(*([g for k, g, _ in group_entries if k == kind] for kind in _KINDS)))
            entries += group_entries
            ids += [(group, pos[i]) for _, i in found]
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), None)
        return cls(params, groups, entries, process_group, is_shard is not None, device, tuple(ids),
                   [list(g["params"]) for g in optimizer.param_groups])

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def whole(self) -> bool:
        """Every gradient is whole on this rank (single process, DDP)."""
        return all(kind == "r" for kind, _, _ in self.entries)

    @property
    def distributed(self) -> bool:
        """Some gradient is a shard (FSDP1) or a DTensor, or this rank joins a shard all-reduce."""
        return self.sharded or not self.whole

    def param(self, pid: tuple[int, int]) -> Optional[Tensor]:
        """The (detached) parameter at ``pid`` (a param group's index, a position in it), ``None`` if the
        optimizer has none there (any more)."""
        group, j = pid
        if group < len(self.everyone) and j < len(self.everyone[group]):
            return self.everyone[group][j].detach()
        return None

    def all(self) -> list[Tensor]:
        """Every gradient (DTensors as DTensors), group after group."""
        return [g for grp in self.groups for g in grp.tensors()]

    def local(self) -> tuple[list[Tensor], list[Tensor]]:
        """The gradients and the (detached) parameters as plain local tensors, in :attr:`entries` order."""
        # A "d" entry holds DTensors; the cast (typing only) is evaluated for those alone.
        grads = [cast("DTensor", g).to_local() if kind == "d" else g for kind, g, _ in self.entries]
        params = [(cast("DTensor", p).to_local() if kind == "d" else p).detach() for kind, _, p in self.entries]
        return grads, params

    def norms(self, norm_type: float, foreach: Optional[bool] = None, groups: Optional[Sequence[GradGroup]] = None,
              keep_per_tensor: bool = False) -> Tensor:
        """The global norm of each of ``groups`` (default: the gradients' groups), reduced like the gradients.

        ``keep_per_tensor``: also keep the per-tensor norms they are formed from in :attr:`param_norms`.
        """
        per_tensor: Optional[PerTensorNorms] = [] if keep_per_tensor else None
        out = group_norms(
            self.groups if groups is None else groups, norm_type, process_group=self.process_group,
            sharded=self.sharded, foreach=foreach, device=self.device, per_tensor=per_tensor,
        )
        if per_tensor is not None:
            param_of = {id(g): id(p) for _, g, p in self.entries}
            self.param_norms = [([param_of[i] for i in ids], norms) for ids, norms in per_tensor]
        return out

    def like(self, tensors: Sequence[Tensor], flat: bool = False) -> GradGroup:
        """A :class:`GradGroup` of local ``tensors`` (one per entry) distributed like the gradients.

        Local parts of DTensor gradients are wrapped back into DTensors of the same mesh and
        placements, so their norm is reduced the same way. ``flat``: the tensors are not shaped like
        the gradients (a sampled snapshot's 1-d samples, an offloaded snapshot's 1-element norms);
        DTensor parts then become 1-d DTensors sharded along every mesh dimension their gradient is
        sharded along, so that their p-norm sums the local parts over those ranks (and only those).
        """
        group = GradGroup()
        for (kind, g, _), t in zip(self.entries, tensors):
            if kind == "r":
                group.replicated.append(t)
            elif kind == "s":
                group.sharded.append(t)
            else:
                group.dtensors.append(_dtensor_like(cast("DTensor", g), t, flat))
        return group

    def param_norm(self, norm_type: float) -> Tensor:
        """The global norm of the parameters that have a gradient."""
        _, params = self.local()
        return total_norm(self.norms(norm_type, groups=[self.like(params)]), norm_type)


def _dtensor_like(grad: DTensor, local: Tensor, flat: bool) -> DTensor:
    """``local`` as the local part of a DTensor on ``grad``'s mesh (see :meth:`Gradients.like`)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not flat:
        return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False, shape=grad.shape,
                                  stride=grad.stride())
    placements = []
    for placement in grad.placements:
        if not (isinstance(placement, (Shard, Replicate))):
            raise NotImplementedError(f"The estimator does not support DTensor gradients placed as {placement}.")
        placements.append(Shard(0) if isinstance(placement, Shard) else Replicate())
    return DTensor.from_local(local.reshape(-1), grad.device_mesh, placements, run_check=False)


def average_over_ranks_(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Average ``tensors`` over the processes of ``group`` in place, with one all-reduce (as DDP averages
    gradients). They are reduced in at least float32 (float64 if any is float64)."""
    import torch.distributed as dist

    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_ranks_finite(finite: Tensor, group: Any = None) -> Tensor:
    """Whether ``finite`` (a 0-d bool: this rank's gradient norm is finite) holds on every rank of ``group``.

    One all-reduce of one element, on the flag's device (no host read): data-parallel ranks hold the
    same gradients after DDP's all-reduce, unless something changes them on one rank afterwards; with
    this verdict every rank then skips (or keeps) the step together.
    """
    import torch.distributed as dist

    bad = (~finite).to(torch.float32).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bad[0] == 0
