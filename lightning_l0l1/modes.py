r"""The rule registry: one class per ``mode``, with its settings, its per-optimizer state and its scale.

A rule turns the global gradient norm of a step into the factor(s) the gradients are multiplied
by. Each is a small class in :data:`RULES`, keyed by its ``mode`` name:

=============  =====================================================  ==========================
``mode``       scale :math:`s`                                        settings
=============  =====================================================  ==========================
``clip``       :math:`\min(1, \gamma/(\lVert g\rVert + \epsilon))`    ``max_norm`` (:math:`\gamma`)
``adaptive``   :math:`\gamma/(\lVert g\rVert + \gamma)`               ``max_norm``
``l0l1``       :math:`\min(1, 1/(\eta(L_0 + L_1\lVert g\rVert)))`     ``l0``, ``l1``
``auto``       :func:`~lightning_l0l1.rules.auto_scale` from the      ``initial_step``
               estimate, within a step-length bound
=============  =====================================================  ==========================

The interface, in the manner of an optax transformation: :meth:`Rule.init` makes one optimizer's
state; in each step :meth:`Rule.begin` sees the step before anything is measured,
:meth:`Rule.observe` receives the estimator's measurement, :meth:`Rule.scales` returns the
factors and the threshold in use, and :meth:`Rule.end` sees the factors applied. The state is
saved and restored by :meth:`Rule.state_dict` and :meth:`Rule.load_state_dict`. Adding a mode is
adding a class to :data:`RULES` (and its name to :data:`Mode`).

Imports only :mod:`torch`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_l0l1 import validation
from lightning_l0l1.estimator import EnvelopeState, MomentumState, Secant, amplification_update, momentum_init
from lightning_l0l1.gradients import Gradients
from lightning_l0l1.norms import total_norm
from lightning_l0l1.rules import (
    adaptive_scale,
    auto_adaptive_scale,
    auto_scale,
    clip_scale,
    l0l1_scale,
    l0l1_threshold,
)

__all__ = [
    "RULES",
    "AdaptiveRule",
    "AutoRule",
    "AutoState",
    "ClipRule",
    "L0L1Rule",
    "Mode",
    "Rule",
    "StepContext",
    "make_rule",
]

Mode = Literal["auto", "clip", "adaptive", "l0l1"]
#: The norm threshold a rule reports: a host float, or a 0-d tensor where it is measured.
Threshold = Union[float, Tensor]


@dataclass
class StepContext:
    """What a rule sees of one optimizer step.

    Attributes:
        optimizer: the optimizer about to step.
        grads: its gradients (raw: not yet scaled).
        norms: the global norm of each param group's gradients (1-d).
        norm: the global norm (0-d).
        norm_type: the p of the norms.
        lrs: the learning rate of each param group (floats or tensors).
        steps: the steps this optimizer has taken before this one.
        envelope: the estimator's estimates after this step's measurement (``None``: estimator off).
        lr_factors: set by a rule that steers through the learning rate: each group's learning rate is
            multiplied by its factor for this step's ``optimizer.step()`` only (``None``: unchanged).
    """

    optimizer: Optimizer
    grads: Gradients
    norms: Tensor
    norm: Tensor
    norm_type: float
    lrs: list[Any]
    steps: int = 0
    envelope: Optional[EnvelopeState] = None
    lr_factors: Optional[list[Tensor]] = None


class Rule:
    """A scaling rule. Subclasses set :attr:`name` and implement :meth:`scales`.

    Attributes:
        name: the ``mode`` it is registered under.
        per_group: its scale depends on each param group's learning rate (one scale per group).
        needs_estimate: it steps from the estimator's measurements.
        max_norm, l0, l1: the settings the rule was given (``None``: not given).
    """

    name: ClassVar[str]
    per_group: ClassVar[bool] = False
    needs_estimate: ClassVar[bool] = False

    max_norm: Optional[float] = None
    l0: Optional[float] = None
    l1: Optional[float] = None

    @classmethod
    def from_settings(
        cls, max_norm: Optional[float] = None, l0: Optional[float] = None, l1: Optional[float] = None,
        initial_step: Optional[float] = None,
    ) -> Rule:
        """The rule for these settings (the union of every rule's), validated.

        Raises:
            ValueError: for a missing, invalid or (for ``auto``) refused setting, naming it.
        """
        raise NotImplementedError

    def init(self) -> Any:
        """A new optimizer's state (``None``: the rule keeps none)."""
        return None

    def to(self, state: Any, like: Tensor) -> Any:
        """``state`` on ``like``'s device (and dtype, for values in the norm's dtype)."""
        return state

    def begin(self, state: Any, ctx: StepContext) -> None:
        """Called before the estimator measures the step."""

    def observe(self, state: Any, secant: Secant) -> None:
        """Called with each measurement the estimator forms (in the step, or after it by a probe)."""

    def scales(self, state: Any, ctx: StepContext) -> tuple[list[Tensor], Threshold]:
        """One factor for the whole optimizer, or one per param group; and the norm threshold in use."""
        raise NotImplementedError

    def end(self, state: Any, ctx: StepContext, lr_effective: Sequence[Tensor], finite: Tensor) -> None:
        """Called after the factors are applied, with each group's ``lr * s`` and the norm's finiteness."""

    def state_dict(self, state: Any) -> dict[str, Any]:
        """``state`` as plain Python values and CPU tensors."""
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> Any:
        """The state :meth:`state_dict` saved (on the CPU; :meth:`to` moves it)."""
        return None


def _unused(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=6)  # the call that made the clipper


def _optional(name: str, value: Any) -> Optional[float]:
    return None if value is None else validation.positive(name, value, allow_zero=True)


class _ThresholdRule(Rule):
    """A fixed threshold ``max_norm`` (``l0``/``l1`` are checked if given, and not used)."""

    def __init__(self, max_norm: float, l0: Optional[float] = None, l1: Optional[float] = None) -> None:
        self.max_norm = validation.positive("max_norm", max_norm)
        self.l0, self.l1 = _optional("l0", l0), _optional("l1", l1)
        if l0 is not None or l1 is not None:
            _unused(f"`l0` and `l1` are used by `mode='l0l1'` only: `mode={self.name!r}` ignores l0={l0!r}, l1={l1!r}.")

    @classmethod
    def from_settings(
        cls, max_norm: Optional[float] = None, l0: Optional[float] = None, l1: Optional[float] = None,
        initial_step: Optional[float] = None,
    ) -> Rule:
        if max_norm is None:
            raise ValueError(
                f"`max_norm` is required for `mode={cls.name!r}`, got None (or use `mode='auto'`, which needs none)."
            )
        return cls(max_norm, l0, l1)

    def scales(self, state: Any, ctx: StepContext) -> tuple[list[Tensor], Threshold]:
        return [self.scale(ctx.norm)], float(self.max_norm)  # type: ignore[arg-type]

    def scale(self, norm: Tensor) -> Tensor:
        raise NotImplementedError


class ClipRule(_ThresholdRule):
    r"""Hard clipping, :func:`~lightning_l0l1.rules.clip_scale`:
    :math:`s = \min(1, \gamma/(\lVert g\rVert + \epsilon))`."""

    name = "clip"

    def scale(self, norm: Tensor) -> Tensor:
        return clip_scale(norm, self.max_norm)  # type: ignore[arg-type]


class AdaptiveRule(_ThresholdRule):
    r"""Smooth clipping, :func:`~lightning_l0l1.rules.adaptive_scale`:
    :math:`s = \gamma/(\lVert g\rVert + \gamma)`."""

    name = "adaptive"

    def scale(self, norm: Tensor) -> Tensor:
        if self.max_norm > torch.finfo(norm.dtype).max:  # type: ignore[operator]
            return torch.ones_like(norm)  # gamma / (||g|| + gamma) would be inf / inf; its limit is 1
        return adaptive_scale(norm, self.max_norm)  # type: ignore[arg-type]


class L0L1Rule(Rule):
    r"""The :math:`(L_0, L_1)` step, :func:`~lightning_l0l1.rules.l0l1_scale`, per param group:
    :math:`s = \min(1, 1/(\eta(L_0 + L_1\lVert g\rVert)))`. ``max_norm`` is checked if given, and not used."""

    name = "l0l1"
    per_group = True

    def __init__(self, l0: float, l1: float, max_norm: Optional[float] = None) -> None:
        self.l0 = validation.positive("l0", l0, allow_zero=True)
        self.l1 = validation.positive("l1", l1, allow_zero=True)
        if self.l0 == 0 and self.l1 == 0:
            raise ValueError(
                f"`l0` and `l1` cannot both be 0 (the step would never be limited), got l0={l0!r}, l1={l1!r}."
            )
        self.max_norm = None if max_norm is None else validation.positive("max_norm", max_norm)
        if max_norm is not None:
            _unused(f"`max_norm` is used by `mode='clip'` and `'adaptive'` only: `mode='l0l1'` ignores "
                    f"max_norm={max_norm!r} (its threshold follows from `l0`, `l1` and the learning rate).")

    @classmethod
    def from_settings(
        cls, max_norm: Optional[float] = None, l0: Optional[float] = None, l1: Optional[float] = None,
        initial_step: Optional[float] = None,
    ) -> Rule:
        if l0 is None or l1 is None:
            raise ValueError(
                f"`mode='l0l1'` needs both `l0` and `l1`, got l0={l0!r}, l1={l1!r}. "
                "Give the smoothness constants of your loss, or use `mode='auto'` to estimate them."
            )
        return cls(l0, l1, max_norm)

    def scales(self, state: Any, ctx: StepContext) -> tuple[list[Tensor], Threshold]:
        scales = [l0l1_scale(ctx.norm, lr, self.l0, self.l1) for lr in ctx.lrs]  # type: ignore[arg-type]
        return scales, l0l1_threshold(float(ctx.lrs[0]), self.l0, self.l1)  # type: ignore[arg-type]


# Optimizers whose update does not scale with the gradient (it is normalized by its own running
# magnitude): a factor s on the gradient barely changes their step.
_SCALE_INVARIANT = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam",
                 "Adafactor")
    if hasattr(torch.optim, name)
)
# What auto knows how to steer: these, SGD (with or without momentum), and their subclasses.
_KNOWN = (*_SCALE_INVARIANT, torch.optim.SGD)


