"""The framework-neutral step: norm -> rule -> in-place scale -> state, for one optimizer.

:class:`GradientClipper` holds the settings and the per-optimizer state; the
Lightning callback (:mod:`lightning_l0l1.callback`) is thin glue over it, and a
plain PyTorch or Fabric loop can call :meth:`GradientClipper.step` itself,
between ``backward()`` (and ``scaler.unscale_``) and ``optimizer.step()``.

Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_l0l1.norms import GradGroup, group_norms, is_dtensor, scale_grads_, total_norm, validate_norm_type
from lightning_l0l1.rules import adaptive_scale, clip_scale, l0l1_scale, l0l1_threshold

__all__ = ["GradientClipper", "Mode", "NonFinite", "NonFiniteGradientError", "StepOutcome"]

Mode = Literal["clip", "adaptive", "l0l1"]
NonFinite = Literal["skip", "zero", "raise", "propagate"]

_MODES: tuple[str, ...] = get_args(Mode)
_NONFINITE: tuple[str, ...] = get_args(NonFinite)
# The fixed positions of the per-step statistics vector; then one lr_effective per param group.
_STATS = ("grad_norm", "grad_norm_scaled", "scale", "max_norm")


class NonFiniteGradientError(RuntimeError):
    """Raised by ``nonfinite="raise"`` when the global gradient norm is NaN or infinite."""


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be a finite {kind} number, got {value!r}.")
    return v


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


@dataclass
class StepOutcome:
    """What one :meth:`GradientClipper.step` did.

    Attributes:
        norm: the global pre-scaling norm (0-d tensor, on the gradients' device).
        finite: ``True``/``False`` when the non-finite policy read the verdict on the
            host, ``None`` when nothing was read (``propagate``, or a GradScaler decides).
        action: ``"scaled"``, or for a non-finite step ``"skipped"`` or ``"zeroed"``.
    """

    norm: Tensor
    finite: Optional[bool]
    action: str = "scaled"


@dataclass
class _OptState:
    """Per-optimizer runtime state. Tensors live on the gradients' device."""

    steps: int = 0
    n_groups: int = 0
    last: Optional[Tensor] = None  # [len(_STATS) + n_groups] float
    nonfinite: Optional[Tensor] = None  # 0-d int64
    clipped: Optional[Tensor] = None  # 0-d int64
    pending: dict[str, Any] = field(default_factory=dict)  # loaded from a checkpoint, not yet on a device

    def ensure(self, like: Tensor, n_groups: int) -> None:
        if self.nonfinite is None or self.nonfinite.device != like.device:
            nonfinite = int(self.pending.get("nonfinite_steps", 0))
            clipped = int(self.pending.get("clipped_steps", 0))
            if self.nonfinite is not None:  # moved device: carry the counts over
                nonfinite, clipped = int(self.nonfinite), int(self.clipped)  # type: ignore[arg-type]
            self.nonfinite = torch.tensor(nonfinite, dtype=torch.int64, device=like.device)
            self.clipped = torch.tensor(clipped, dtype=torch.int64, device=like.device)
        if self.last is None or self.n_groups != n_groups or self.last.device != like.device:
            values = self.pending.get("last") if self.last is None else self.last.tolist()
            size = len(_STATS) + n_groups
            if values is None or len(values) != size:
                values = [0.0] * size
            self.last = torch.tensor(values, dtype=like.dtype, device=like.device)
            self.n_groups = n_groups
        self.pending = {}


class _HostFlag:
    """A 0-d bool read on the host as late as possible.

    On CUDA the copy is issued without blocking into pinned memory right after the
    norm, and waited for only in :meth:`get`, after the scaling kernels are queued.
    Elsewhere the tensor is read directly (on the CPU that costs nothing).
    """

    def __init__(self, flag: Tensor) -> None:
        self._event = None
        if flag.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flag

    def get(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


class GradientClipper:
    r"""Global-norm gradient scaling with the ``clip``, ``adaptive`` or ``l0l1`` rule.

    Args:
        mode: ``"clip"``: :math:`s=\min(1,\gamma/\lVert g\rVert)`; ``"adaptive"``:
            :math:`s=\gamma/(\lVert g\rVert+\gamma)`; ``"l0l1"``: per parameter group,
            :math:`s=\min(1, 1/(\eta(L_0+L_1\lVert g\rVert)))`.
        max_norm: :math:`\gamma` for ``clip`` and ``adaptive``.
        l0, l1: the smoothness constants for ``l0l1`` (``>= 0``, not both 0).
        norm_type: p of the p-norm, ``inf`` allowed.
        nonfinite: what a NaN/Inf global norm does: ``"skip"`` sets the step's
            gradients to ``None`` (torch optimizers then leave parameters, momentum and
            weight decay untouched); ``"zero"`` zeroes them; ``"raise"`` raises
            :class:`NonFiniteGradientError`; ``"propagate"`` checks nothing, like torch.
            The first three read one boolean on the host per step; ``propagate`` reads none.
        foreach: use the ``torch._foreach_*`` kernels (``None``: where supported).

    Raises:
        ValueError: for any invalid argument, naming it and the value received.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.ones(2, 3)).sum().mul(100).backward()
        >>> clipper = GradientClipper("clip", max_norm=1.0)
        >>> out = clipper.step(opt)
        >>> round(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])), 4)
        1.0
    """

    def __init__(
        self,
        mode: Mode = "clip",
        max_norm: Optional[float] = 1.0,
        l0: Optional[float] = None,
        l1: Optional[float] = None,
        norm_type: Union[float, str] = 2.0,
        nonfinite: NonFinite = "skip",
        foreach: Optional[bool] = None,
    ) -> None:
        self.mode: Mode = _choice("mode", mode, _MODES)  # type: ignore[assignment]
        self.nonfinite: NonFinite = _choice("nonfinite", nonfinite, _NONFINITE)  # type: ignore[assignment]
        self.norm_type = validate_norm_type(norm_type)
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"`foreach` must be True, False or None, got {foreach!r}.")
        self.foreach = foreach
        if mode == "l0l1":
            if l0 is None or l1 is None:
                raise ValueError(
                    f"`mode='l0l1'` needs both `l0` and `l1`, got l0={l0!r}, l1={l1!r}. "
                    "Give the smoothness constants of your loss."
                )
            self.l0 = _positive("l0", l0, allow_zero=True)
            self.l1 = _positive("l1", l1, allow_zero=True)
            if self.l0 == 0 and self.l1 == 0:
                raise ValueError(
                    f"`l0` and `l1` cannot both be 0 (the step would never be limited), got l0={l0!r}, l1={l1!r}."
                )
            self.max_norm: Optional[float] = None if max_norm is None else _positive("max_norm", max_norm)
        else:
            if max_norm is None:
                raise ValueError(f"`max_norm` is required for `mode={mode!r}`, got None.")
            self.max_norm = _positive("max_norm", max_norm)
            self.l0 = None if l0 is None else _positive("l0", l0, allow_zero=True)
            self.l1 = None if l1 is None else _positive("l1", l1, allow_zero=True)
        self._states: dict[int, _OptState] = {}

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(
        self,
        optimizer: Optimizer,
        key: int = 0,
        *,
        process_group: Any = None,
        is_shard: Optional[Callable[[Tensor], bool]] = None,
        nonfinite_handled: bool = False,
        step_label: Any = None,
    ) -> Optional[StepOutcome]:
        """Scale the gradients of ``optimizer`` in place; ``None`` if it has no gradient (and no ``is_shard``).

        Args:
            optimizer: its ``param_groups`` give the gradients (each group its own lr).
            key: which optimizer this is (one state per key).
            process_group, is_shard: FSDP1: parameters for which ``is_shard(param)`` is
                true hold local shards of tensors sharded over ``process_group``.
            nonfinite_handled: someone else (a GradScaler) skips non-finite steps: read
                nothing on the host and leave the gradients to it.
            step_label: shown in error messages (the global step).
        """
        params_per_group = [[p for p in g["params"] if p.grad is not None] for g in optimizer.param_groups]
        # FSDP1: a rank whose shard holds none of these gradients still joins the all-reduce.
        if not any(params_per_group) and is_shard is None:
            return None
        groups = []
        for params in params_per_group:
            group = GradGroup()
            for p in params:
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(
                        "L0L1 clipping does not support sparse gradients; use dense embeddings "
                        "(`sparse=False`) or clip them yourself."
                    )
                if type(g) is not Tensor and is_dtensor(g):
                    group.dtensors.append(g)
                elif is_shard is not None and is_shard(p):
                    group.sharded.append(g)
                else:
                    group.replicated.append(g)
            groups.append(group)

        norms = group_norms(
            groups,
            self.norm_type,
            process_group=process_group,
            sharded=is_shard is not None,
            foreach=self.foreach,
            device=next((p.device for g in optimizer.param_groups for p in g["params"]), None),
        )
        norm = total_norm(norms, self.norm_type)
        finite = torch.isfinite(norm)
        read_host = self.nonfinite != "propagate" and not nonfinite_handled
        flag = _HostFlag(finite) if read_host else None

        lrs = [g["lr"] for g in optimizer.param_groups]
        scales, threshold = self._scales(norm, lrs)
        if len(scales) == 1:
            scale_grads_([t for grp in groups for t in _all(grp)], scales[0], self.foreach)
            scaled_norm = norm * scales[0]
            per_group = scales * len(groups)
        else:
            for grp, s in zip(groups, scales):
                scale_grads_(_all(grp), s, self.foreach)
            scaled_norm = total_norm(norms * torch.stack(scales).to(norms.dtype), self.norm_type)
            per_group = scales

        state = self._states.setdefault(key, _OptState())
        state.ensure(norm, len(groups))
        state.steps += 1
        thr = norm.new_full((), threshold)
        lr_eff = [s * lr for s, lr in zip(per_group, lrs)]
        new = torch.stack([norm, scaled_norm, per_group[0], thr, *lr_eff]).to(state.last.dtype)  # type: ignore[union-attr]
        state.last = torch.where(finite, new, state.last)  # type: ignore[arg-type]
        state.nonfinite.add_(~finite)  # type: ignore[union-attr]
        state.clipped.add_(finite & (norm > thr))  # type: ignore[union-attr]

        outcome = StepOutcome(norm=norm, finite=None)
        if flag is not None:
            outcome.finite = flag.get()
            if not outcome.finite:
                self._apply_nonfinite(optimizer, groups, step_label, outcome)
        return outcome

    def _scales(self, norm: Tensor, lrs: Sequence[Any]) -> tuple[list[Tensor], float]:
        """The scale(s) for this step and the norm threshold in use (host float)."""
        if self.mode == "clip":
            return [clip_scale(norm, self.max_norm)], float(self.max_norm)  # type: ignore[arg-type]
        if self.mode == "adaptive":
            return [adaptive_scale(norm, self.max_norm)], float(self.max_norm)  # type: ignore[arg-type]
        scales = [l0l1_scale(norm, lr, self.l0, self.l1) for lr in lrs]  # type: ignore[arg-type]
        return scales, l0l1_threshold(float(lrs[0]), self.l0, self.l1)  # type: ignore[arg-type]

    def _apply_nonfinite(
        self, optimizer: Optimizer, groups: Sequence[GradGroup], step_label: Any, outcome: StepOutcome
    ) -> None:
        if self.nonfinite == "raise":
            where = f" at step {step_label}" if step_label is not None else ""
            raise NonFiniteGradientError(
                f"The global gradient norm is {float(outcome.norm)}{where}. Use `nonfinite='skip'` to "
                "skip such steps, or look for the source of the NaN/Inf (learning rate, loss scale, data)."
            )
        if self.nonfinite == "zero":
            for grp in groups:
                for t in _all(grp):
                    t.zero_()
            outcome.action = "zeroed"
        else:  # skip
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None
            outcome.action = "skipped"

    # ------------------------------------------------------------------ reading state
    def latest(self, prefix: str = "l0l1/") -> dict[str, float]:
        """The statistics of each optimizer's last finite step, as Python floats (syncs).

        With one optimizer the keys are ``{prefix}grad_norm`` etc.; with several, each
        key ends in ``_opt{i}``. The first param group's effective lr is
        ``lr_effective``, others ``lr_effective_pg{j}``.
        """
        out: dict[str, float] = {}
        several = len(self._states) > 1
        for key in sorted(self._states):
            st = self._states[key]
            if st.steps == 0 and not st.pending:
                continue
            sfx = f"_opt{key}" if several else ""
            snap = self._snapshot(st)
            values = snap["last"] or [0.0] * len(_STATS)
            for name, v in zip(_STATS, values):
                out[f"{prefix}{name}{sfx}"] = float(v)
            for j, v in enumerate(values[len(_STATS) :]):
                out[f"{prefix}lr_effective{'' if j == 0 else f'_pg{j}'}{sfx}"] = float(v)
            out[f"{prefix}steps{sfx}"] = float(snap["steps"])
            out[f"{prefix}nonfinite_steps{sfx}"] = float(snap["nonfinite_steps"])
            finite_steps = snap["steps"] - snap["nonfinite_steps"]
            out[f"{prefix}clip_rate{sfx}"] = snap["clipped_steps"] / finite_steps if finite_steps > 0 else 0.0
        return out

    @staticmethod
    def _snapshot(st: _OptState) -> dict[str, Any]:
        if st.nonfinite is None:  # nothing on a device yet: what was loaded, or nothing
            return {
                "steps": int(st.pending.get("steps", st.steps)),
                "nonfinite_steps": int(st.pending.get("nonfinite_steps", 0)),
                "clipped_steps": int(st.pending.get("clipped_steps", 0)),
                "last": list(st.pending.get("last") or []),
            }
        # One device-to-host transfer for everything.
        counts = torch.stack([st.nonfinite, st.clipped]).tolist()  # type: ignore[list-item]
        return {
            "steps": st.steps,
            "nonfinite_steps": int(counts[0]),
            "clipped_steps": int(counts[1]),
            "last": st.last.tolist(),  # type: ignore[union-attr]
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain Python state (counters and last statistics) for every optimizer."""
        return {"version": 1, "optimizers": {k: self._snapshot(st) for k, st in self._states.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; tensors are rebuilt on the gradients' device at the next step."""
        self._states = {}
        for k, snap in state_dict.get("optimizers", {}).items():
            st = _OptState(steps=int(snap.get("steps", 0)))
            st.pending = {
                "nonfinite_steps": int(snap.get("nonfinite_steps", 0)),
                "clipped_steps": int(snap.get("clipped_steps", 0)),
                "last": list(snap.get("last") or []) or None,
                "steps": st.steps,
            }
            self._states[int(k)] = st


def _all(group: GradGroup) -> list[Tensor]:
    return group.replicated + group.sharded + group.dtensors
