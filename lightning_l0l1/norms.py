"""Global gradient norms that are right on every strategy, and in-place scaling.

Pure tensor code: this module imports only :mod:`torch`.

The quantity everything is built from is the vector of *per-group* norms: one
entry per optimizer parameter group, each the p-norm of all gradients of that
group, already reduced over every process that holds a shard of them. The global
norm is the p-norm of that vector, so a rule that needs one scale per group
(``l0l1``) and a rule that needs one scale for everything (``clip``) share the
same, single, communication.

Three kinds of gradients are handled, possibly side by side:

* replicated tensors (single device, DDP after its all-reduce): no communication;
* local shards of tensors sharded over a process group (FSDP1 flat parameters):
  the p-th powers of the local norms are summed over that group with **one**
  ``all_reduce`` (``max`` for the infinity norm);
* :class:`~torch.distributed.tensor.DTensor` (FSDP2 ``fully_shard``, tensor
  parallel): the per-tensor norms are DTensors with a pending ``_NormPartial``
  placement, stacked per mesh and materialised with **one** ``full_tensor()``
  per device mesh, which is the single all-reduce that torch's own
  ``get_total_norm`` would issue.

Norms of half-precision gradients are accumulated in float32 (a float16 per-tensor
norm overflows to ``inf`` above 65504); float64 gradients keep float64.

No function here reads a tensor on the host: there is no ``.item()``, no
``if`` on a tensor value and no device-to-host copy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import torch
from torch import Tensor

from lightning_l0l1.validation import norm_type as validate_norm_type

if TYPE_CHECKING:  # typing only: DTensor is imported at run time where a DTensor is met
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeGuard

__all__ = [
    "GradGroup",
    "require_dense",
    "group_norms",
    "scale_grads_",
    "total_norm",
    "validate_norm_type",
]

TensorOrTensors = Union[Tensor, Iterable[Tensor]]


def _dtensor_cls() -> Any:
    if not torch.distributed.is_available():  # pragma: no cover - builds without distributed
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    """Whether ``t`` is a :class:`~torch.distributed.tensor.DTensor` (no import cost if not)."""
    if type(t) is Tensor:  # the common case, without the lookup
        return False
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def require_dense(grad: Tensor) -> None:
    """Raise a ``RuntimeError`` saying what to do for a sparse gradient (``nn.Embedding(sparse=True)``)."""
    if grad.is_sparse:
        raise RuntimeError(
            "L0L1 clipping does not support sparse gradients; use dense embeddings "
            "(`sparse=False`) or clip them yourself."
        )


class GradGroup:
    """The gradients of one parameter group, split by how they are distributed.

    Args:
        replicated: gradients every rank holds whole (single process, DDP).
        sharded: local shards of tensors sharded over ``process_group`` (FSDP1).
        dtensors: :class:`~torch.distributed.tensor.DTensor` gradients (FSDP2, TP).
    """

    __slots__ = ("dtensors", "replicated", "sharded")

    def __init__(
        self,
        replicated: Sequence[Tensor] = (),
        sharded: Sequence[Tensor] = (),
        dtensors: Sequence[DTensor] = (),
    ) -> None:
        self.replicated = list(replicated)
        self.sharded = list(sharded)
        self.dtensors = list(dtensors)

    @classmethod
    def from_tensors(cls, grads: Iterable[Tensor], shards: bool = False) -> GradGroup:
        """Sort ``grads`` into DTensors and plain tensors (plain ones are shards if ``shards``).

        Raises:
            RuntimeError: for a sparse gradient.
        """
        group = cls()
        for g in grads:
            require_dense(g)
            if is_dtensor(g):
                group.dtensors.append(g)
            elif shards:
                group.sharded.append(g)
            else:
                group.replicated.append(g)
        return group

    def tensors(self) -> list[Tensor]:
        """Every gradient of the group (DTensors as DTensors): replicated, sharded, DTensor."""
        return [*self.replicated, *self.sharded, *self.dtensors]

    def local_tensors(self) -> list[Tensor]:
        """Every gradient of the group as a plain local tensor (DTensors by their local shard)."""
        return self.replicated + self.sharded + [g.to_local() for g in self.dtensors]

    def __len__(self) -> int:
        return len(self.replicated) + len(self.sharded) + len(self.dtensors)

    def first(self) -> Tensor:
        for part in (self.replicated, self.sharded):
            if part:
                return part[0]
        return self.dtensors[0].to_local()


#: Per-tensor norms as segments: (``id`` of each gradient, a 1-d tensor of their norms in that order).
PerTensorNorms = list[tuple[list[int], Tensor]]


def _use_foreach(foreach: bool | None, device: torch.device) -> bool:
    if foreach is None:
        return device.type in ("cuda", "cpu", "xpu")
    return foreach


def _norm_dtype(device: torch.device, dtype: torch.dtype, acc: torch.dtype) -> torch.dtype | None:
    """The ``dtype=`` to ask of the per-tensor norm, or ``None`` for the gradient's own.

    float16 is upcast everywhere: its per-tensor norm overflows above 65504. bfloat16 has
    float32's range; on the CPU its norm kernels already accumulate in float32 and only the
    per-tensor result is rounded to bfloat16 (relative error <= 2**-8), while asking for
    ``dtype=float32`` there makes torch copy every gradient to float32 first (3x slower, and a
    gradient-sized transient buffer). On CUDA ``_foreach_norm(dtype=float32)`` is native.
    float64 keeps float64.
    """
    if dtype.itemsize >= acc.itemsize or not dtype.is_floating_point:
        return None
    if dtype == torch.bfloat16 and device.type == "cpu":
        return None
    return acc


def _acc_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_tensor_norms(
    tensors: Sequence[Tensor], p: float, acc: torch.dtype, foreach: bool | None
) -> list[Tensor]:
    """Per-tensor p-norms accumulated in ``acc`` (grouped by device and dtype for ``foreach``)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = defaultdict(list)
    for i, t in enumerate(tensors):
        buckets[(t.device, t.dtype)].append((i, t))
    out: list[Tensor | None] = [None] * len(tensors)
    for (device, dtype), items in buckets.items():
        ts = [t for _, t in items]
        norm_dtype = _norm_dtype(device, dtype, acc)
        if _use_foreach(foreach, device):
            norms: Sequence[Tensor] = torch._foreach_norm(ts, p, dtype=norm_dtype)  # pyright: ignore[reportPrivateImportUsage]
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=norm_dtype) for t in ts]
        for (i, _), n in zip(items, norms):
            out[i] = n
    return out  # type: ignore[return-value]