def _normalizes_the_gradient(optimizer: Optimizer) -> bool:
    """Adam-type: one of torch's, or an optimizer from elsewhere whose settings have ``betas`` (the
    moment decays of Adam, AdamW, LAMB, Lion and their relatives) and whose name does not say SGD or
    LARS (some packages keep momentum SGD's ``(momentum, dampening)`` under ``betas``)."""
    if isinstance(optimizer, _SCALE_INVARIANT):
        return True
    if isinstance(optimizer, _KNOWN) or "betas" not in getattr(optimizer, "defaults", {}):
        return False
    name = type(optimizer).__name__.upper()
    return "SGD" not in name and "LARS" not in name


def _warn_unknown(optimizer: Optimizer, adaptive: bool) -> None:
    """Once per rule state: ``auto`` treats an optimizer it does not know by a guess; say which."""
    name = type(optimizer).__qualname__
    how = ("as Adam-type (its settings have `betas`): the gradient is clipped and the step length bounded "
           "through a per-step learning-rate factor" if adaptive else
           "as plain SGD: its step is taken to be `lr * s * g`")
    warnings.warn(
        f"`mode='auto'` does not know the optimizer `{name}` and treats it {how}. If its step is something "
        "else, auto's step bounds do not hold: use `mode='clip'` with a tuned `max_norm` for it.",
        UserWarning, stacklevel=2,
    )


