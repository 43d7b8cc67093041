"""The statistics of a step and of a logging interval: their names, layouts and derived values.

This module alone decides what a metric is called (``{prefix}{name}{suffix}``, the suffix
``_opt{k}`` when several optimizers are clipped, ``lr_effective_pg{j}`` for param group ``j``)
and where each value sits in the vectors that travel from the device in one transfer:

* :class:`StepRecord`, one step: :data:`RECORD_FIELDS`, then one ``lr_effective`` per param group;
* an interval's aggregate (:class:`~lightning_l0l1.publish.StepStatistics`): the record's means,
  then :data:`INTERVAL_FIELDS`;
* the clipper's counters: :data:`COUNTER_FIELDS`.

Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

__all__ = [
    "COUNTER_FIELDS",
    "INTERVAL_FIELDS",
    "RECORD_FIELDS",
    "StepRecord",
    "clip_rate",
    "counter_vector",
    "interval_metrics",
    "latest_metrics",
    "lr_suggested",
    "metric_name",
    "record_names",
    "stat_names",
    "summary_metrics",
]

#: A step's record, before its ``lr_effective`` entries: the norm before and after scaling, the
#: scale (of the first param group), and the norm threshold in use.
RECORD_FIELDS = ("grad_norm", "grad_norm_scaled", "scale", "max_norm")
#: What an interval's aggregate adds after the record's means.
INTERVAL_FIELDS = ("grad_norm_max", "grad_norm_min", "clip_rate", "finite_steps", "steps")
#: The clipper's running counters and latest estimates, read at each flush.
COUNTER_FIELDS = ("nonfinite_steps", "smoothness", "L0", "L1", "pair_norm")


def lr_names(n_groups: int) -> list[str]:
    """``lr_effective`` for the first param group, ``lr_effective_pg{j}`` for the others."""
    return [f"lr_effective_pg{j}" if j else "lr_effective" for j in range(n_groups)]


def record_names(n_groups: int) -> list[str]:
    """The entries of :attr:`StepRecord.values`."""
    return [*RECORD_FIELDS, *lr_names(n_groups)]


def stat_names(n_groups: int) -> list[str]:
    """The entries of an interval's aggregate vector (before prefix and optimizer suffix)."""
    return [*record_names(n_groups), *INTERVAL_FIELDS]


def metric_name(prefix: str, name: str, key: int = 0, several: bool = False) -> str:
    """``{prefix}{name}``, with ``_opt{key}`` when several optimizers are clipped."""
    return f"{prefix}{name}_opt{key}" if several else f"{prefix}{name}"


def lr_suggested(l0: float) -> float:
    """The descent-lemma learning rate of the fitted constants, :math:`1/L_0` (``inf`` while :math:`L_0 = 0`)."""
    return 1.0 / l0 if l0 > 0 else math.inf


@overload
def clip_rate(clipped: Tensor, finite: Tensor, empty: float = ...) -> Tensor: ...
@overload
def clip_rate(clipped: float, finite: float, empty: float = ...) -> float: ...
def clip_rate(clipped: Any, finite: Any, empty: float = math.nan) -> Any:
    """The fraction of finite steps that were clipped (``empty`` where there was none), on the device
    for tensors (no host read), in Python for numbers."""
    if isinstance(finite, Tensor):
        return torch.where(finite > 0, clipped / finite.clamp_min(1), torch.full_like(clipped, empty))
    return clipped / finite if finite > 0 else empty


@dataclass(frozen=True)
class StepRecord:
    """What one step did, as one device vector (:func:`record_names` gives its layout), read by name.

    Attributes:
        values: ``[grad_norm, grad_norm_scaled, scale, max_norm, lr_effective...]``.
        finite: the norm was finite (0-d bool).
        clipped: the norm exceeded the threshold in use (0-d bool; never for a non-finite norm).
    """

    values: Tensor
    finite: Tensor
    clipped: Tensor

    @classmethod
    def of(
        cls, *, grad_norm: Tensor, grad_norm_scaled: Tensor, scale: Tensor, max_norm: Tensor,
        lr_effective: Sequence[Tensor], finite: Tensor, dtype: torch.dtype,
    ) -> StepRecord:
        values = torch.stack([grad_norm, grad_norm_scaled, scale, max_norm, *lr_effective]).to(dtype)
        return cls(values, finite, finite & (grad_norm > max_norm))

    @property
    def grad_norm(self) -> Tensor:
        """The global norm before scaling (0-d)."""
        return self.values[0]

    @property
    def grad_norm_scaled(self) -> Tensor:
        """The global norm after scaling (0-d)."""
        return self.values[1]

    @property
    def scale(self) -> Tensor:
        """The factor of the first param group (0-d)."""
        return self.values[2]

    @property
    def max_norm(self) -> Tensor:
        """The norm threshold in use (0-d)."""
        return self.values[3]

    @property
    def lr_effective(self) -> Tensor:
        """``lr * s`` of each param group (1-d)."""
        return self.values[len(RECORD_FIELDS) :]


