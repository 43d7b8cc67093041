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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_l0l1.estimator import (
    EnvelopeState,
    Snapshot,
    amplification_update,
    envelope_init,
    envelope_update,
    secant_pair,
)
from lightning_l0l1.norms import GradGroup, group_norms, is_dtensor, scale_grads_, total_norm, validate_norm_type
from lightning_l0l1.rules import adaptive_scale, auto_scale, clip_scale, l0l1_scale, l0l1_threshold

__all__ = ["GradientClipper", "Mode", "NonFinite", "NonFiniteGradientError", "StepOutcome"]

Mode = Literal["auto", "clip", "adaptive", "l0l1"]
NonFinite = Literal["skip", "zero", "raise", "propagate"]

_MODES: tuple[str, ...] = get_args(Mode)
_NONFINITE: tuple[str, ...] = get_args(NonFinite)
# The fixed positions of the per-step statistics vector; then one lr_effective per param group.
_STATS = ("grad_norm", "grad_norm_scaled", "scale", "max_norm")
# Optimizers whose update does not scale with the gradient (it is normalized by its own running
# magnitude): a factor s on the gradient barely changes their step, so auto, which sets an SGD step,
# cannot steer them.
_SCALE_INVARIANT = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam",
                 "Adafactor")
    if hasattr(torch.optim, name)
)


def _momentum_sgd(optimizer: Optimizer) -> bool:
    """SGD with momentum: its step is longer than ``lr * g`` by a factor auto measures (``amp``)."""
    return isinstance(optimizer, torch.optim.SGD) and any(g.get("momentum", 0) for g in optimizer.param_groups)


def _max_amplification(optimizer: Optimizer) -> float:
    """The steady-state bound on momentum's step amplification, ``(1 - dampening) / (1 - momentum)``
    (Nesterov: ``1 + momentum`` times that), over the param groups; host floats, no tensor read."""
    bound = 1.0
    for g in optimizer.param_groups:
        m, d = float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0))
        if 0 < m < 1:
            bound = max(bound, (1 - d) / (1 - m) * ((1 + m) if g.get("nesterov") else 1.0))
    return bound


# auto: the first update moves the parameters by `initial_step` x max(||theta||, 1); the bound on the
# (SGD-equivalent) step length then doubles every step, so it stops mattering after a few dozen steps.
_TRUST_GROWTH = 2.0


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


def _flag(name: str, value: Any, allow_none: bool = False) -> Optional[bool]:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return value