def _first_step_length(optimizer: Optimizer, ctx: StepContext) -> Tensor:
    """The length of an Adam-type optimizer's first step, before any is measured: it moves each coordinate
    with a nonzero gradient by about its learning rate (RMSprop: ``lr / sqrt(1 - alpha)``)."""
    parts = []
    for group, grad_group in zip(optimizer.param_groups, ctx.grads.groups):
        per_coordinate = float(group["lr"])
        if isinstance(optimizer, torch.optim.RMSprop):
            per_coordinate /= math.sqrt(max(1.0 - float(group.get("alpha", 0.99)), 1e-12))
        n = sum(t.numel() for t in grad_group.local_tensors())
        parts.append(per_coordinate**2 * n)
    return torch.tensor(math.sqrt(max(sum(parts), 1e-30)), dtype=torch.float64)


#: ``auto``'s step-length bound grows by this factor every step from ``initial_step``.
TRUST_GROWTH = 2.0
#: ``auto``'s default ``initial_step``: the first step's bound relative to ``max(||theta||, 1)``.
INITIAL_STEP = 1e-2
#: The same for an optimizer that normalizes the gradient (Adam-type), whose first steps move every
#: coordinate by about its learning rate. Shortening those steps keeps the next gradients aligned with
#: the first, so the optimizer's following steps stay at full length: a tight bound delays, and
#: sharpens, the early loss rise instead of preventing it (docs/how-it-works.md has the measurements).
INITIAL_STEP_ADAPTIVE = 2e-1