def _reduce(norms: Sequence[Tensor], p: float, device: torch.device, acc: torch.dtype) -> Tensor:
    """p-norm of a list of 0-d norms, on ``device`` in ``acc`` (0 for an empty list)."""
    if not norms:
        return torch.zeros((), device=device, dtype=acc)
    stacked = torch.stack([n.to(device=device, dtype=acc) for n in norms])
    norm: Tensor = torch.linalg.vector_norm(stacked, p)
    return norm


def _local_group_norms(
    parts: Sequence[Sequence[Tensor]], p: float, device: torch.device, acc: torch.dtype, foreach: bool | None,
    per_tensor: PerTensorNorms | None = None,
) -> Tensor:
    flat = [t for part in parts for t in part]
    norms = _per_tensor_norms(flat, p, acc, foreach) if flat else []
    if per_tensor is not None and flat:
        # one stacked vector, kept for the per-layer norms; the group norms from its slices (the same
        # values `_reduce` stacks, so the same results)
        stacked = torch.stack([n.to(device=device, dtype=acc) for n in norms])
        per_tensor.append(([id(t) for t in flat], stacked))
        out, k = [], 0
        for part in parts:
            seg = stacked[k : k + len(part)]
            out.append(torch.linalg.vector_norm(seg, p) if len(part) else torch.zeros((), device=device, dtype=acc))
            k += len(part)
        return torch.stack(out)
    out, k = [], 0
    for part in parts:
        out.append(_reduce(norms[k : k + len(part)], p, device, acc))
        k += len(part)
    return torch.stack(out)


def _dtensor_group_norms(
    parts: Sequence[Sequence[DTensor]], p: float, device: torch.device, acc: torch.dtype,
    per_tensor: PerTensorNorms | None = None,
) -> Tensor:
    """Per-group norms of DTensor grads with one all-reduce per device mesh.

    The per-tensor norms of every group are stacked into one vector per mesh, still pending
    their ``_NormPartial`` reduction, and materialised by a single ``full_tensor()``; the
    per-group norms are then formed locally. (Reducing each group's stack with ``vector_norm``
    first would redistribute, that is all-reduce, once per group.)
    """
    n_groups = len(parts)
    by_mesh: dict[Any, list[tuple[int, DTensor]]] = defaultdict(list)
    for gi, part in enumerate(parts):
        for t in part:
            by_mesh[t.device_mesh].append((gi, t))
    per_group: list[list[Tensor]] = [[] for _ in range(n_groups)]
    for items in by_mesh.values():
        norms = []
        for _, t in items:
            norm_dtype = _norm_dtype(t.to_local().device, t.dtype, acc)
            norms.append(torch.linalg.vector_norm(t, p, dtype=norm_dtype).to(acc))
        # torch.stack of DTensors is a DTensor (its type is not in torch's signature): one cast per mesh.
        full = cast("DTensor", torch.stack(norms)).full_tensor().to(device=device, dtype=acc)
        for j, (gi, _) in enumerate(items):
            per_group[gi].append(full[j])
        if per_tensor is not None:
            per_tensor.append(([id(t) for _, t in items], full))
    return torch.stack([_reduce(ns, p, device, acc) for ns in per_group])


