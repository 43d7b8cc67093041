r"""Functional API for plain PyTorch and Lightning Fabric loops.

Call these between ``loss.backward()`` (and ``scaler.unscale_(optimizer)`` under fp16
AMP) and ``optimizer.step()``:

>>> import torch
>>> from lightning_l0l1.functional import clip_gradients_, grad_norm
>>> model = torch.nn.Linear(4, 2)
>>> model(torch.ones(3, 4)).sum().mul(10).backward()
>>> norm = clip_gradients_(model.parameters(), max_norm=1.0)  # the pre-scaling norm
>>> bool(grad_norm(model.parameters()) <= 1.0)
True

Imports only :mod:`torch`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Union

import torch
from torch import Tensor

from lightning_l0l1 import validation
from lightning_l0l1.clipper import GradientClipper, NonFiniteGradientError, StepOutcome
from lightning_l0l1.modes import RULES
from lightning_l0l1.norms import GradGroup, group_norms, scale_grads_, total_norm, validate_norm_type
from lightning_l0l1.rules import adaptive_scale, clip_scale, l0l1_scale, l0l1_threshold

#: The modes whose scale needs neither a learning rate nor state: those ``clip_gradients_`` applies.
_STATELESS = tuple(name for name, rule in RULES.items() if not rule.per_group and not rule.needs_estimate)

__all__ = [
    "GradientClipper",
    "NonFiniteGradientError",
    "StepOutcome",
    "adaptive_scale",
    "clip_gradients_",
    "clip_scale",
    "grad_norm",
    "l0l1_scale",
    "l0l1_threshold",
]

Parameters = Union[Tensor, Iterable[Tensor]]


def _grad_group(parameters: Parameters, process_group: Any) -> tuple[GradGroup, Any]:
    """The gradients, and the parameters' device (for a rank that holds no gradient)."""
    if not isinstance(parameters, (Tensor, Iterable)):  # None, a Module
        hint = " (pass `model.parameters()`)" if isinstance(parameters, torch.nn.Module) else ""
        raise TypeError(
            f"`parameters` must be a tensor or an iterable of tensors{hint}, got {type(parameters).__name__}."
        )
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    stray = next((p for p in params if not isinstance(p, Tensor)), None)
    if stray is not None:
        raise TypeError(
            f"`parameters` must be a tensor or an iterable of tensors, got an item of type {type(stray).__name__}."
        )
    group = GradGroup.from_tensors((p.grad for p in params if p.grad is not None), shards=process_group is not None)
    return group, (params[0].device if params else None)


@torch.no_grad()
def grad_norm(
    parameters: Parameters,
    norm_type: Union[float, str] = 2.0,
    *,
    process_group: Any = None,
    foreach: Union[bool, None] = None,
) -> Tensor:
    r"""Global p-norm of the gradients of ``parameters``, sharding-aware, no host sync.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is read
            (parameters without a gradient are left out).
        norm_type: p (``inf`` for the max-norm).
        process_group: FSDP1 / hand-sharded parameters: the plain gradients are local
            shards of tensors sharded over this group, and the p-th powers of their norms
            are summed over it with one all-reduce. Every rank of the group must call.
            Leave ``None`` for single-process and DDP (grads are already whole).
            :class:`~torch.distributed.tensor.DTensor` grads (FSDP2) need nothing: they
            are reduced with one ``full_tensor()``.
        foreach: use ``torch._foreach_norm`` (``None``: where supported).

    Returns:
        A 0-d float32 tensor (float64 if a gradient is float64) on the first
        gradient's device; ``0`` when no parameter has a gradient.

    Raises:
        ValueError: for a bad ``norm_type``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> grad_norm([w])
        tensor(5.)
    """
    p = validate_norm_type(norm_type)
    validation.flag("foreach", foreach, allow_none=True)
    group, device = _grad_group(parameters, process_group)
    norms = group_norms(
        [group], p, process_group=process_group, sharded=process_group is not None, foreach=foreach, device=device
    )
    return total_norm(norms, p)


@torch.no_grad()
def clip_gradients_(
    parameters: Parameters,
    max_norm: float,
    mode: Literal["clip", "adaptive"] = "clip",
    norm_type: Union[float, str] = 2.0,
    *,
    process_group: Any = None,
    foreach: Union[bool, None] = None,
) -> Tensor:
    r"""Scale gradients in place by the ``clip`` or ``adaptive`` rule; return the pre-scaling norm.

    .. math::

        \text{clip}: s = \min\left(1, \frac{\gamma}{\lVert g\rVert + 10^{-6}}\right), \qquad
        \text{adaptive}: s = \frac{\gamma}{\lVert g\rVert + \gamma}

    ``mode="clip"`` gives the same gradients as :func:`torch.nn.utils.clip_grad_norm_`.
    Like torch, a non-finite norm is not checked (the gradients become NaN or 0):
    test the returned norm, or use :class:`GradientClipper` for a skip policy.

    Args:
        parameters: tensors whose ``.grad`` is scaled.
        max_norm: :math:`\gamma > 0`.
        mode: ``"clip"`` or ``"adaptive"``.
        norm_type: p (``inf`` allowed).
        process_group: see :func:`grad_norm`.
        foreach: use the ``_foreach`` kernels (``None``: where supported).

    Returns:
        The global norm before scaling (0-d tensor).

    Raises:
        ValueError: for a bad ``max_norm``, ``mode`` or ``norm_type``.

    References:
        Zhang et al., ICLR 2020. https://arxiv.org/abs/1905.11881
    """
    rule: Any = RULES[validation.choice("mode", mode, _STATELESS)]
    p = validate_norm_type(norm_type)
    validation.flag("foreach", foreach, allow_none=True)
    rule = rule.from_settings(max_norm=max_norm)
    group, device = _grad_group(parameters, process_group)
    if not len(group) and process_group is None:  # with a group, every rank must join the all-reduce
        return torch.zeros(())
    norms = group_norms(
        [group], p, process_group=process_group, sharded=process_group is not None, foreach=foreach, device=device
    )
    norm = total_norm(norms, p)
    scale_grads_([*group.replicated, *group.sharded, *group.dtensors], rule.scale(norm), foreach)
    return norm