def _momentum_sgd(optimizer: Optimizer) -> bool:
    """SGD with momentum: its step is longer than ``lr * g``."""
    return isinstance(optimizer, torch.optim.SGD) and any(g.get("momentum", 0) for g in optimizer.param_groups)


def _max_amplification(optimizer: Optimizer) -> float:
    """How much longer than ``lr * g`` momentum SGD's steady-state step is, at most over the param groups:
    ``(1 - dampening) / (1 - momentum)``, times ``1 + momentum`` for Nesterov; 1 without momentum."""
    bound = 1.0
    for g in optimizer.param_groups:
        m, d = float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0))
        if 0 < m < 1:
            bound = max(bound, (1 - d) / (1 - m) * ((1 + m) if g.get("nesterov") else 1.0))
    return bound


def _max_momentum(optimizer: Optimizer) -> float:
    """The largest momentum coefficient over the param groups (0 without momentum)."""
    return max((float(g.get("momentum", 0.0)) for g in optimizer.param_groups), default=0.0)


#: SGD with momentum ``m`` under ``auto``: the factor may rise by at most ``RISE * (1 - m)`` of itself per step
#: (it may fall at once). See :meth:`AutoRule.scales`.
RISE = 0.5

#: Adam-type optimizers under ``auto``: the weight of the previous average in the typical gradient norm.
TYPICAL_DECAY = 0.9
_ADAPTIVE_FIELDS = ("natural", "applied", "typical")


@dataclass
class AutoState:
    """``auto``'s state for one optimizer.

    Attributes:
        delta: the bound on the first step's length (``None`` until the first step).
        momentum: the measured ratio of the step taken to the step set (SGD with momentum).
        amplified: the optimizer is SGD with momentum: the ratio is measured and used.
        amp_max: the ratio's steady-state bound for this optimizer.
        rise: SGD with momentum: how much the factor may grow per step, relative (``inf``: unbounded).
        previous: SGD with momentum: each param group's factor at the last finite step (NaN: none).
        checked: the optimizer's type was looked at (a warning is given at most once).
        adaptive: the optimizer normalizes the gradient (Adam-type): auto steers its learning rate.
        natural: Adam-type: the length of the step the optimizer takes at its own learning rate.
        applied: Adam-type: the learning-rate factor of the last step.
        typical: Adam-type: the average of the finite gradient norms so far (weight
            :data:`TYPICAL_DECAY` on the previous average), the floor of the threshold.
    """

    delta: Optional[Tensor] = None
    momentum: Optional[MomentumState] = None
    amplified: bool = False
    amp_max: float = 1.0
    rise: float = math.inf
    previous: Optional[Tensor] = None
    checked: bool = False
    adaptive: bool = False
    natural: Optional[Tensor] = None
    applied: Optional[Tensor] = None
    typical: Optional[Tensor] = None