def _all_reduce_norms(local: Tensor, p: float, process_group: Any) -> Tensor:
    """The p-norms over ``process_group`` of local p-norms (one ``all_reduce``: ``max`` for ``inf``)."""
    import torch.distributed as dist

    if math.isinf(p):
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=process_group)
        return local
    local = local.pow(p)
    dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    return local.pow(1.0 / p)


def group_norms(
    groups: Sequence[GradGroup],
    norm_type: float = 2.0,
    *,
    process_group: Any = None,
    sharded: bool = False,
    foreach: bool | None = None,
    device: torch.device | None = None,
    per_tensor: PerTensorNorms | None = None,
) -> Tensor:
    """Global p-norm of each group's gradients, identical on every rank.

    Args:
        groups: one :class:`GradGroup` per parameter group.
        norm_type: the ``p`` of the p-norm (``inf`` for the max-norm).
        process_group: the group the ``sharded`` gradients are sharded over
            (``None``: the default group).
        sharded: always run the all-reduce over ``process_group``, even when this
            rank holds no sharded gradient (every rank of the group must call it, so
            the choice must not depend on what one rank happens to hold). It also
            runs whenever a group has ``sharded`` gradients.
        foreach: use the ``torch._foreach_norm`` fast path (``None``: where supported).
        device: where a rank holding no gradient computes (and all-reduces) its zeros;
            pass the parameters' device (``None``: the CPU).
        per_tensor: receives the per-tensor norms the group norms are formed from, as segments
            ``(ids of the gradients, 1-d tensor of their norms)`` on the device in the accumulation
            dtype: global for whole (replicated) and DTensor gradients, none for FSDP1 shards (their
            local norms are not any tensor's).

    Returns:
        A 1-d tensor of ``len(groups)`` norms (float32, float64 if any gradient is
        float64) on the device of the first gradient. Empty groups have norm 0.
    """
    p = float(norm_type)
    all_tensors = [t for g in groups for t in g.tensors()]
    if not all_tensors and not sharded:
        return torch.zeros(len(groups))
    first = next((g.first() for g in groups if len(g)), None)
    # A rank holding no gradient still joins the collective, on the parameters' device.
    device = first.device if first is not None else torch.device(device or "cpu")
    acc = _acc_dtype(all_tensors)
    replicated, shards = [g.replicated for g in groups], [g.sharded for g in groups]
    dtensors = [g.dtensors for g in groups]
    parts: list[Tensor] = []
    if any(replicated):
        parts.append(_local_group_norms(replicated, p, device, acc, foreach, per_tensor))
    if sharded or any(shards):
        parts.append(_all_reduce_norms(_local_group_norms(shards, p, device, acc, foreach), p, process_group))
    if any(dtensors):
        parts.append(_dtensor_group_norms(dtensors, p, device, acc, per_tensor))
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts), p, dim=0)


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """The global norm (0-d) from the per-group norms of :func:`group_norms`."""
    norm: Tensor = torch.linalg.vector_norm(norms, float(norm_type))
    return norm


def scale_grads_(grads: Sequence[Tensor], scale: Tensor, foreach: bool | None = None) -> None:
    """Multiply ``grads`` in place by the 0-d tensor ``scale`` (no host sync).

    DTensors are scaled through their local shard, which scales the global tensor.
    Gradients are grouped by device and dtype for ``torch._foreach_mul_``.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in grads:
        t = g.to_local() if is_dtensor(g) else g
        buckets[(t.device, t.dtype)].append(t)
    for (device, _), ts in buckets.items():
        s = scale.to(device, non_blocking=True)
        if _use_foreach(foreach, device):
            torch._foreach_mul_(ts, s)  # pyright: ignore[reportPrivateImportUsage]
        else:
            for t in ts:
                t.mul_(s)
