r"""What a clipper hands to the optimizer's coming ``step()``, besides the gradients it scales in place.

Two things reach an optimizer this way:

* a **gradient scale** for torch's fused kernels (``Adam``/``AdamW``/``SGD(fused=True)``): the
  attributes ``grad_scale`` (the kernel divides the gradients by it as it reads them) and
  ``found_inf`` (the kernel skips the whole step where it is nonzero), the mechanism ``GradScaler``
  uses;
* a **learning-rate factor** per param group, for a rule that bounds the step through the learning
  rate (``auto`` under Adam-type optimizers): each group's learning rate is multiplied by its factor
  for that one ``step()`` and put back after it.

A clipper may run *before* ``optimizer.step()`` (a plain loop, Fabric, Lightning with an fp16
``GradScaler``) or *inside* it, from the closure that ``step(closure)`` evaluates first (Lightning's
automatic optimization and ``LightningOptimizer.step()`` in manual optimization). A step pre-hook
would miss the second case: it has fired by the time the closure runs. So the optimizers that are
inside their ``step()`` are tracked by a global step pre/post-hook pair, and a learning-rate factor
is put in place at once when the optimizer is inside its step (torch's optimizers read the learning
rate after the closure), or at the optimizer's step pre-hook otherwise. Either way the learning rates
are put back by the step post-hook, so a scheduler or ``LearningRateMonitor`` between steps sees the
user's values, and a step that never runs (a ``GradScaler`` skipping an overflow) changes nothing.

Several clippers on one optimizer compose: learning-rate factors multiply, and a clipper that finds
another one's gradient scale still pending applies it to the gradients first, so that it measures the
gradients as that clipper left them.

Imports only :mod:`torch`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

__all__ = ["begin", "hand_off", "in_step", "scale_lrs", "unwrap"]

_HANDOFF_ATTRS = ("grad_scale", "found_inf")


class _Plan:
    """What the clippers of one optimizer staged for its coming step."""

    __slots__ = ("applied", "factors", "handoff", "owners", "saved_lrs")

    def __init__(self) -> None:
        self.owners: set[int] = set()  # the clippers (by id) that contributed since the last step
        self.factors: Optional[list[Tensor]] = None  # the composed learning-rate factors
        self.saved_lrs: Optional[list[Any]] = None  # the user's learning rates, while scaled ones are in place
        self.applied = False  # the param groups hold the scaled learning rates
        self.handoff = False  # `grad_scale`/`found_inf` were set by a clipper


_PLANS: weakref.WeakKeyDictionary[Optimizer, _Plan] = weakref.WeakKeyDictionary()
_IN_STEP: weakref.WeakSet[Optimizer] = weakref.WeakSet()
_HOOKED: weakref.WeakSet[Optimizer] = weakref.WeakSet()


def _enter(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    _IN_STEP.add(optimizer)


def _leave(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    _IN_STEP.discard(optimizer)


# Global hooks (every optimizer of the process): one set insertion and removal per step.
register_optimizer_step_pre_hook(_enter)
register_optimizer_step_post_hook(_leave)


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` or Fabric's ``_FabricOptimizer``.

    Attributes (the hand-off, the learning rates staged) must be set on the optimizer whose ``step()``
    reads them: a wrapper keeps its own ``__dict__``.
    """
    for _ in range(4):  # a wrapper of a wrapper at most, in practice
        inner = next((x for x in (getattr(optimizer, "__dict__", {}).get("_optimizer"),
                                  getattr(optimizer, "optimizer", None)) if isinstance(x, Optimizer)), None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def in_step(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` is running (the clipper was called from its closure)."""
    return optimizer in _IN_STEP


def begin(optimizer: Optimizer, owner: object, grads: Callable[[], Sequence[Tensor]]) -> list[Any]:
    """Start ``owner``'s work on ``optimizer``'s coming step; the user's learning rate of each group.

    A plan ``owner`` itself staged belongs to a step that never ran: it is undone. Another clipper's
    pending gradient scale is applied to the gradients ``grads()`` lists (so this one measures what that
    one left); ``grads`` is called only then.
    """
    plan = _PLANS.get(optimizer)
    if plan is not None and id(owner) in plan.owners:
        _finish(optimizer)
        plan = None
    if plan is not None and plan.handoff:
        _materialize(optimizer, plan, grads())
    if plan is not None and plan.saved_lrs is not None and plan.applied:
        return list(plan.saved_lrs)
    return [g["lr"] for g in optimizer.param_groups]


def hand_off(optimizer: Optimizer, owner: object, scale: Tensor, finite: Optional[Tensor]) -> None:
    """Let the fused kernel divide the gradients by ``1/scale`` (and skip the step where ``finite`` is false)."""
    plan = _plan(optimizer, owner)
    optimizer.grad_scale = torch.reciprocal(scale.float())  # type: ignore[attr-defined]
    optimizer.found_inf = None if finite is None else (~finite).float()  # type: ignore[attr-defined]
    plan.handoff = True


def scale_lrs(optimizer: Optimizer, owner: object, factors: Sequence[Tensor]) -> None:
    """Multiply each group's learning rate by its factor for the coming ``step()`` only."""
    plan = _plan(optimizer, owner)
    plan.factors = list(factors) if plan.factors is None else [a * b for a, b in zip(plan.factors, factors)]
    if optimizer in _IN_STEP:  # called from the closure: the step reads the learning rates next
        _apply(optimizer)


def _plan(optimizer: Optimizer, owner: object) -> _Plan:
    plan = _PLANS.get(optimizer)
    if plan is None:
        plan = _PLANS[optimizer] = _Plan()
    plan.owners.add(id(owner))
    if optimizer not in _HOOKED:
        _HOOKED.add(optimizer)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: _apply(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: _finish(opt))
    return plan


def _apply(optimizer: Optimizer) -> None:
    """Put the scaled learning rates in place (from the user's, so that factors staged later compose)."""
    plan = _PLANS.get(optimizer)
    if plan is None or plan.factors is None:
        return
    if plan.saved_lrs is None:
        plan.saved_lrs = [g["lr"] for g in optimizer.param_groups]
    for group, lr, f in zip(optimizer.param_groups, plan.saved_lrs, plan.factors):
        group["lr"] = _scaled_lr(optimizer, group, lr, f)
    plan.applied = True


def _finish(optimizer: Optimizer) -> None:
    """After the step (or for one that never ran): the user's learning rates back, the hand-off dropped."""
    plan = _PLANS.pop(optimizer, None)
    if plan is None:
        return
    if plan.applied and plan.saved_lrs is not None:
        for group, lr in zip(optimizer.param_groups, plan.saved_lrs):
            group["lr"] = lr
    if plan.handoff:
        for name in _HANDOFF_ATTRS:
            optimizer.__dict__.pop(name, None)


def _materialize(optimizer: Optimizer, plan: _Plan, grads: Sequence[Tensor]) -> None:
    """Apply another clipper's pending gradient scale to the gradients, and drop the hand-off."""
    grad_scale = optimizer.__dict__.pop("grad_scale", None)
    found_inf = optimizer.__dict__.pop("found_inf", None)
    plan.handoff = False
    if grad_scale is not None:  # divided, as the fused kernel would have
        for g in grads:
            g.div_(grad_scale.to(g.device))
    if found_inf is not None:  # a skip verdict: the gradients become non-finite, as the step would see them
        skip = found_inf.to(torch.bool)
        for g in grads:
            g.masked_fill_(skip.to(g.device), float("nan"))


def _scaled_lr(optimizer: Optimizer, group: dict[str, Any], lr: Any, factor: Tensor) -> Any:
    """``lr * factor`` as the optimizer takes it: a tensor where it can, else a Python float (a host read)."""
    device = next((p.device for p in group["params"]), factor.device)
    dtype = lr.dtype if isinstance(lr, Tensor) else torch.float32 if device.type == "mps" else torch.float64
    scaled = factor.detach().to(device, dtype) * lr
    if isinstance(lr, Tensor) or _tensor_lr_ok(optimizer, group):
        return scaled
    if scaled.device.type != "cpu" and not getattr(optimizer, "_l0l1_lr_warned", False):
        optimizer._l0l1_lr_warned = True  # type: ignore[attr-defined]
        warnings.warn(
            f"`mode='auto'` scales the learning rate of `{type(optimizer).__name__}` for each step; this "
            "optimizer takes it only as a Python float here (torch's `foreach` path on CUDA refuses a "
            "tensor), so it is read on the host every step. Create the optimizer with `fused=True` (or "
            "`capturable=True`) to keep the step free of host syncs.",
            UserWarning, stacklevel=5,
        )
    return float(scaled)


def _tensor_lr_ok(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether this param group's ``step()`` takes a tensor learning rate without reading it on the host.

    torch's optimizers do with ``fused=True`` or ``capturable=True``, and in their single-tensor path (the
    default off CUDA); their ``foreach`` path refuses one. Other optimizers get a Python float.
    """
    if type(optimizer).__module__.split(".")[:2] != ["torch", "optim"]:
        return False
    if group.get("fused") or group.get("capturable"):
        return True
    foreach = group.get("foreach")
    on_cuda = any(p.is_cuda for p in group["params"])
    return not (foreach or (foreach is None and on_cuda))