class AutoRule(Rule):
    r"""Hard clipping at the measured base step and step length, :func:`~lightning_l0l1.rules.auto_scale`,
    within a step-length bound :math:`\delta\, 2^t` with :math:`\delta` = ``initial_step`` :math:`\cdot
    \max(\lVert\theta\rVert, 1)`. Under SGD with momentum the length limit is divided by the measured
    ratio :math:`a` of the step taken to the step set, clamped to :math:`[1, a_{\max}]` (its steady-state
    bound), and the base step by :math:`\sqrt{a\,a_{\max}}` (at least :math:`\sqrt{a_{\max}}`); there the
    factor falls at once but rises by at most :data:`RISE` :math:`\cdot (1 - m)` of itself per step. An
    optimizer that normalizes the gradient (Adam-type) gets :func:`~lightning_l0l1.rules.auto_adaptive_scale`:
    its gradient is clipped at :math:`2\underline L/\tilde r`, or at the typical gradient norm if that is
    larger, and its learning rate scaled for the step so that the step it takes stays within the same
    length limit and bound."""

    name = "auto"
    per_group = True
    needs_estimate = True

    def __init__(self, initial_step: Optional[float] = None) -> None:
        self.initial_step: Optional[float] = (
            None if initial_step is None
            else validation.positive("initial_step", initial_step, low=validation.FLOAT32_TINY)
        )

    @classmethod
    def from_settings(
        cls, max_norm: Optional[float] = None, l0: Optional[float] = None, l1: Optional[float] = None,
        initial_step: Optional[float] = None,
    ) -> Rule:
        given = [(k, v) for k, v in (("max_norm", max_norm), ("l0", l0), ("l1", l1)) if v is not None]
        if given:
            got = ", ".join(f"`{k}` = {v!r}" for k, v in given)
            raise ValueError(
                f"`mode='auto'` (the default) sets its own threshold and constants, so it takes no "
                f"`max_norm`, `l0` or `l1`; got {got}. For a fixed threshold pass `mode='clip'` (or "
                "'adaptive') with `max_norm`; for given constants `mode='l0l1'` with `l0` and `l1`."
            )
        return cls(initial_step)

    def init(self) -> AutoState:
        return AutoState()

    def to(self, state: AutoState, like: Tensor) -> AutoState:
        if state.delta is not None and (state.delta.device, state.delta.dtype) != (like.device, like.dtype):
            state.delta = state.delta.to(like.device, like.dtype)
        if state.momentum is not None and state.momentum.amp.device != like.device:
            state.momentum = state.momentum.to(like.device)
        for name in _ADAPTIVE_FIELDS:
            t = getattr(state, name)
            if t is not None and (t.device, t.dtype) != (like.device, like.dtype):
                setattr(state, name, t.to(like.device, like.dtype))
        if state.previous is not None and state.previous.device != like.device:
            state.previous = state.previous.to(like.device)
        return state

    def begin(self, state: AutoState, ctx: StepContext) -> None:
        opt = ctx.optimizer
        if isinstance(opt, torch.optim.LBFGS):
            raise RuntimeError(
                "`mode='auto'` measures one optimizer step per call, but LBFGS evaluates its closure (and so "
                "calls the clipper) several times per step: its step bound and estimate would count line-search "
                "evaluations as steps. Use `mode='clip'` (or 'adaptive', 'l0l1') with LBFGS: they scale the "
                "gradient of every closure evaluation."
            )
        state.adaptive = _normalizes_the_gradient(opt)
        if not state.checked:
            state.checked = True
            if not isinstance(opt, _KNOWN):
                _warn_unknown(opt, state.adaptive)
        if state.adaptive and state.natural is None:
            state.natural = _first_step_length(opt, ctx).to(ctx.norm.device, ctx.norm.dtype)
        state.amplified = _momentum_sgd(opt)
        state.amp_max = _max_amplification(opt) if state.amplified else 1.0
        state.rise = RISE * (1.0 - _max_momentum(opt)) if state.amplified else math.inf
        if state.momentum is None:
            state.momentum = momentum_init(ctx.norm.device)
        if state.delta is None:
            pnorm = ctx.grads.param_norm(ctx.norm_type)
            first = self.initial_step
            if first is None:
                first = INITIAL_STEP_ADAPTIVE if state.adaptive else INITIAL_STEP
            state.delta = first * torch.clamp(pnorm, min=1.0).to(ctx.norm.dtype)

    def observe(self, state: AutoState, secant: Secant) -> None:
        if state.adaptive and state.applied is not None and state.natural is not None:
            # the step just measured was taken at learning-rate factor `applied`
            natural = secant.step.to(state.natural.dtype) / state.applied.to(state.natural.dtype)
            state.natural = torch.where(torch.isfinite(natural) & (natural > 0), natural, state.natural)
        if state.amplified:
            state.momentum = amplification_update(state.momentum, secant.step)  # type: ignore[arg-type]

    def scales(self, state: AutoState, ctx: StepContext) -> tuple[list[Tensor], Threshold]:
        env = ctx.envelope
        assert env is not None and state.delta is not None and state.momentum is not None
        radius = state.delta * TRUST_GROWTH ** min(ctx.steps, 1000)
        if state.adaptive:
            return self._adaptive_scales(state, ctx, radius)
        amp = state.momentum.amp.clamp(1.0, state.amp_max) if state.amp_max > 1.0 else None
        # the base step by the geometric mean of the measured ratio and its steady-state bound
        base_amp = None if amp is None else torch.sqrt(amp * state.amp_max)
        scales, gammas, rules = [], [], []
        previous = state.previous if state.previous is not None and len(state.previous) == len(ctx.lrs) else None
        for i, lr in enumerate(ctx.lrs):
            rule, gamma = auto_scale(ctx.norm, lr, env.low, env.ratio, amp, base_amp)
            gammas.append(gamma)
            if previous is not None:
                # momentum: the rule's factor falls at once but rises by at most `rise` of itself per step
                cap = previous[i].to(rule.dtype) * (1.0 + state.rise)
                rule = torch.where(torch.isnan(cap), rule, torch.minimum(rule, cap))
            rules.append(rule)
            # the SGD-equivalent step length is lr * s * ||g||; keep it <= radius
            scales.append(torch.minimum(rule, torch.clamp(radius / (ctx.norm * lr + 1e-30), max=1.0)))
        if math.isfinite(state.rise):
            stacked = torch.stack(rules).to(torch.float64)
            state.previous = stacked if previous is None else torch.where(
                torch.isfinite(ctx.norm), stacked, previous.to(stacked.device))
        return scales, gammas[0]

    def _adaptive_scales(self, state: AutoState, ctx: StepContext, radius: Tensor) -> tuple[list[Tensor], Threshold]:
        """Adam-type optimizers: clip what enters the moments, bound the step through the learning rate."""
        env = ctx.envelope
        assert env is not None and state.natural is not None
        s, gamma, c = auto_adaptive_scale(ctx.norm, env.low, env.ratio, state.natural, radius, state.typical)
        state.applied = c
        # the floor follows the norms before clipping, so a run of clipped steps cannot lower it
        norm = ctx.norm.to(state.natural.dtype)
        prev = state.typical if state.typical is not None else torch.full_like(norm, math.nan)
        mixed = torch.where(torch.isnan(prev), norm, TYPICAL_DECAY * prev + (1 - TYPICAL_DECAY) * norm)
        state.typical = torch.where(torch.isfinite(norm), mixed, prev)
        ctx.lr_factors = [c] * len(ctx.lrs)
        return [s] * len(ctx.lrs), gamma

    def end(self, state: AutoState, ctx: StepContext, lr_effective: Sequence[Tensor], finite: Tensor) -> None:
        if state.amplified:  # the step set (plain SGD's lr * s * g, per group), for the next ratio
            mom = state.momentum
            assert mom is not None
            set_len = total_norm(torch.stack([e * n for e, n in zip(lr_effective, ctx.norms.unbind())]),
                                 ctx.norm_type)
            state.momentum = dataclasses.replace(
                mom, intended=torch.where(finite, set_len.to(mom.intended.dtype), math.nan)
            )

    def state_dict(self, state: AutoState) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if state.delta is not None:
            out["delta"] = float(state.delta)
        if state.momentum is not None:
            out["momentum"] = {k: v.tolist() for k, v in state.momentum.state_dict().items()}
        for name in _ADAPTIVE_FIELDS:
            t = getattr(state, name)
            if t is not None:
                out[name] = float(t)
        if state.previous is not None:
            out["previous"] = state.previous.tolist()
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> AutoState:
        state = AutoState()
        if sd.get("delta") is not None:
            state.delta = torch.tensor(sd["delta"], dtype=torch.float64)
        # earlier checkpoints kept the momentum fields inside the estimator's "env"
        momentum = sd.get("momentum") or sd.get("env")
        if momentum is not None:
            state.momentum = MomentumState.from_state_dict(momentum, torch.device("cpu"))
        for name in _ADAPTIVE_FIELDS:
            if sd.get(name) is not None:
                setattr(state, name, torch.tensor(sd[name], dtype=torch.float64))
        if sd.get("previous") is not None:
            state.previous = torch.tensor(sd["previous"], dtype=torch.float64)
        return state


#: Every rule, by its ``mode`` name.
RULES: dict[str, type[Rule]] = {rule.name: rule for rule in (AutoRule, ClipRule, AdaptiveRule, L0L1Rule)}


def make_rule(
    mode: str, max_norm: Optional[float] = None, l0: Optional[float] = None, l1: Optional[float] = None,
    initial_step: Optional[float] = None,
) -> Rule:
    """The registered rule for ``mode``, with its settings validated.

    Example:
        >>> make_rule("clip", max_norm=1.0).max_norm
        1.0
    """
    validation.choice("mode", mode, tuple(RULES))
    return RULES[mode].from_settings(max_norm=max_norm, l0=l0, l1=l1, initial_step=initial_step)
