"""The per-optimizer state of a :class:`~lightning_l0l1.clipper.GradientClipper`, and its checkpoint format.

One :class:`OptimizerState` per optimizer, made of small typed parts that each save and restore
themselves: :class:`Counters`, the last finite step's record, the estimator's
:class:`~lightning_l0l1.estimator.EstimatorState` and the rule's own state. A checkpoint stores
each optimizer's parts side by side in one flat dict of plain Python values and CPU tensors
(format :data:`VERSION`; version 1 kept the momentum ratio inside ``env``, and still loads; version 2
did not say which parameters the snapshot holds: such a snapshot is matched by shape at its first use).
Restoring builds the state on the CPU; the first step moves it to the gradients' device.

Imports only :mod:`torch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_l0l1.estimator import EstimatorState
from lightning_l0l1.modes import Rule
from lightning_l0l1.snapshots import FullSnapshot, Snapshot
from lightning_l0l1.stats import RECORD_FIELDS

__all__ = ["VERSION", "Counters", "OptimizerState"]

#: The checkpoint format :meth:`GradientClipper.state_dict` writes.
VERSION = 3


@dataclass
class Counters:
    """How many steps an optimizer took, and how many of them were non-finite or clipped.

    ``nonfinite`` and ``clipped`` are 0-d int64 tensors on the gradients' device, counted there
    without a host read.
    """

    steps: int
    nonfinite: Tensor
    clipped: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu", steps: int = 0) -> Counters:
        z = torch.zeros((), dtype=torch.int64, device=device)
        return cls(steps, z, z.clone())

    def to(self, device: torch.device) -> Counters:
        return Counters(self.steps, self.nonfinite.to(device), self.clipped.to(device))

    def state_dict(self) -> dict[str, int]:
        nonfinite, clipped = torch.stack([self.nonfinite, self.clipped]).tolist()  # one transfer
        return {"steps": self.steps, "nonfinite_steps": int(nonfinite), "clipped_steps": int(clipped)}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> Counters:
        return cls(
            int(sd.get("steps", 0)),
            torch.tensor(int(sd.get("nonfinite_steps", 0)), dtype=torch.int64),
            torch.tensor(int(sd.get("clipped_steps", 0)), dtype=torch.int64),
        )


@dataclass
class OptimizerState:
    """Everything a clipper keeps for one optimizer.

    Attributes:
        counters: the step counts.
        last: the record values of the last finite step (``None`` before the first step).
        estimator: the estimator's state (``None``: estimator off, or not started).
        rule: the rule's own state (see :meth:`~lightning_l0l1.modes.Rule.init`).
        distributed: the gradients are sharded: the snapshot is not checkpointed (only rank zero's
            state is saved under sharded strategies).
        restored: the state was loaded from a checkpoint.
    """

    counters: Counters
    last: Optional[Tensor] = None
    estimator: Optional[EstimatorState] = None
    rule: Any = None
    distributed: bool = False
    restored: bool = False

    def to(self, like: Tensor, n_groups: int, rule: Rule) -> None:
        """Place the state on ``like``'s device, the record in ``like``'s dtype for ``n_groups`` param groups."""
        device = like.device
        if self.counters.nonfinite.device != device:
            self.counters = self.counters.to(device)
        size = len(RECORD_FIELDS) + n_groups
        if self.last is None or self.last.numel() != size:
            self.last = torch.zeros(size, dtype=like.dtype, device=device)
        elif (self.last.device, self.last.dtype) != (device, like.dtype):
            self.last = self.last.to(device, like.dtype)
        if self.estimator is not None:
            self.estimator.to(device)
        self.rule = rule.to(self.rule, like)

    def state_dict(self, rule: Rule, with_buffers: bool) -> dict[str, Any]:
        """The parts side by side; the snapshot only ``with_buffers`` (and never for sharded gradients)."""
        out: dict[str, Any] = {**self.counters.state_dict(), "last": [] if self.last is None else self.last.tolist()}
        if self.estimator is not None:
            out.update(self.estimator.state_dict(with_buffers and not self.distributed))
        if self.rule is not None:
            out.update(rule.state_dict(self.rule))
        return out

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, Any], rule: Rule, snapshot: Optional[Callable[[], Snapshot]] = None
    ) -> OptimizerState:
        """What :meth:`state_dict` saved (either version), on the CPU; ``snapshot`` makes the estimator's
        empty snapshot (``None``: the estimator is off, its saved estimates are still shown)."""
        last = list(sd.get("last") or [])
        return cls(
            counters=Counters.from_state_dict(sd),
            last=torch.tensor(last, dtype=torch.float64) if last else None,
            estimator=EstimatorState.from_state_dict(sd, (snapshot or FullSnapshot)()),
            rule=rule.load_state_dict(sd),
            restored=True,
        )