def _count(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an integer >= 1" if allow_none else "an integer >= 1"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
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
    #: this step's statistics on the device: grad_norm, grad_norm_scaled, scale, max_norm, lr_effective...
    values: Optional[Tensor] = None
    #: 0-d bool tensors: the norm is finite; the norm exceeded the threshold in use
    finite_mask: Optional[Tensor] = None
    clipped: Optional[Tensor] = None


@dataclass
class _OptState:
    """Per-optimizer runtime state. Tensors live on the gradients' device."""

    steps: int = 0
    n_groups: int = 0
    last: Optional[Tensor] = None  # [len(_STATS) + n_groups] float
    nonfinite: Optional[Tensor] = None  # 0-d int64
    clipped: Optional[Tensor] = None  # 0-d int64
    pending: dict[str, Any] = field(default_factory=dict)  # loaded from a checkpoint, not yet on a device
    env: Optional[EnvelopeState] = None  # the (L0, L1) estimate
    snap: Optional[Snapshot] = None  # previous gradients and parameters, for the secant
    snap_step: int = -2  # the step index the snapshot was taken at
    delta: Optional[Tensor] = None  # auto: the first step's length
    probe_params: list[Tensor] = field(default_factory=list)  # probe mode: the snapshot's parameters, in order
    sharded: bool = False  # gradients are shards (FSDP1/FSDP2): the snapshot is not checkpointed
    optimizer_checked: bool = False  # auto: the optimizer's type was looked at (warned at most once)
    amplified: bool = False  # auto under momentum SGD at the last step: the step ratio is measured

    def ensure(self, like: Tensor, n_groups: int, offload: bool = False) -> None:
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
        env = self.pending.get("env")
        if env is not None:
            self.env = EnvelopeState.from_state_dict(env, like.device)
        if self.pending.get("delta") is not None:
            self.delta = torch.tensor(self.pending["delta"], dtype=like.dtype, device=like.device)
        if self.pending.get("snapshot"):
            self.snap = Snapshot(offload=offload)
            self.snap.load(self.pending["snapshot"], like.device)
            self.snap_step = int(self.pending["snap_step"])
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
    r"""Global-norm gradient scaling with the ``auto``, ``clip``, ``adaptive`` or ``l0l1`` rule.

    Args:
        mode: ``"auto"`` (default): hard clipping with a base step (the smallest smoothness seen) and
            a step length (twice the inverse median ratio of smoothness to gradient norm over recent
            pairs), measured online (see :func:`lightning_l0l1.rules.auto_scale` and
            :mod:`lightning_l0l1.estimator`); it takes no ``max_norm``, ``l0`` or ``l1``.
            ``"clip"``: :math:`s=\min(1,\gamma/\lVert g\rVert)`; ``"adaptive"``:
            :math:`s=\gamma/(\lVert g\rVert+\gamma)`; ``"l0l1"``: per parameter group,
            :math:`s=\min(1, 1/(\eta(L_0+L_1\lVert g\rVert)))`.
        max_norm: :math:`\gamma` for ``clip`` and ``adaptive`` (required there).
        l0, l1: the smoothness constants for ``l0l1`` (``>= 0``, not both 0).
        norm_type: p of the p-norm, ``inf`` allowed.
        nonfinite: what a NaN/Inf global norm does: ``"skip"`` sets the step's
            gradients to ``None`` (torch optimizers then leave parameters, momentum and
            weight decay untouched); ``"zero"`` zeroes them; ``"raise"`` raises
            :class:`NonFiniteGradientError`; ``"propagate"`` checks nothing, like torch.
            The first three read one boolean on the host per step; ``propagate`` reads none.
        foreach: use the ``torch._foreach_*`` kernels (``None``: where supported).
        estimate: run the smoothness estimator (``None``: only in ``auto``). It keeps one snapshot
            of the gradients and parameters (two gradient-sized buffers) and adds, per step, one pass
            over them; in the fixed modes it only reports ``smoothness``, ``L0`` and ``L1``.
        estimate_every: form a secant pair every K steps only (the snapshot is refreshed on the
            step before), plus one at step 1, so that ``auto`` has a measurement before its step
            bound has grown for K steps; the estimator's time cost is divided by about K.
        probe: form the secant pairs with :meth:`probe` (the paper's method: the gradient of the
            step's own batch at the midpoint of the step, free of minibatch noise) instead of between
            consecutive steps' gradients. The caller computes that gradient; gradients must not be
            sharded.
        snapshot_device: ``"cpu"`` keeps the snapshot in (pinned) host memory: no device memory,
            at the price of host-device copies.
        initial_step: ``auto``: the first update moves the parameters by at most
            ``initial_step * max(||theta||, 1)`` (no estimate exists yet, default 1e-2); that bound
            doubles every step after, so the estimate takes over within a few steps.
        fused_handoff: for torch's fused optimizers (``Adam``/``AdamW``/``SGD(fused=True)``) and one
            scale for the whole optimizer, hand the scale (as ``grad_scale = 1/s``) and, with
            ``nonfinite="skip"``, the non-finite verdict (as ``found_inf``) to the optimizer's own
            kernel, the mechanism ``GradScaler`` uses: no scaling pass and no host read. The
            gradients then stay unscaled until the optimizer reads them, and a skipped step is
            counted but not warned about. Not used under a GradScaler or a sharded strategy.

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
        mode: Mode = "auto",
        max_norm: Optional[float] = None,
        l0: Optional[float] = None,
        l1: Optional[float] = None,
        norm_type: Union[float, str] = 2.0,
        nonfinite: NonFinite = "skip",
        foreach: Optional[bool] = None,
        estimate: Optional[bool] = None,
        estimate_every: int = 1,
        snapshot_device: Optional[Literal["cpu"]] = None,
        initial_step: float = 1e-2,
        fused_handoff: bool = True,
        probe: bool = False,
    ) -> None:
        self.mode: Mode = _choice("mode", mode, _MODES)  # type: ignore[assignment]
        self.nonfinite: NonFinite = _choice("nonfinite", nonfinite, _NONFINITE)  # type: ignore[assignment]
        self.norm_type = validate_norm_type(norm_type)
        self.foreach = _flag("foreach", foreach, allow_none=True)
        _flag("estimate", estimate, allow_none=True)
        if mode == "auto" and estimate is False:
            raise ValueError("`mode='auto'` needs the estimator: got `estimate=False`. Use `estimate=None` or True.")
        self.estimate = mode == "auto" if estimate is None else estimate
        self.estimate_every = _count("estimate_every", estimate_every)
        if snapshot_device not in (None, "cpu"):
            raise ValueError(
                f"`snapshot_device` must be None (the gradients' device) or 'cpu', got {snapshot_device!r}."
            )
        self.snapshot_device = snapshot_device
        self.initial_step = _positive("initial_step", initial_step)
        self.fused_handoff = _flag("fused_handoff", fused_handoff)
        self.probe_enabled = bool(_flag("probe", probe))
        if self.probe_enabled and not self.estimate:
            raise ValueError(
                "`probe=True` forms the estimator's pairs, so it needs the estimator: got `estimate=False`."
            )
        if mode == "l0l1":
            if l0 is None or l1 is None:
                raise ValueError(
                    f"`mode='l0l1'` needs both `l0` and `l1`, got l0={l0!r}, l1={l1!r}. "
                    "Give the smoothness constants of your loss, or use `mode='auto'` to estimate them."
                )
            self.l0 = _positive("l0", l0, allow_zero=True)
            self.l1 = _positive("l1", l1, allow_zero=True)
            if self.l0 == 0 and self.l1 == 0:
                raise ValueError(
                    f"`l0` and `l1` cannot both be 0 (the step would never be limited), got l0={l0!r}, l1={l1!r}."
                )
            self.max_norm: Optional[float] = None if max_norm is None else _positive("max_norm", max_norm)
        elif mode == "auto":
            given = [(k, v) for k, v in (("max_norm", max_norm), ("l0", l0), ("l1", l1)) if v is not None]
            if given:
                got = ", ".join(f"`{k}` = {v!r}" for k, v in given)
                raise ValueError(
                    f"`mode='auto'` (the default) sets its own threshold and constants, so it takes no "
                    f"`max_norm`, `l0` or `l1`; got {got}. For a fixed threshold pass `mode='clip'` (or "
                    "'adaptive') with `max_norm`; for given constants `mode='l0l1'` with `l0` and `l1`."
                )
            self.max_norm, self.l0, self.l1 = None, None, None
        else:
            if max_norm is None:
                raise ValueError(
                    f"`max_norm` is required for `mode={mode!r}`, got None (or use `mode='auto'`, which needs none)."
                )
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
        allow_handoff: bool = True,
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
            allow_handoff: with ``fused_handoff``, a fused optimizer may receive the scale instead of
                the gradients being scaled (pass False if something reads the gradients between
                this call and ``optimizer.step()``, e.g. Lightning's own ``gradient_clip_val``).
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
        _clear_handoff(optimizer)
        handoff = (
            allow_handoff
            and self.fused_handoff
            and not nonfinite_handled
            and self.nonfinite in ("skip", "propagate")
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and not any(g.sharded or g.dtensors for g in groups)
            and ((self.mode != "l0l1" and self.mode != "auto") or len(optimizer.param_groups) == 1)
        )
        read_host = self.nonfinite != "propagate" and not nonfinite_handled and not handoff
        flag = _HostFlag(finite) if read_host else None

        state = self._states.setdefault(key, _OptState())
        if self.mode == "auto" and not state.optimizer_checked:
            state.optimizer_checked = True
            if isinstance(optimizer, _SCALE_INVARIANT):
                warnings.warn(
                    f"`mode='auto'` sets the step of SGD (the update lr * s * g), but `{type(optimizer).__name__}` "
                    "divides the gradient by its own running magnitude, so scaling it barely changes the update: "
                    "auto will rarely limit this optimizer's steps (on the README's LSTM, AdamW with auto trained "
                    "exactly as without clipping). For Adam-type optimizers use `mode='clip'` with a `max_norm`.",
                    UserWarning,
                    stacklevel=3,  # the caller of step(), past torch.no_grad's wrapper
                )
        state.ensure(norm, len(groups), offload=self.snapshot_device == "cpu")
        state.sharded = any(g.sharded or g.dtensors for g in groups) or is_shard is not None
        amplified = self.mode == "auto" and _momentum_sgd(optimizer)
        if self.estimate:
            self._estimate(state, groups, params_per_group, norm, process_group, is_shard, amplified)

        lrs = [g["lr"] for g in optimizer.param_groups]
        state.amplified = amplified
        amp_max = _max_amplification(optimizer) if amplified else 1.0
        scales, threshold = self._scales(norm, lrs, state, amp_max)
        if handoff:
            # The fused kernel divides the gradients by `grad_scale` as it reads them and skips the
            # whole step (parameters, moments, step count) where `found_inf` is nonzero: the same
            # update as scaling first, without the scaling pass or a host read.
            _handoff(optimizer, scales[0], finite if self.nonfinite == "skip" else None)
            scaled_norm = norm * scales[0]
            per_group = scales * len(groups)
        elif len(scales) == 1:
            scale_grads_([t for grp in groups for t in _all(grp)], scales[0], self.foreach)
            scaled_norm = norm * scales[0]
            per_group = scales * len(groups)
        else:
            for grp, s in zip(groups, scales):
                scale_grads_(_all(grp), s, self.foreach)
            scaled_norm = total_norm(norms * torch.stack(scales).to(norms.dtype), self.norm_type)
            per_group = scales

        state.steps += 1
        thr = threshold if isinstance(threshold, Tensor) else norm.new_full((), threshold)
        lr_eff = [s * lr for s, lr in zip(per_group, lrs)]
        if amplified:
            # the step set (plain SGD's lr * s * g, per group), for the next pair's taken / set ratio
            set_len = total_norm(torch.stack([e * n for e, n in zip(lr_eff, norms.unbind())]), self.norm_type)
            env = state.env
            env.intended = torch.where(finite, set_len.to(env.intended.dtype), math.nan)  # type: ignore[union-attr]
        new = torch.stack([norm, scaled_norm, per_group[0], thr, *lr_eff]).to(state.last.dtype)  # type: ignore[union-attr]
        state.last = torch.where(finite, new, state.last)  # type: ignore[arg-type]
        clipped = finite & (norm > thr)
        state.nonfinite.add_(~finite)  # type: ignore[union-attr]
        state.clipped.add_(clipped)  # type: ignore[union-attr]

        outcome = StepOutcome(norm=norm, finite=None, values=new, finite_mask=finite, clipped=clipped)
        if flag is not None:
            outcome.finite = flag.get()
            if not outcome.finite:
                self._apply_nonfinite(optimizer, groups, step_label, outcome)
        return outcome

    def _scales(
        self, norm: Tensor, lrs: Sequence[Any], state: _OptState, amp_max: float = 1.0
    ) -> tuple[list[Tensor], Any]:
        """The scale(s) for this step and the norm threshold in use (host float or 0-d tensor)."""
        if self.mode == "clip":
            return [clip_scale(norm, self.max_norm)], float(self.max_norm)  # type: ignore[arg-type]
        if self.mode == "adaptive":
            return [adaptive_scale(norm, self.max_norm)], float(self.max_norm)  # type: ignore[arg-type]
        if self.mode == "l0l1":
            scales = [l0l1_scale(norm, lr, self.l0, self.l1) for lr in lrs]  # type: ignore[arg-type]
            return scales, l0l1_threshold(float(lrs[0]), self.l0, self.l1)  # type: ignore[arg-type]
        # auto: clipping at the base step the trajectory allows (rules.auto_scale), and a step-length
        # bound that starts at `delta` and doubles every step (so it only matters before any estimate).
        env = state.env
        growth = _TRUST_GROWTH ** min(state.steps, 1000)
        radius = state.delta * growth  # type: ignore[operator]
        # momentum SGD: the measured ratio, clamped to [1, its steady-state bound] (noise and oscillation
        # can make it < 1, which would loosen the limit past plain SGD's; a burst of clipping can make it spike)
        amp = env.amp.clamp(1.0, amp_max) if amp_max > 1.0 else None  # type: ignore[union-attr]
        scales, gammas = [], []
        for lr in lrs:
            rule, gamma = auto_scale(norm, lr, env.low, env.ratio, amp)  # type: ignore[union-attr]
            gammas.append(gamma)
            # the SGD-equivalent step length is lr * s * ||g||; keep it <= radius
            cap = torch.clamp(radius / (norm * lr + 1e-30), max=1.0)
            scales.append(torch.minimum(rule, cap))
        return scales, gammas[0]

    def _estimate(
        self,
        state: _OptState,
        groups: Sequence[GradGroup],
        params_per_group: Sequence[Sequence[Tensor]],
        norm: Tensor,
        process_group: Any,
        is_shard: Optional[Callable[[Tensor], bool]],
        amplified: bool = False,
    ) -> None:
        """Secant pair from the snapshot to now, envelope update, and the next snapshot (and, under
        momentum, the ratio of the step taken to the step set).

        Runs before the gradients are scaled: the secant is between raw gradients.
        """
        if state.env is None:
            state.env = envelope_init(norm.device)
        if state.snap is None:
            state.snap = Snapshot(offload=self.snapshot_device == "cpu")
        # Local tensors in one fixed order: replicated, sharded, DTensor (by their local shards).
        kinds = []
        grads: list[Tensor] = []
        params: list[Tensor] = []
        for grp, ps in zip(groups, params_per_group):
            by_grad = {id(p.grad): p for p in ps}
            for kind, part in (("r", grp.replicated), ("s", grp.sharded), ("d", grp.dtensors)):
                for g in part:
                    p = by_grad[id(g)]
                    kinds.append((kind, g))
                    grads.append(g.to_local() if kind == "d" else g)
                    params.append((p.to_local() if kind == "d" else p).detach())
        if self.mode == "auto" and state.delta is None:
            pgroup = _regroup(kinds, params, None)
            pnorm = total_norm(
                group_norms([pgroup], self.norm_type, process_group=process_group, sharded=is_shard is not None),
                self.norm_type,
            )
            state.delta = self.initial_step * torch.clamp(pnorm, min=1.0).to(norm.dtype)
        t = state.steps
        snap = state.snap
        layout = tuple(tuple(g.shape) for g in grads)
        if self.probe_enabled:
            if any(kind != "r" for kind, _ in kinds):
                raise RuntimeError(
                    "The probe (`probe_loss=` / `probe=True`) needs whole gradients; this optimizer's are "
                    "sharded (FSDP) or DTensors. Use the default minibatch secant (no probe) under sharding."
                )
            if t == 0 or (t + 1) % self.estimate_every == 0:
                snap.take(grads, params, norm)
                state.snap_step = t
                state.probe_params = [p for ps in params_per_group for p in ps]
            else:
                state.snap_step, state.probe_params = -2, []
            return
        if state.snap_step == t - 1 and snap.valid and snap.layout == layout:
            dg, dp = snap.differences(grads, params, self.norm_type)
            offloaded = snap.offload
            diff_groups = [_regroup(kinds, dg, None if not offloaded else "norms"),
                           _regroup(kinds, dp, None if not offloaded else "norms")]
            d = group_norms(
                diff_groups, self.norm_type, process_group=process_group, sharded=is_shard is not None,
                foreach=self.foreach,
            )
            pair_norm, smooth = secant_pair(d[0], d[1], snap.norm, norm)  # type: ignore[arg-type]
            state.env = envelope_update(state.env, pair_norm, smooth)
            if amplified:
                state.env = amplification_update(state.env, d[1])
        if t == 0 or (t + 1) % self.estimate_every == 0:
            snap.take(grads, params, norm)
            state.snap_step = t

    @torch.no_grad()
    def probe(
        self,
        key: int,
        gradient: Callable[[Sequence[Tensor]], Sequence[Optional[Tensor]]],
        reduce: Optional[Callable[[list[Tensor]], None]] = None,
    ) -> bool:
        r"""The paper's smoothness pair for the step just taken; call it after ``optimizer.step()``.

        With :math:`	heta_t, g_t` the parameters and (unscaled) gradient the last :meth:`step` saw and
        :math:`	heta_{t+1}` the parameters now, the parameters are moved to the midpoint
        :math:`ar	heta = (	heta_t + 	heta_{t+1})/2`, ``gradient(params)`` is called there (it
        must return the gradient of the *same* batch's loss with respect to ``params``, in order;
        ``None`` for an unused parameter), the parameters are restored bit for bit, and the pair
        :math:`(\mathrm{LM}(\lVert g_t
Vert, \lVertar g
Vert), \lVertar g - g_t
Vert /
        \lVertar	heta - 	heta_t
Vert)` enters the envelope. No minibatch noise enters it: both
        gradients are of one batch. ``reduce`` averages the probe gradients over processes in place
        (data parallel), so that every rank forms the same pair.

        Returns:
            Whether a pair was formed (``False`` when this step took no snapshot: ``estimate_every``,
            no gradient, or no :meth:`step` since the last probe). A skipped step (no parameter moved)
            or a non-finite probe gradient gives a pair the envelope ignores.
        """
        state = self._states.get(key)
        if not self.probe_enabled:
            raise RuntimeError("`probe()` needs a clipper made with `probe=True`.")
        if (
            state is None or state.snap is None or not state.snap.valid or state.snap_step != state.steps - 1
            or not state.probe_params
        ):
            return False
        snap, params = state.snap, state.probe_params
        state.snap_step, state.probe_params = -2, []  # one probe per snapshot
        now = [p.detach().clone() for p in params]  # theta_{t+1}, restored exactly afterwards
        before = [b.to(p.device, non_blocking=True) for b, p in zip(snap.params, params)]
        try:
            for p, b in zip(params, before):
                p.add_(b).mul_(0.5)  # the midpoint
            with torch.enable_grad():
                got = list(gradient(params))
        finally:
            torch._foreach_copy_(list(params), now)
        if len(got) != len(params):
            raise RuntimeError(
                f"The probe's gradient function returned {len(got)} tensors for {len(params)} parameters."
            )
        mid_grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(got, params)]
        if reduce is not None:
            reduce(mid_grads)
        old_grads = [b.to(p.device, non_blocking=True) for b, p in zip(snap.grads, params)]
        dg = [g - o for g, o in zip(mid_grads, old_grads)]
        dp = [(n - b) * 0.5 for n, b in zip(now, before)]
        d = group_norms([GradGroup(replicated=dg), GradGroup(replicated=dp), GradGroup(replicated=mid_grads)],
                        self.norm_type, foreach=self.foreach)
        pair_norm, smooth = secant_pair(d[0], d[1], snap.norm, d[2])  # type: ignore[arg-type]
        state.env = envelope_update(state.env, pair_norm, smooth)  # type: ignore[arg-type]
        if state.amplified:  # auto under momentum SGD: the whole step taken against the step set
            state.env = amplification_update(state.env, 2 * d[1])  # type: ignore[arg-type]
        return True

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
    def device_counters(self, key: int) -> Optional[Tensor]:
        """``[nonfinite_steps, smoothness, L0, L1, pair norm]`` of optimizer ``key`` as one device tensor (no sync).

        The estimator entries are NaN when the estimator is off. ``None`` before the first step.
        """
        st = self._states.get(key)
        if st is None or st.nonfinite is None:
            return None
        nan = st.last.new_full((), math.nan)  # type: ignore[union-attr]
        env = st.env
        parts = [st.nonfinite.to(nan.dtype)]
        if env is None:
            parts += [nan, nan, nan, nan]
        else:
            parts += [env.last, env.l0, env.l1, env.last_norm]
            parts = [parts[0]] + [t.to(nan.dtype) for t in parts[1:]]
        return torch.stack(parts)

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
            env = snap.get("env")
            if env is not None:
                l0, l1 = float(env["l0"]), float(env["l1"])
                out[f"{prefix}smoothness{sfx}"] = float(env["last"])
                out[f"{prefix}L0{sfx}"] = l0
                out[f"{prefix}L1{sfx}"] = l1
                out[f"{prefix}lr_suggested{sfx}"] = 1.0 / l0 if l0 > 0 else math.inf
                out[f"{prefix}smoothness_pairs{sfx}"] = float(env["pairs"])
            out[f"{prefix}steps{sfx}"] = float(snap["steps"])
            out[f"{prefix}nonfinite_steps{sfx}"] = float(snap["nonfinite_steps"])
            finite_steps = snap["steps"] - snap["nonfinite_steps"]
            out[f"{prefix}clip_rate{sfx}"] = snap["clipped_steps"] / finite_steps if finite_steps > 0 else 0.0
        return out

    @staticmethod
    def _snapshot(st: _OptState, with_buffers: bool = False) -> dict[str, Any]:
        if st.nonfinite is None:  # nothing on a device yet: what was loaded, or nothing
            out = {
                "steps": int(st.pending.get("steps", st.steps)),
                "nonfinite_steps": int(st.pending.get("nonfinite_steps", 0)),
                "clipped_steps": int(st.pending.get("clipped_steps", 0)),
                "last": list(st.pending.get("last") or []),
            }
            for k in ("env", "delta", "snapshot", "snap_step"):
                if st.pending.get(k) is not None:
                    out[k] = st.pending[k]
            return out
        # One device-to-host transfer for the counters.
        counts = torch.stack([st.nonfinite, st.clipped]).tolist()  # type: ignore[list-item]
        out = {
            "steps": st.steps,
            "nonfinite_steps": int(counts[0]),
            "clipped_steps": int(counts[1]),
            "last": st.last.tolist(),  # type: ignore[union-attr]
        }
        if st.env is not None:
            out["env"] = {k: v.tolist() for k, v in st.env.state_dict().items()}
        if st.delta is not None:
            out["delta"] = float(st.delta)
        if with_buffers and st.snap is not None and st.snap.valid:
            out["snapshot"] = st.snap.state_dict()
            out["snap_step"] = st.snap_step
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """All state, for every optimizer: counters, last statistics and the (L0, L1) envelope as
        plain Python values; with the estimator on, also the snapshot (two gradient-sized lists of
        CPU tensors) so that a resumed run forms the same next secant pair as an uninterrupted one.
        Under sharded strategies only rank zero's state is saved by Lightning, so there the snapshot
        is left out: the first step after resuming then forms no pair.
        """
        return {
            "version": 1,
            "optimizers": {
                k: self._snapshot(st, with_buffers=not st.sharded) for k, st in self._states.items()
            },
        }

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
                "env": snap.get("env"),
                "delta": snap.get("delta"),
                "snapshot": snap.get("snapshot"),
                "snap_step": snap.get("snap_step"),
            }
            self._states[int(k)] = st


_HANDOFF_ATTRS = ("grad_scale", "found_inf")


def _handoff(optimizer: Optimizer, scale: Tensor, finite: Optional[Tensor]) -> None:
    optimizer.grad_scale = torch.reciprocal(scale.float())  # type: ignore[attr-defined]
    optimizer.found_inf = None if finite is None else (~finite).float()  # type: ignore[attr-defined]
    if not getattr(optimizer, "_l0l1_handoff_hook", None):
        # Remove the attributes once the step has read them, as GradScaler does.
        optimizer._l0l1_handoff_hook = optimizer.register_step_post_hook(  # type: ignore[attr-defined]
            lambda opt, args, kwargs: _clear_handoff(opt)
        )


def _clear_handoff(optimizer: Optimizer) -> None:
    """Drop a hand-off left by a step that never ran (so it cannot leak into the next one)."""
    for name in _HANDOFF_ATTRS:
        if name in optimizer.__dict__ and getattr(optimizer, "_l0l1_handoff_hook", None):
            delattr(optimizer, name)


def _regroup(kinds: Sequence[tuple[str, Tensor]], tensors: Sequence[Tensor], how: Optional[str]) -> GradGroup:
    """A :class:`GradGroup` of ``tensors`` distributed like the gradients in ``kinds``.

    Local tensors of DTensor gradients are wrapped back into DTensors with the same mesh and
    placements, so the norm reduces them the same way. With ``how="norms"`` the tensors are
    1-element local norms (the offloaded snapshot): DTensor ones are then treated as shards of a
    1-d mesh, the only layout the offloaded snapshot supports.
    """
    group = GradGroup()
    for (kind, g), t in zip(kinds, tensors):
        if kind == "r":
            group.replicated.append(t)
        elif kind == "s":
            group.sharded.append(t)
        elif how == "norms":
            raise NotImplementedError(
                "`snapshot_device='cpu'` does not support DTensor (FSDP2 / tensor-parallel) gradients yet; "
                "keep the snapshot on the device (`snapshot_device=None`)."
            )
        else:
            from torch.distributed.tensor import DTensor

            group.dtensors.append(
                DTensor.from_local(t, g.device_mesh, g.placements, run_check=False, shape=g.shape, stride=g.stride())
            )
    return group


def _all(group: GradGroup) -> list[Tensor]:
    return group.replicated + group.sharded + group.dtensors
