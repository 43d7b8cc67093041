r"""The framework-neutral step, for one optimizer at a time.

:meth:`GradientClipper.step` runs between ``backward()`` (and ``scaler.unscale_``) and
``optimizer.step()``, as a short pipeline:

1. collect the optimizer's gradients (:class:`~lightning_l0l1.gradients.Gradients`);
2. their global norm, per param group and in all (:mod:`~lightning_l0l1.norms`);
3. the estimator's measurement of the last step, if on (:mod:`~lightning_l0l1.estimator`);
4. the rule's scale(s) (:mod:`~lightning_l0l1.modes`);
5. apply: scale the gradients in place, or hand the scale to a fused optimizer's kernel;
6. record the step (:class:`~lightning_l0l1.stats.StepRecord`) and count it;
7. the non-finite policy, where a non-finite norm was found.

The Lightning callback (:mod:`lightning_l0l1.callback`) is glue over it; a plain PyTorch or
Fabric loop calls :meth:`GradientClipper.step` itself. Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_l0l1 import handoff, stats, validation
from lightning_l0l1.estimator import SecantEstimator
from lightning_l0l1.gradients import Gradients
from lightning_l0l1.modes import RULES, Mode, Rule, StepContext, make_rule
from lightning_l0l1.norms import PerTensorNorms, scale_grads_, total_norm
from lightning_l0l1.state import VERSION, Counters, OptimizerState, check_clipper_state
from lightning_l0l1.stats import StepRecord
from lightning_l0l1.watch import DEFAULT_WINDOW, DivergenceWarning, Watch, WatchState, message

__all__ = ["GradientClipper", "Mode", "NonFinite", "NonFiniteGradientError", "SnapshotKind", "StepOutcome"]

NonFinite = Literal["skip", "zero", "raise", "propagate"]
_NONFINITE: tuple[str, ...] = get_args(NonFinite)
SnapshotKind = Literal["sampled", "full"]


class NonFiniteGradientError(RuntimeError):
    """Raised by ``nonfinite="raise"`` when the global gradient norm is NaN or infinite."""


@dataclass
class StepOutcome:
    """What one :meth:`GradientClipper.step` did.

    Attributes:
        norm: the global pre-scaling norm (0-d tensor, on the gradients' device).
        finite: ``True``/``False`` when the non-finite policy read the verdict on the
            host, ``None`` when nothing was read (``propagate``, or a GradScaler decides).
        action: ``"scaled"``, or for a non-finite step ``"skipped"`` or ``"zeroed"``.
        record: the step's statistics, on the device (:class:`~lightning_l0l1.stats.StepRecord`).
        param_norms: with :attr:`GradientClipper.keep_param_norms`: each parameter's gradient norm
            before scaling, as segments ``(ids of the parameters, 1-d device tensor of their norms)``:
            the per-tensor norms the global norm is formed from (none for FSDP1 shards).
    """

    norm: Tensor
    finite: Optional[bool]
    action: str = "scaled"
    record: Optional[StepRecord] = None
    param_norms: Optional[PerTensorNorms] = None


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

    With :math:`g` the gradient of every parameter the optimizer steps and :math:`\eta` each param
    group's learning rate, the gradients are multiplied by :math:`0 \le s \le 1`:

    .. math::

        \text{clip}: s = \min\left(1, \frac{\gamma}{\lVert g\rVert + \epsilon}\right) \quad
        \text{adaptive}: s = \frac{\gamma}{\lVert g\rVert + \gamma} \quad
        \text{l0l1}: s = \min\left(1, \frac{1}{\eta (L_0 + L_1 \lVert g\rVert)}\right)

    and ``auto`` steps :math:`\eta s = \min(\eta, 1/\underline L, 2/(\tilde r\lVert g\rVert))` from the
    estimator's smallest smoothness :math:`\underline L` and median ratio :math:`\tilde r`
    (:func:`~lightning_l0l1.rules.auto_scale`).

    Args:
        mode: ``"auto"`` (default, takes no ``max_norm``, ``l0`` or ``l1``), ``"clip"``, ``"adaptive"``
            or ``"l0l1"``: a key of :data:`lightning_l0l1.modes.RULES`.
        max_norm: :math:`\gamma` for ``clip`` and ``adaptive`` (required there). This and ``l0``, ``l1``,
            ``initial_step`` may be Python or numpy numbers or 0-d tensors (read once, here).
        l0: the smoothness constant :math:`L_0` for ``l0l1`` (``>= 0``, not both ``l0`` and ``l1`` 0).
        l1: the smoothness constant :math:`L_1` for ``l0l1`` (``>= 0``).
        norm_type: p of the p-norm, ``inf`` allowed.
        nonfinite: what a NaN/Inf global norm does: ``"skip"`` sets the step's
            gradients to ``None`` (torch optimizers then leave parameters, momentum and
            weight decay untouched); ``"zero"`` zeroes them; ``"raise"`` raises
            :class:`NonFiniteGradientError`; ``"propagate"`` checks nothing, like torch.
            The first three read one boolean on the host per step; ``propagate`` reads none.
        foreach: use the ``torch._foreach_*`` kernels (``None``: where supported).
        estimate: run the smoothness estimator (``None``: only where the mode needs it, ``auto``). It
            keeps a snapshot of the previous step (see ``snapshot``); in the fixed modes it only reports
            ``smoothness``, ``L0`` and ``L1``.
        estimate_every: form a secant pair every K steps only (plus one at step 1); the estimator's
            time cost is divided by about K.
        snapshot: what the estimator keeps of the previous step. ``"sampled"``: one block of 64
            elements in 128 (at least 64 blocks per tensor; tensors of fewer than 8192 elements whole),
            kept with the current step's sample beside it, about 3.1% of the gradient bytes for large
            tensors, the norms of the differences estimated from them
            (:class:`~lightning_l0l1.snapshots.SampledSnapshot`). ``"full"``: every gradient and
            parameter, two gradient-sized buffers and one more pass over both per step, the exact
            differences. ``None`` (default): ``"full"`` with ``probe`` or ``snapshot_device="cpu"``,
            else ``"sampled"``.
        snapshot_device: ``"cpu"`` (or ``torch.device("cpu")``) keeps a full snapshot in (pinned) host
            memory: no device memory, at the price of host-device copies.
        initial_step: ``auto``: the first update moves the parameters by at most
            ``initial_step * max(||theta||, 1)``; that bound doubles every step after. ``None``
            (default): ``1e-2``, or ``0.2`` for an optimizer that normalizes the gradient (Adam,
            AdamW, RMSprop, ...).
        fused_handoff: for torch's fused optimizers (``Adam``/``AdamW``/``SGD(fused=True)``) and one
            scale for the whole optimizer, hand the scale (as ``grad_scale = 1/s``) and, with
            ``nonfinite="skip"``, the non-finite verdict (as ``found_inf``) to the optimizer's own
            kernel, the mechanism ``GradScaler`` uses: no scaling pass and no host read. The
            gradients then stay unscaled until the optimizer reads them, and a skipped step is
            counted but not warned about. Not used under a GradScaler or a sharded strategy.
        probe: form the secant pairs with :meth:`probe` (the gradient of the step's own batch at the
            midpoint of the step) instead of between consecutive steps' gradients. Gradients must
            not be sharded.
        divergence_window: ``auto`` only: the window, in steps given a ``loss`` (see :meth:`step`), of the
            divergence watch (:mod:`~lightning_l0l1.watch`): where the mean training loss stays above twice its
            lowest window mean for 3 windows in a row while ``auto`` keeps its effective learning rate, one
            :class:`~lightning_l0l1.watch.DivergenceWarning` per optimizer names what it saw. One host read per
            window, a window late; none without ``loss``. ``None`` turns it off. Not checkpointed: after a
            resume it starts afresh.

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

    #: keep each parameter's gradient norm in :attr:`StepOutcome.param_norms` (the per-layer statistics;
    #: no extra computation: they are the per-tensor norms the global norm is formed from).
    keep_param_norms: bool = False

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
        snapshot_device: Optional[Union[Literal["cpu"], torch.device]] = None,
        initial_step: Optional[float] = None,
        fused_handoff: bool = True,
        probe: bool = False,
        snapshot: Optional[SnapshotKind] = None,
        divergence_window: Optional[int] = DEFAULT_WINDOW,
    ) -> None:
        rule_cls = RULES[validation.choice("mode", mode, tuple(RULES))]
        self.nonfinite: NonFinite = validation.choice("nonfinite", nonfinite, _NONFINITE)  # type: ignore[assignment]
        self.norm_type = validation.norm_type(norm_type)
        self.foreach = validation.flag("foreach", foreach, allow_none=True)
        validation.flag("estimate", estimate, allow_none=True)
        if rule_cls.needs_estimate and estimate is False:
            raise ValueError(
                f"`mode={mode!r}` needs the estimator: got `estimate=False`. Use `estimate=None` or True."
            )
        self.estimate: bool = rule_cls.needs_estimate if estimate is None else estimate
        self.estimate_every: int = validation.count("estimate_every", estimate_every)  # type: ignore[assignment]
        self.snapshot_device: Optional[Literal["cpu"]] = validation.device(  # type: ignore[assignment]
            "snapshot_device", snapshot_device, (None, "cpu")
        )
        self.initial_step: Optional[float] = (
            None if initial_step is None
            else validation.positive("initial_step", initial_step, low=validation.FLOAT32_TINY)
        )
        self.fused_handoff: bool = validation.flag("fused_handoff", fused_handoff)  # type: ignore[assignment]
        self.probe_enabled: bool = validation.flag("probe", probe)  # type: ignore[assignment]
        if self.probe_enabled and not self.estimate:
            raise ValueError(
                "`probe=True` forms the estimator's pairs, so it needs the estimator: got `estimate=False`."
            )
        self.snapshot: SnapshotKind = _snapshot_kind(snapshot, self.probe_enabled, self.snapshot_device)
        self.rule: Rule = make_rule(mode, max_norm, l0, l1, self.initial_step)
        self.estimator: Optional[SecantEstimator] = (
            SecantEstimator(self.norm_type, self.estimate_every, self.snapshot_device == "cpu", self.probe_enabled,
                            self.foreach, self.snapshot)
            if self.estimate else None
        )
        self.divergence_window: Optional[int] = validation.count(
            "divergence_window", divergence_window, allow_none=True)
        self._watch: Optional[Watch] = (
            Watch(self.divergence_window) if self.divergence_window is not None and self.rule.name == "auto" else None
        )
        self._watches: dict[int, WatchState] = {}
        #: how the divergence warning is given (the callback gives it on rank zero only)
        self._warn_divergence: Callable[[str], None] = _warn_divergence
        self._states: dict[int, OptimizerState] = {}
        # key -> the optimizer whose state it holds (a restored or released state has none: the first
        # optimizer to step it adopts it)
        self._owners: dict[int, weakref.ref[Optimizer]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the optimizers its keys belong to (weak references): an unpickled clipper's
        states are adopted by the first optimizer that steps each key, as after :meth:`load_state_dict`."""
        state = self.__dict__.copy()
        state["_owners"] = {}
        state["_watches"] = {}  # the divergence watch starts afresh (it is not part of the state either)
        return state

    # ------------------------------------------------------------------ settings
    @property
    def mode(self) -> Mode:
        return self.rule.name  # type: ignore[return-value]

    @property
    def max_norm(self) -> Optional[float]:
        return self.rule.max_norm

    @property
    def l0(self) -> Optional[float]:
        return self.rule.l0

    @property
    def l1(self) -> Optional[float]:
        return self.rule.l1

    def settings(self) -> dict[str, Any]:
        """Every setting, as plain values (for a run's configuration)."""
        names = ("mode", "max_norm", "l0", "l1", "norm_type", "nonfinite", "foreach", "estimate", "estimate_every",
                 "snapshot", "snapshot_device", "initial_step", "fused_handoff", "divergence_window")
        return {**{k: getattr(self, k) for k in names}, "probe": self.probe_enabled}

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
        agree: Optional[Callable[[Tensor], Tensor]] = None,
        loss: Union[Tensor, float, None] = None,
    ) -> Optional[StepOutcome]:
        """Scale the gradients of ``optimizer`` in place; ``None`` if it has no gradient (and no ``is_shard``).

        Args:
            optimizer: its ``param_groups`` give the gradients (each group its own lr). A wrapper (Lightning's
                ``LightningOptimizer``, Fabric's optimizer) counts as the optimizer it wraps.
            key: which optimizer this is (one state per key). Each key belongs to the first optimizer that
                steps it: a clipper stepping several optimizers (a GAN's generator and discriminator) gives
                each its own key.
            process_group: FSDP1: the process group the shards are sharded over (see ``is_shard``).
            is_shard: FSDP1: parameters for which ``is_shard(param)`` is
                true hold local shards of tensors sharded over ``process_group``.
            nonfinite_handled: someone else (a GradScaler) skips non-finite steps: read
                nothing on the host and leave the gradients to it.
            step_label: shown in error messages (the global step).
            allow_handoff: with ``fused_handoff``, a fused optimizer may receive the scale instead of
                the gradients being scaled (pass False if something reads the gradients between
                this call and ``optimizer.step()``, e.g. Lightning's own ``gradient_clip_val``).
            agree: data parallel with whole (replicated) gradients: maps this rank's "the norm is
                finite" flag to every rank's (e.g. :func:`~lightning_l0l1.gradients.all_ranks_finite`),
                so that a gradient made non-finite on one rank only makes every rank treat the step as
                non-finite. Sharded gradients need none: their norm's all-reduce carries a NaN to every rank.
            loss: the training loss of this step (a one-element tensor, detached here, or a number), for
                ``auto``'s divergence watch (see ``divergence_window``): summed on the device, read on the host
                once per window. With gradient accumulation, the mean over the micro-batches. Other modes, and
                ``divergence_window=None``, ignore it. It changes no number of the step.

        Raises:
            ValueError: ``key`` belongs to another optimizer (still alive): the two would share one state;
                ``loss`` is not a one-element tensor or a number.
        """
        optimizer = handoff.unwrap(optimizer)
        if loss is not None and self._watch is not None:
            _check_loss(loss)
        self._claim(key, optimizer)
        grads = Gradients.collect(optimizer, process_group, is_shard)
        if grads is None:
            return None
        lrs = handoff.begin(optimizer, self, grads.all)
        norms = grads.norms(self.norm_type, self.foreach, keep_per_tensor=self.keep_param_norms)
        ctx = StepContext(optimizer, grads, norms, total_norm(norms, self.norm_type), self.norm_type, lrs)
        finite = torch.isfinite(ctx.norm)
        # every rank must take the same branch: `sharded` (FSDP1) is the same on all of them, while a rank
        # holding no shard of this optimizer's gradients would look "whole" on its own
        if agree is not None and not grads.sharded and grads.whole:
            finite = agree(finite)
            ctx.norm = torch.where(finite, ctx.norm, math.nan)  # every rank then sees the step as non-finite
        hands_off = self._hands_off(ctx, allow_handoff, nonfinite_handled)
        read_host = self.nonfinite != "propagate" and not nonfinite_handled and not hands_off
        flag = _HostFlag(finite) if read_host else None

        state = self._prepare(key, ctx)
        self._measure(state, ctx)
        scales, threshold = self.rule.scales(state.rule, ctx)
        per_group, scaled_norm = self._apply(ctx, scales, hands_off, finite)
        if ctx.lr_factors is not None:
            handoff.scale_lrs(optimizer, self, ctx.lr_factors)
        record = self._record(state, ctx, per_group, scaled_norm, threshold, finite)
        if loss is not None and self._watch is not None:
            self._watch_loss(key, state, loss, record)

        outcome = StepOutcome(norm=ctx.norm, finite=None, record=record, param_norms=grads.param_norms)
        if flag is not None:
            outcome.finite = flag.get()
            if not outcome.finite:
                self._apply_nonfinite(ctx, step_label, outcome)
        return outcome

    def _claim(self, key: int, optimizer: Optimizer) -> None:
        """Make ``key`` ``optimizer``'s (already unwrapped), or raise if it belongs to another one that is alive."""
        inner = optimizer
        owner = self._owners.get(key)
        held = None if owner is None else owner()
        if held is None:
            self._owners[key] = weakref.ref(inner)
        elif held is not inner:
            raise ValueError(
                f"`GradientClipper.step` got optimizer `{type(inner).__name__}` (id {id(inner):#x}) with `key={key}`, "
                f"whose state belongs to another optimizer, `{type(held).__name__}` (id {id(held):#x}): the two would "
                "share one step count and estimate. Pass a different `key=` for each optimizer (e.g. "
                "`clipper.step(opt_d, key=1)`), or use one clipper per optimizer. If the new optimizer replaces "
                "the old one, call `clipper.release(key)` first."
            )

    def release(self, key: Optional[int] = None) -> None:
        """Let the next optimizer that steps ``key`` (every key: ``None``) take its state over: for an
        optimizer rebuilt while the old one is still referenced (a new fit of the same model)."""
        if key is None:
            self._owners.clear()
        else:
            self._owners.pop(key, None)

    def _hands_off(self, ctx: StepContext, allow: bool, nonfinite_handled: bool) -> bool:
        """Whether the scale goes to a fused optimizer's kernel instead of into the gradients."""
        opt = ctx.optimizer
        return (
            allow and self.fused_handoff and not nonfinite_handled and self.nonfinite in ("skip", "propagate")
            and getattr(opt, "_step_supports_amp_scaling", False) and ctx.grads.whole
            and (not self.rule.per_group or len(opt.param_groups) == 1)
        )

    def _prepare(self, key: int, ctx: StepContext) -> OptimizerState:
        """This optimizer's state, on the gradients' device; the step count into ``ctx``."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = OptimizerState(Counters.zeros(ctx.norm.device), rule=self.rule.init())
        state.to(ctx.norm, ctx.grads.n_groups, self.rule)
        state.distributed = ctx.grads.distributed
        ctx.steps = state.counters.steps
        return state

    def _measure(self, state: OptimizerState, ctx: StepContext) -> None:
        """The rule's look at the step, then the estimator's measurement (of the raw gradients)."""
        self.rule.begin(state.rule, ctx)
        if self.estimator is not None:
            if state.estimator is None:
                state.estimator = self.estimator.init(ctx.norm.device)
            secant = self.estimator.observe(state.estimator, ctx.grads, ctx.norm, ctx.steps)
            if secant is not None:
                self.rule.observe(state.rule, secant)
        if state.estimator is not None:
            ctx.envelope = state.estimator.envelope

    def _apply(
        self, ctx: StepContext, scales: list[Tensor], hands_off: bool, finite: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Scale the gradients (or hand the scale off); each group's scale and the scaled global norm."""
        n_groups = ctx.grads.n_groups
        if hands_off:
            # The fused kernel divides the gradients by `grad_scale` as it reads them and skips the
            # whole step (parameters, moments, step count) where `found_inf` is nonzero: the same
            # update as scaling first, without the scaling pass or a host read.
            handoff.hand_off(ctx.optimizer, self, scales[0], finite if self.nonfinite == "skip" else None)
            return scales * n_groups, ctx.norm * scales[0]
        if len(scales) == 1:
            scale_grads_(ctx.grads.all(), scales[0], self.foreach)
            return scales * n_groups, ctx.norm * scales[0]
        for grp, s in zip(ctx.grads.groups, scales):
            scale_grads_(grp.tensors(), s, self.foreach)
        return scales, total_norm(ctx.norms * torch.stack(scales).to(ctx.norms.dtype), self.norm_type)

    def _record(
        self, state: OptimizerState, ctx: StepContext, per_group: Sequence[Tensor], scaled_norm: Tensor,
        threshold: Union[float, Tensor], finite: Tensor,
    ) -> StepRecord:
        """Count the step and keep its record (a non-finite step leaves the last finite one's)."""
        state.counters.steps += 1
        if ctx.lr_factors is None:
            lr_eff = [s * lr for s, lr in zip(per_group, ctx.lrs)]
        else:  # a rule that steers the learning rate: the optimizer divides the gradients' scale away
            lr_eff = [f * lr for f, lr in zip(ctx.lr_factors, ctx.lrs)]
        self.rule.end(state.rule, ctx, lr_eff, finite)
        assert state.last is not None
        record = StepRecord.of(
            grad_norm=ctx.norm, grad_norm_scaled=scaled_norm, scale=per_group[0],
            max_norm=threshold if isinstance(threshold, Tensor) else _full_like(ctx.norm, threshold),
            lr_effective=lr_eff, finite=finite, dtype=state.last.dtype,
        )
        state.last = torch.where(finite, record.values, state.last)
        state.counters.nonfinite.add_(~finite)
        state.counters.clipped.add_(record.clipped)
        return record

    def _watch_loss(self, key: int, state: OptimizerState, loss: Union[Tensor, float], record: StepRecord) -> None:
        """Add the step to the divergence watch of ``key``; warn once where its criterion is met."""
        assert self._watch is not None
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = self._watch.init()
        if watch.warned:
            return
        env = state.estimator.envelope if state.estimator is not None else None
        smoothness = env.last if env is not None else torch.full_like(record.grad_norm, math.nan)
        met = self._watch.update(watch, state.counters.steps, loss, record.lr_effective[0], smoothness,
                                 record.grad_norm)
        if met is not None:
            self._warn_divergence(message(met, key if len(self._states) > 1 else None))

    def _apply_nonfinite(self, ctx: StepContext, step_label: Any, outcome: StepOutcome) -> None:
        if self.nonfinite == "raise":
            where = f" at step {step_label}" if step_label is not None else ""
            raise NonFiniteGradientError(
                f"The global gradient norm is {float(outcome.norm)}{where}. Use `nonfinite='skip'` to "
                "skip such steps, or look for the source of the NaN/Inf (learning rate, loss scale, data)."
            )
        if self.nonfinite == "zero":
            for t in ctx.grads.all():
                t.zero_()
            outcome.action = "zeroed"
        else:  # skip
            for g in ctx.optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None
            outcome.action = "skipped"

    @torch.no_grad()
    def probe(
        self,
        key: int,
        gradient: Callable[[Sequence[Tensor]], Sequence[Optional[Tensor]]],
        reduce: Optional[Callable[[list[Tensor]], None]] = None,
    ) -> bool:
        r"""The smoothness pair of the step just taken, measured at its midpoint; call it after ``optimizer.step()``.

        With :math:`\theta_t, g_t` the parameters and (unscaled) gradient the last :meth:`step` saw and
        :math:`\theta_{t+1}` the parameters now, the parameters are moved to the midpoint
        :math:`\bar\theta = (\theta_t + \theta_{t+1})/2`, ``gradient(params)`` is called there (it
        must return the gradient of the *same* batch's loss with respect to ``params``, in order;
        ``None`` for an unused parameter), the parameters are restored bit for bit, and the pair

        .. math::

            \left(\mathrm{LM}(\lVert g_t\rVert, \lVert\bar g\rVert),\;
            \frac{\lVert\bar g - g_t\rVert}{\lVert\bar\theta - \theta_t\rVert}\right)

        enters the envelope. ``reduce`` averages the probe gradients over processes in place (data
        parallel), so that every rank forms the same pair.

        Returns:
            Whether a pair was formed (``False`` when this step took no snapshot: ``estimate_every``,
            no gradient, or no :meth:`step` since the last probe). A skipped step (no parameter moved)
            or a non-finite probe gradient gives a pair the envelope ignores.

        Raises:
            RuntimeError: for a clipper made without ``probe=True``.
        """
        state = self._states.get(key)
        if not self.probe_enabled or self.estimator is None:
            raise RuntimeError("`probe()` needs a clipper made with `probe=True`.")
        if state is None or state.estimator is None:
            return False
        secant = self.estimator.probe(state.estimator, state.counters.steps, gradient, reduce)
        if secant is None:
            return False
        self.rule.observe(state.rule, secant)
        return True

    # ------------------------------------------------------------------ reading state
    def device_counters(self, key: int) -> Optional[Tensor]:
        """Optimizer ``key``'s :data:`~lightning_l0l1.stats.COUNTER_FIELDS` as one device tensor (no sync).

        The estimator's entries are NaN when it is off. ``None`` before the first step.
        """
        st = self._states.get(key)
        if st is None or st.last is None:
            return None
        return stats.counter_vector(
            st.counters.nonfinite, None if st.estimator is None else st.estimator.folded(), st.last
        )

    def latest(self, prefix: str = "l0l1/") -> dict[str, float]:
        """The statistics of each optimizer's last finite step, as Python floats (syncs).

        With one optimizer the keys are ``{prefix}grad_norm`` etc.; with several, each
        key ends in ``_opt{i}``. The first param group's effective lr is
        ``lr_effective``, others ``lr_effective_pg{j}``.
        """
        shown = {
            k: st.state_dict(self.rule, with_buffers=False)
            for k, st in self._states.items() if st.counters.steps or st.restored
        }
        return stats.latest_metrics(prefix, shown, several=len(self._states) > 1)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """All state, for every optimizer: counters, last statistics and the estimates as plain
        Python values; with the estimator on, also the snapshot (CPU tensors: under 2% of the gradient
        bytes sampled, twice them full; one taken at a non-finite step without its gradients) so that a
        resumed run forms the same next secant pair as an uninterrupted one.
        Under sharded strategies only rank zero's state is saved by Lightning, so there the snapshot
        is left out: the first step after resuming then forms no pair.
        """
        return {
            "version": VERSION,
            "optimizers": {k: st.state_dict(self.rule, with_buffers=True) for k, st in self._states.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (this version or an earlier one); tensors move to the gradients'
        device at the next step.

        Raises:
            TypeError, ValueError: a field of the state is damaged (of the wrong type or shape, out of its
                range, NaN where none can be): the error names it by its path (``optimizers[0].delta``),
                and nothing is restored.
        """
        optimizers = check_clipper_state(state_dict)
        empty = self.estimator.new_snapshot if self.estimator is not None else None
        self._owners = {}  # the first optimizer to step a restored state adopts it
        self._watches = {}  # not part of the state: the divergence watch starts afresh
        self._states = {k: OptimizerState.from_state_dict(dict(sd), self.rule, empty) for k, sd in optimizers.items()}


def _warn_divergence(text: str) -> None:
    warnings.warn(f"`GradientClipper`: {text}", DivergenceWarning, stacklevel=5)


def _check_loss(loss: Any) -> None:
    """A one-element tensor or a real number (read nothing)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"`loss` must be the step's loss as a one-element tensor, got shape {tuple(loss.shape)}.")
    elif isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise ValueError(f"`loss` must be a one-element tensor or a number, got {type(loss).__name__}.")


def _snapshot_kind(snapshot: Any, probe: bool, snapshot_device: Optional[str]) -> SnapshotKind:
    """The snapshot in use: the one asked for, else ``"full"`` where only it can serve, else ``"sampled"``."""
    if snapshot is None:
        return "full" if probe or snapshot_device == "cpu" else "sampled"
    kind: SnapshotKind = validation.choice("snapshot", snapshot, get_args(SnapshotKind))  # type: ignore[assignment]
    if kind == "sampled" and probe:
        raise ValueError("`probe=True` moves the parameters back to the midpoint of the step, which needs the "
                         "whole previous parameters: use `snapshot='full'` (or None), got `snapshot='sampled'`.")
    if kind == "sampled" and snapshot_device == "cpu":
        raise ValueError("`snapshot_device='cpu'` offloads a full snapshot; a sampled one is under 2% of the "
                         "gradient bytes and stays on the device: got `snapshot='sampled'`. Use "
                         "`snapshot='full'` (or None) with `snapshot_device='cpu'`.")
    return kind


def _full_like(like: Tensor, value: float) -> Tensor:
    """A 0-d tensor of ``value`` in ``like``'s dtype; a value beyond that dtype's range is infinite there."""
    if math.isfinite(value) and abs(value) > torch.finfo(like.dtype).max:
        value = math.copysign(math.inf, value)
    return like.new_full((), value)