def counter_vector(nonfinite: Tensor, envelope: Any, like: Tensor) -> Tensor:
    """The :data:`COUNTER_FIELDS` as one device vector (NaN for the estimates without an estimator)."""
    nan = like.new_full((), math.nan)
    estimates = [nan] * 4 if envelope is None else [envelope.last, envelope.l0, envelope.l1, envelope.last_norm]
    return torch.stack([nonfinite.to(nan.dtype), *(t.to(nan.dtype) for t in estimates)])


def latest_metrics(prefix: str, optimizers: Mapping[int, Mapping[str, Any]], several: bool) -> dict[str, float]:
    """:meth:`GradientClipper.latest` from each optimizer's saved state (its ``state_dict`` entry)."""
    out: dict[str, float] = {}
    for key in sorted(optimizers):
        st = optimizers[key]

        def put(name: str, value: float, key: int = key) -> None:
            out[metric_name(prefix, name, key, several)] = float(value)

        values = st["last"] or [0.0] * len(RECORD_FIELDS)
        for name, v in zip(record_names(len(values) - len(RECORD_FIELDS)), values):
            put(name, v)
        env = st.get("env")
        if env is not None:
            put("smoothness", env["last"])
            put("L0", env["l0"])
            put("L1", env["l1"])
            put("lr_suggested", lr_suggested(float(env["l0"])))
            put("smoothness_pairs", env["pairs"])
        finite = st["steps"] - st["nonfinite_steps"]
        put("steps", st["steps"])
        put("nonfinite_steps", st["nonfinite_steps"])
        put("clip_rate", clip_rate(st["clipped_steps"], finite, empty=0.0))
    return out


def interval_metrics(
    prefix: str, blocks: Sequence[tuple[int, int, Sequence[float], Sequence[float]]], estimate: bool
) -> tuple[dict[str, float], float]:
    """The metrics of one logging interval, and the norm the first optimizer's last pair is paired with.

    Args:
        prefix: the metric-name prefix.
        blocks: per optimizer ``(key, n_groups, aggregate values, counter values)``.
        estimate: the estimator is on (its metrics are published).

    Returns:
        Only finite values: a NaN or infinite aggregate (an interval without a finite step) reaches
        no logger.
    """
    metrics: dict[str, float] = {}
    several = len(blocks) > 1
    pair_norm = math.nan
    for i, (key, n_groups, values, counters) in enumerate(blocks):
        named = dict(zip(stat_names(n_groups), values))
        named.pop("finite_steps")
        named.pop("steps")
        c = dict(zip(COUNTER_FIELDS, counters))
        named["nonfinite_steps"] = c["nonfinite_steps"]
        if estimate:
            named.update(smoothness=c["smoothness"], L0=c["L0"], L1=c["L1"], lr_suggested=lr_suggested(c["L0"]))
            if i == 0:
                pair_norm = c["pair_norm"]
        metrics.update({metric_name(prefix, name, key, several): v for name, v in named.items()})
    return {k: v for k, v in metrics.items() if math.isfinite(v)}, pair_norm


def summary_metrics(prefix: str, latest: Mapping[str, float]) -> dict[str, float]:
    """The run's final figures for a summary: the constants, threshold, rates and counts (finite ones)."""
    keep = ("L0", "L1", "max_norm", "clip_rate", "nonfinite_steps", "lr_suggested", "steps")
    return {
        k: v for k, v in latest.items()
        if any(k[len(prefix) :].startswith(p) for p in keep) and math.isfinite(v)
    }

