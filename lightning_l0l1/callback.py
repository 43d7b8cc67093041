"""The Lightning callback: glue between a trainer's hooks and the clipper and publisher.

All tensor work is in :class:`~lightning_l0l1.clipper.GradientClipper`; publishing is in
:class:`~lightning_l0l1.publish.Publisher`. :class:`L0L1ClippingBase` finds the gradients Lightning
is about to step (the optimizer, the AMP scaler, the FSDP1 shard group), hands them over, and calls
the publisher at the trainer's logging points. It imports no Lightning namespace: the callback
class of each, ``lightning_l0l1.pytorch_lightning.L0L1Clipping`` and
``lightning_l0l1.lightning.L0L1Clipping``, adds that namespace's ``Callback`` as a base.
"""

from __future__ import annotations

import importlib.util
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Literal, Optional, TypeVar, Union, overload

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_l0l1 import validation
from lightning_l0l1.clipper import GradientClipper, NonFinite, SnapshotKind, StepOutcome
from lightning_l0l1.gradients import all_ranks_finite, average_over_ranks_
from lightning_l0l1.modes import Mode
from lightning_l0l1.publish import Interval, LayerBy, LayerGrouping, Publisher
from lightning_l0l1.stats import metric_name
from lightning_l0l1.watch import DEFAULT_WINDOW, DivergenceWarning

__all__ = ["L0L1ClippingBase"]

#: An interval whose gradient was scaled by less than this is reported (with ``layer_norms``) once per fit.
HARD_SCALE = 0.1

T = TypeVar("T")
#: A ``Trainer`` / ``LightningModule`` of either namespace (``pytorch_lightning`` or ``lightning.pytorch``).
Trainer = Any
LightningModule = Any


class _Setting(Generic[T]):
    """A read-only setting of the callback, kept by one of its parts (``clipper`` or ``publisher``)."""

    def __init__(self, part: str, attr: Optional[str] = None) -> None:
        self.part, self.attr = part, attr

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = self.attr or name

    @overload
    def __get__(self, obj: None, owner: Any = None) -> _Setting[T]: ...
    @overload
    def __get__(self, obj: object, owner: Any = None) -> T: ...
    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.attr)  # type: ignore[arg-type]


class L0L1ClippingBase:
    r"""Scale the global gradient on every optimizer step: "auto" (nothing to tune), clipping, adaptive, (L0,L1).

    With :math:`g` the gradient of all parameters the optimizer steps (global over
    every process), each rule multiplies it by a factor :math:`0 \le s \le 1`:

    .. math::

        \text{clip}: s = \min\left(1, \frac{\gamma}{\lVert g\rVert}\right) \quad
        \text{adaptive}: s = \frac{\gamma}{\lVert g\rVert + \gamma} \quad
        \text{l0l1}: s = \min\left(1, \frac{1}{\eta (L_0 + L_1 \lVert g\rVert)}\right)

    where :math:`\gamma` is ``max_norm`` and :math:`\eta` the learning rate of each
    param group. The ``l0l1`` step makes the effective learning rate
    :math:`\min(\eta, 1/(L_0 + L_1\lVert g\rVert))`, the step that minimises the
    descent-lemma bound of an :math:`(L_0,L_1)`-smooth loss.

    The callback works in ``on_before_optimizer_step``: once per optimizer step, after
    gradient accumulation, after the DDP all-reduce and AMP unscaling, before
    Lightning's own ``gradient_clip_val`` clipping. A closure-based optimizer (LBFGS) calls that
    hook at every closure evaluation: the fixed modes scale, and count, each evaluation's gradient;
    ``auto`` refuses LBFGS. The norm is global under DDP,
    FSDP1 (one all-reduce over the shard group) and FSDP2 / ``ModelParallelStrategy``
    (DTensor grads: one all-reduce), accumulated in float32 for half-precision grads.
    Nothing in the step reads a tensor on the host, except the single boolean the
    ``skip``/``zero``/``raise`` non-finite policies need (none with ``propagate``,
    none under an fp16 GradScaler, which skips overflow steps itself), and in ``auto`` the
    divergence watch's one read per ``divergence_window`` steps.

    Args:
        mode: "auto" (default): no threshold to tune. Hard clipping with a base step and a step length
            measured online: the effective learning rate is η_eff = min(η, 1/L_min, 2/(r·‖g‖)), with L_min
            the smallest smoothness measured so far and r the median of smoothness / gradient norm over
            the last 20 pairs (`lightning_l0l1.rules.auto_scale`). It sets a plain-SGD step, corrected
            under SGD with momentum by the measured ratio of the step taken to the step set (there the
            factor may fall at once but rise by at most (1 - momentum)/2 of itself per step); under
            Adam-type optimizers it clips the gradient that enters their moments and bounds the step
            length through the learning rate (`lightning_l0l1.rules.auto_adaptive_scale`). It keeps a
            sample of the previous step's gradients and parameters (`snapshot`: under 2% of the
            gradient bytes). "clip", "adaptive": the threshold `max_norm`; "l0l1": the constants `l0`, `l1`.
        max_norm: the threshold (gamma) of "clip" and "adaptive" (> 0, required there); "auto" refuses one
            (it sets its own), "l0l1" ignores it.
        l0: the constant L0 ≥ 0 of "l0l1".
        l1: the constant L1 ≥ 0 of "l0l1" (not both 0).
        norm_type: p of the p-norm (`float("inf")` or "inf" for the max-norm).
        nonfinite: what a NaN/Inf global norm does: "skip" (default) drops the step (gradients set
            to None, counted, warned once); "zero" zeroes the gradients; "raise" raises
            `lightning_l0l1.NonFiniteGradientError` naming the step; "propagate" checks nothing and
            costs nothing, like torch.
        foreach: use torch's `_foreach` kernels (None: where supported).
        estimate: run the smoothness estimator (None: on in "auto" only); in the fixed modes it only
            adds `l0l1/smoothness`, `l0l1/L0`, `l0l1/L1`, `l0l1/lr_suggested`. Costs the snapshot
            (`snapshot`) and a few percent of a clipping step.
        estimate_every: form a secant pair every K steps only, plus one at step 1 (cost divided by
            about K).
        probe_loss: the paper's noise-free measurement. `probe_loss(pl_module, batch)` returns the
            loss of `batch` (the step's own batch) as `training_step` computes it, without logging;
            after each estimated step the callback evaluates its gradient at the midpoint of the step
            and forms the secant pair from it, instead of from two different minibatches, whose
            noise biases the secant upwards. Costs one extra forward and backward pass per estimated
            step (`estimate_every` thins it). Implies `estimate=True`; automatic optimization,
            `accumulate_grad_batches=1` and unsharded gradients (single device, DDP) only.
        snapshot_device: "cpu" keeps a full snapshot in host memory.
        initial_step: "auto" only: the first update moves the parameters by at most
            `initial_step * max(‖θ‖, 1)`; the bound doubles every step. None (default): 1e-2, or 0.2
            for an optimizer that normalizes the gradient (Adam, AdamW, ...).
        fused_handoff: with a fused optimizer (`Adam(fused=True)` ...), no GradScaler and one scale
            for the optimizer, hand the scale and the skip verdict to the optimizer's kernel instead
            of scaling the gradients: no scaling pass, no host read (see the README).
        log_stats: aggregate the statistics on the device and publish them every `log_every_n_steps`
            optimizer steps through Lightning's own logging (`pl_module.log`): they are in
            `trainer.callback_metrics` for `EarlyStopping`, `ModelCheckpoint` and the progress bar,
            and in the loggers' rows at the same step as the module's own `self.log` values (plus W&B's
            table, histograms and summary). One device-to-host transfer per interval on each rank,
            none in between.
        log_every_n_steps: the logging interval in optimizer steps (None: the trainer's; where that is
            0, the trainer's logging is off, and no interval is logged). Another
            value than the trainer's writes the rows to the loggers directly, at the step Lightning
            gives that batch, in rows of their own.
        prefix: the metric-name prefix (also of the keys of `latest()`).
        prog_bar: show `grad_norm` and `scale` in the progress bar. This reads both values
            on the host **every step** (a sync): off by default.
        wandb_table_every: refresh the W&B smoothness table (the paper's Figure 1) at most every
            this many logging intervals (and at most every 30 s).
        sync_nonfinite: agree on the non-finite verdict across data-parallel ranks (DDP): one
            1-element all-reduce per step, so that a gradient made non-finite on one rank only (by a
            hook after DDP's all-reduce) skips the step on every rank instead of on that rank alone,
            which would leave the replicas different. None (default): on under more than one
            process with "skip", "zero" or "raise", off with "propagate" (which reads and
            communicates nothing) and under an fp16 GradScaler (which skips overflow steps itself).
            Sharded gradients (FSDP) need no extra collective: their norm's all-reduce carries a
            NaN to every rank.
        snapshot: what the estimator keeps of the previous step: "sampled" (one block of 64
            elements in 128 of every large tensor, under 2% of the gradient bytes; the norms of the
            differences are estimated) or "full" (every gradient and parameter: two gradient-sized
            buffers, the exact differences). None: "full" with `probe_loss` or
            `snapshot_device="cpu"`, else "sampled".
        layer_norms: also publish per-layer gradient norms (before scaling): "module", one norm per
            module (`net.0` for `net.0.weight` and `net.0.bias`), or "parameter", one per parameter;
            None (default): off. They are the per-tensor norms the global norm is already formed
            from, combined per layer and averaged over the interval on the device, published with
            the other statistics as `l0l1/layer_grad_norm/<layer>` (mean) and
            `l0l1/layer_grad_norm_max/<layer>`, and in W&B as a histogram and a table: a replacement
            for `lightning.pytorch.utilities.grad_norm` that reads nothing on the host per step.
            The warning of a non-finite step names the layers whose norm is not finite; an interval
            whose gradient was scaled by less than 0.1 is reported once, naming the largest layers.
            Off by default: it adds two metrics per layer to every logger's rows. Whole gradients
            (single device, DDP) and DTensors (FSDP2); FSDP1's flat shards have no per-layer norm.
        divergence_window: "auto" only: the window, in optimizer steps, of the divergence watch
            (`lightning_l0l1.watch`). The callback takes the training loss from `on_before_backward`
            (automatic and manual optimization; with `accumulate_grad_batches` the mean of the step's
            micro-batch losses as `training_step` returned them, unscaled under an fp16 GradScaler) and
            hands it to the optimizer that steps next; where its window mean stays above twice its
            lowest window mean for 3 windows in a row while "auto" keeps its effective learning rate,
            one `lightning_l0l1.watch.DivergenceWarning` (on rank zero, once per optimizer) names the
            losses, learning rates and estimates it saw, and what to change. One host read per window,
            a window late. None: off. Not checkpointed: after a resume the watch starts afresh.

    Raises:
        ValueError: at construction, for any invalid argument (named, with its value).
        RuntimeError: at `setup` under DeepSpeed, which clips inside its own engine, or for a subclass
            of the other Lightning namespace's class than the Trainer's.

    Example:
        >>> from lightning_l0l1 import L0L1Clipping
        >>> import lightning.pytorch as pl  # or: import pytorch_lightning as pl  # doctest: +SKIP
        >>> from lightning_l0l1 import L0L1Clipping  # the class of the namespace in use  # doctest: +SKIP
        >>> trainer = Trainer(callbacks=[L0L1Clipping()])  # auto: nothing to tune  # doctest: +SKIP
        >>> trainer = Trainer(callbacks=[L0L1Clipping(mode="clip", max_norm=1.0)])  # doctest: +SKIP

    References:
        Zhang, He, Sra, Jadbabaie, ICLR 2020. https://arxiv.org/abs/1905.11881
    """

    mode = _Setting[Mode]("clipper")
    max_norm = _Setting[Optional[float]]("clipper")
    l0 = _Setting[Optional[float]]("clipper")
    l1 = _Setting[Optional[float]]("clipper")
    norm_type = _Setting[float]("clipper")
    nonfinite = _Setting[NonFinite]("clipper")
    foreach = _Setting[Optional[bool]]("clipper")
    estimate = _Setting[bool]("clipper")
    estimate_every = _Setting[int]("clipper")
    snapshot = _Setting[SnapshotKind]("clipper")
    snapshot_device = _Setting[Optional[Literal["cpu"]]]("clipper")
    initial_step = _Setting[Optional[float]]("clipper")
    fused_handoff = _Setting[bool]("clipper")
    divergence_window = _Setting[Optional[int]]("clipper")
    prefix = _Setting[str]("publisher")
    log_every_n_steps = _Setting[Optional[int]]("publisher", "every")
    wandb_table_every = _Setting[int]("publisher", "table_every")

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
        probe_loss: Optional[Callable[[LightningModule, Any], Tensor]] = None,
        snapshot_device: Optional[Literal["cpu"]] = None,
        initial_step: Optional[float] = None,
        fused_handoff: bool = True,
        log_stats: bool = True,
        log_every_n_steps: Optional[int] = None,
        prefix: str = "l0l1/",
        prog_bar: bool = False,
        wandb_table_every: int = 10,
        sync_nonfinite: Optional[bool] = None,
        snapshot: Optional[SnapshotKind] = None,
        layer_norms: Optional[LayerBy] = None,
        divergence_window: Optional[int] = DEFAULT_WINDOW,
    ) -> None:
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if probe_loss is not None and not callable(probe_loss):
            raise ValueError(f"`probe_loss` must be a callable (pl_module, batch) -> loss tensor, got {probe_loss!r}.")
        if probe_loss is not None and estimate is False:
            raise ValueError(
                "`probe_loss` measures the smoothness for the estimator: it cannot go with `estimate=False`."
            )
        self.probe_loss = probe_loss
        self.clipper = GradientClipper(
            mode=mode, max_norm=max_norm, l0=l0, l1=l1, norm_type=norm_type, nonfinite=nonfinite, foreach=foreach,
            estimate=True if probe_loss is not None else estimate, estimate_every=estimate_every,
            snapshot_device=snapshot_device, initial_step=initial_step, fused_handoff=fused_handoff,
            probe=probe_loss is not None, snapshot=snapshot, divergence_window=divergence_window,
        )
        self.clipper._warn_divergence = _warn_divergence
        self.log_stats: bool = validation.flag("log_stats", log_stats)  # type: ignore[assignment]
        every = validation.count("log_every_n_steps", log_every_n_steps, allow_none=True)
        prefix = validation.text("prefix", prefix)
        self.prog_bar: bool = validation.flag("prog_bar", prog_bar)  # type: ignore[assignment]
        table_every: int = validation.count("wandb_table_every", wandb_table_every)  # type: ignore[assignment]
        self.publisher = Publisher(prefix, every, table_every, self.clipper.settings())
        self.sync_nonfinite = validation.flag("sync_nonfinite", sync_nonfinite, allow_none=True)
        self.layer_norms: Optional[LayerBy] = (
            None if layer_norms is None
            else validation.choice("layer_norms", layer_norms, ("module", "parameter"))  # type: ignore[assignment]
        )
        self.clipper.keep_param_norms = self.layer_norms is not None and self.log_stats
        if wandb_table_every != 10 and importlib.util.find_spec("wandb") is None:
            rank_zero_warn(
                f"`L0L1Clipping(wandb_table_every={wandb_table_every})` only affects W&B, and `wandb` is not "
                "installed: the setting has no effect. `pip install wandb` (or the `wandb` extra) to use it."
            )
        defaults = _init_defaults()
        #: the arguments given that differ from the defaults (the repr shows them)
        self._given = {k: v for k, v in given.items() if k == "mode" or (v is not defaults[k] and v != defaults[k])}
        self._warned_nonfinite = False
        self._warned_hard = False
        self._lightning_names: set[str] = set()  # the metrics handed to pl_module.log this fit
        self._last_metrics: dict[str, float] = {}
        self._fsdp1: Optional[tuple[Any]] = None  # (process_group,) under FSDP1, else None (checked once per fit)
        self._fsdp1_checked = False
        self._trainer_ref: Optional[weakref.ref[Any]] = None  # the trainer of the fit set up last
        # the losses handed to backward since the last optimizer step (for the divergence watch)
        self._loss_sum: Optional[Tensor] = None
        self._loss_count = 0

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(v, '__qualname__', None) or repr(v)}" if k == "probe_loss" else f"{k}={v!r}"
                          for k, v in self._given.items())
        return f"{type(self).__name__}({shown})"

    if TYPE_CHECKING:  # provided by the namespace's ``Callback`` base

        def _generate_state_key(self, **kwargs: Any) -> str: ...

    @property
    def state_key(self) -> str:
        key = self._own_state_key()
        # While a checkpoint is restored, a state saved under the earlier key (see `_legacy_state_key`) is
        # this callback's: answering with that key lets Lightning match it to this callback, instead of
        # warning that the checkpoint's callback is missing (it loads it through the legacy key either way).
        saved = self._checkpoint_being_restored()
        if saved is not None and key not in saved:
            legacy = self._legacy_state_key
            if isinstance(legacy, str) and legacy in saved:
                return legacy
        return key

    def _own_state_key(self) -> str:
        # `prefix` and `nonfinite` enter the key only where they are not the default, so that two
        # instances differing in them can share a Trainer while checkpoints of default ones keep their key.
        extra = {k: v for k, v in (("prefix", self.prefix), ("nonfinite", self.nonfinite))
                 if v != {"prefix": "l0l1/", "nonfinite": "skip"}[k]}
        return self._generate_state_key(**self._base_key(), **extra)

    def _checkpoint_being_restored(self) -> Optional[dict[Any, Any]]:
        """The callback states of the checkpoint the trainer is restoring now (``None`` at any other time)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        callbacks = loaded.get("callbacks") if isinstance(loaded, dict) else None
        return callbacks if isinstance(callbacks, dict) else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer_ref"] = None  # a weak reference does not pickle (and the trainer is set up anew)
        return state

    def _base_key(self) -> dict[str, Any]:
        return dict(mode=self.mode, max_norm=self.max_norm, l0=self.l0, l1=self.l1, norm_type=self.norm_type,
                    estimate=self.estimate)

    @property
    def _legacy_state_key(self) -> Any:
        # Lightning looks this key up when `state_key` is not in a checkpoint. A callback with a
        # non-default `prefix` or `nonfinite` was saved under the key without them before they entered
        # it. Before `auto` became the default it could not refuse `max_norm`, and kept the then default
        # `max_norm=1.0` in its state key: those checkpoints resume too (their estimator state loads as it is).
        base = self._generate_state_key(**self._base_key())
        if base != self._own_state_key():
            return base
        if self.mode == "auto":
            return self._generate_state_key(
                mode="auto", max_norm=1.0, l0=None, l1=None, norm_type=self.norm_type, estimate=True
            )
        return type(self)  # Lightning's own default

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._match_namespace(trainer)
        strategy = trainer.strategy
        if "deepspeed" in type(strategy).__name__.lower():
            raise RuntimeError(
                "`L0L1Clipping` cannot run under DeepSpeed: its engine reduces, partitions and steps the "
                "gradients itself, so they are never visible whole to a callback. Use DeepSpeed's own "
                "`gradient_clipping` setting (e.g. `DeepSpeedStrategy(config={'gradient_clipping': 1.0, ...})`) "
                "and remove `L0L1Clipping` from the callbacks."
            )
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"`L0L1Clipping` and `Trainer(gradient_clip_val={trainer.gradient_clip_val})` are both set: "
                "the gradients will be clipped twice (first by L0L1Clipping, then by Lightning). "
                "Remove `gradient_clip_val` from the Trainer to clip once."
            )
        if self.probe_loss is not None:
            _check_probe_setup(trainer, pl_module)
        self._fsdp1_checked = False
        self.publisher.reset()  # this trainer's loggers and W&B run, not those of an earlier fit
        self.clipper.release()  # this fit's optimizers take the states over from an earlier fit's
        try:
            self._trainer_ref = weakref.ref(trainer)
        except TypeError:  # a stand-in trainer (tests, tools) that takes no weak reference: never restoring
            self._trainer_ref = None
        self._lightning_names, self._last_metrics, self._warned_hard = set(), {}, False
        self._loss_sum, self._loss_count = None, 0
        if self.layer_norms is not None:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            self.publisher.layers = LayerGrouping(names, self.layer_norms, self.norm_type)

    def _match_namespace(self, trainer: Trainer) -> None:
        """Resolve the class from the Trainer: a callback of the other Lightning namespace becomes this one's.

        ``lightning_l0l1.L0L1Clipping`` is resolved when it is first used, from the namespaces imported
        so far; imported before ``lightning.pytorch`` (with ``pytorch_lightning`` installed too) it is
        ``pytorch_lightning``'s. At ``setup`` the instance takes the class of the Trainer's namespace
        (the two differ in their ``Callback`` base only), with one warning saying what to import. A
        subclass of the other namespace's class cannot be converted: that raises.
        """
        want, have = _namespace_of(type(trainer), "Trainer"), _namespace_of(type(self), "Callback")
        if want is None or have is None or want == have:
            return
        import importlib

        target = importlib.import_module(f"lightning_l0l1.{want}").L0L1Clipping
        source = importlib.import_module(f"lightning_l0l1.{have}").L0L1Clipping
        fix = (f"`from lightning_l0l1.{want} import L0L1Clipping`, or import "
               f"`{_PACKAGES[want]}` before using `lightning_l0l1.L0L1Clipping`")
        if type(self) is not source:
            raise RuntimeError(
                f"`{type(self).__name__}` is a `{_PACKAGES[have]}` callback, but the Trainer is a "
                f"`{_PACKAGES[want]}` Trainer: derive it from the `{_PACKAGES[want]}` class instead: {fix}."
            )
        self.__class__ = target
        rank_zero_warn(
            f"`L0L1Clipping` was created as a `{_PACKAGES[have]}` callback (`lightning_l0l1.L0L1Clipping` is "
            f"resolved from the Lightning namespaces imported when it is first used), but the Trainer is a "
            f"`{_PACKAGES[want]}` Trainer: it now runs as `lightning_l0l1.{want}.L0L1Clipping`. To create it "
            f"as one: {fix}."
        )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Keep the loss for the divergence watch (``auto``): summed on the device, no host read."""
        if self.clipper._watch is None or not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        value = loss.detach().reshape(()).float()
        scale = getattr(getattr(trainer.precision_plugin, "scaler", None), "_scale", None)
        if isinstance(scale, Tensor):  # an fp16 GradScaler hands the hook the scaled loss
            value = value / scale.to(value.device)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def _step_loss(self, pl_module: LightningModule, trainer: Trainer) -> Optional[Tensor]:
        """The mean loss of the micro-batches since the last optimizer step, as ``training_step`` returned it.

        Under automatic optimization Lightning divides each loss by ``accumulate_grad_batches`` before
        ``backward``, so the losses are multiplied back (exact for a short last accumulation too).
        """
        total, n = self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        if total is None:
            return None
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        factor = accumulate if getattr(pl_module, "automatic_optimization", True) else 1
        return total * (factor / n) if factor != n else total

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        key = _optimizer_index(trainer, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            _unscale_if_fused(scaler, optimizer)
        process_group, is_shard = self._sharding(trainer)
        outcome = self.clipper.step(
            optimizer,
            key,
            process_group=process_group,
            is_shard=is_shard,
            nonfinite_handled=scaler is not None,
            step_label=trainer.global_step,
            allow_handoff=not trainer.gradient_clip_val,
            agree=self._agreement(trainer, scaler),
            loss=self._step_loss(pl_module, trainer),
        )
        if outcome is None or outcome.record is None:
            return
        if self.log_stats:
            self.publisher.add(key, outcome.record, outcome.param_norms)
        if self.prog_bar:
            norm_name, scale_name = self.publisher.progress_names(key, several=len(trainer.optimizers) > 1)
            pl_module.log(norm_name, outcome.norm, prog_bar=True, logger=False, on_step=True)
            pl_module.log(scale_name, outcome.record.scale, prog_bar=True, logger=False, on_step=True)
        if outcome.finite is False:
            self._warn_nonfinite(trainer, outcome)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Per-step norms for the per-epoch W&B histogram are kept only where one will be drawn.
        self.publisher.keep_norms = (
            self.log_stats and trainer.is_global_zero and self.publisher.sinks(trainer.loggers)[1] is not None
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.probe_loss is not None:
            self._probe(trainer, pl_module, batch)
        if self.log_stats and self.publisher.due(getattr(trainer, "log_every_n_steps", None)):
            self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.publisher.epoch_end(
            _log_step(trainer), trainer.current_epoch, self.log_stats and trainer.is_global_zero, trainer.loggers
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.log_stats:
            return
        due = self.publisher.pending and self.publisher.interval(getattr(trainer, "log_every_n_steps", None))
        last = self._flush(trainer, None) if due else None
        if trainer.is_global_zero:
            last_metrics = last.metrics if last is not None and last.metrics else self._last_metrics
            self.publisher.finish(max(_log_step(trainer) - 1, 0), trainer.loggers, self.latest, last_metrics)

    def _through_lightning(self, trainer: Trainer) -> bool:
        """The interval coincides with the trainer's logging steps: the rows go through ``pl_module.log``."""
        trainer_every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
        return bool(trainer.loggers) and trainer_every > 0 and self.publisher.every in (None, trainer_every)

    def _flush(self, trainer: Trainer, pl_module: Optional[LightningModule]) -> Interval:
        """Publish the interval: one device-to-host transfer on every rank, no collective.

        Inside ``on_train_batch_end`` (``pl_module`` given) the metrics are handed to
        ``pl_module.log`` as CPU tensors (nothing more is read from the device), so that
        ``trainer.callback_metrics``, ``EarlyStopping``, ``ModelCheckpoint`` and the progress bar see
        them, and where the interval is the trainer's ``log_every_n_steps`` Lightning writes them in
        the same row, at the same step, as the module's own ``self.log`` values. Otherwise (another
        interval, the last partial interval at the end of training) rank zero writes them to the
        loggers itself, at the step Lightning would give them.
        """
        interval = self.publisher.collect(self.clipper.device_counters, self.clipper.estimate)
        through = pl_module is not None and self._through_lightning(trainer)
        if pl_module is not None:
            self._log_to_lightning(trainer, pl_module, interval.metrics, logger=through)
        if interval.metrics:
            self._last_metrics = interval.metrics
        step = _log_step(trainer) - (1 if pl_module is None else 0)
        if trainer.is_global_zero:
            self.publisher.publish(interval, max(step, 0), trainer.loggers, not through, self.clipper.estimate)
        self._warn_hard(interval, max(step, 0))
        return interval

    def _log_to_lightning(
        self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float], logger: bool
    ) -> None:
        """``pl_module.log`` every metric of the interval; metrics not defined this interval are withdrawn
        from Lightning's step results (else Lightning would write their last value again)."""
        fx = getattr(pl_module, "_current_fx_name", None) or "on_train_batch_end"
        results = getattr(trainer, "_results", None)
        for name in self._lightning_names.difference(metrics):
            item = results.get(f"{fx}.{name}") if results is not None else None
            if item is not None and hasattr(item, "reset"):
                item.reset()
        for name, value in metrics.items():
            # a CPU tensor: Lightning's own conversions then read nothing from the device
            pl_module.log(name, torch.tensor(value, dtype=torch.float64), on_step=True, on_epoch=False,
                          prog_bar=False, logger=logger, batch_size=1)
        self._lightning_names.update(metrics)

    def _warn_nonfinite(self, trainer: Trainer, outcome: StepOutcome) -> None:
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            layers = ""
            if self.publisher.last_layer_norms:  # read once, in this one warning
                names, norms = self.publisher.last_layer_norms[self.publisher.last_layer_key]
                bad = [n for n, v in zip(names, norms.tolist()) if not math.isfinite(v)]
                if bad:
                    layers = f" Layers with a non-finite gradient norm: {', '.join(bad[:10])}" + (
                        f" and {len(bad) - 10} more." if len(bad) > 10 else ".")
            rank_zero_warn(
                f"`L0L1Clipping`: the global gradient norm is not finite at step {trainer.global_step}; "
                f"the step's gradients were {outcome.action} (`nonfinite={self.nonfinite!r}`).{layers} "
                f"Further non-finite steps are counted in `{metric_name(self.prefix, 'nonfinite_steps')}` "
                "without a warning."
            )

    def _warn_hard(self, interval: Interval, step: int) -> None:
        """Once per fit: an interval whose gradient was scaled by less than :data:`HARD_SCALE`, naming the
        layers with the largest norms at that step (from the interval's transfer: no extra read)."""
        if self._warned_hard:
            return
        for key, (names, _, _, worst, scale) in sorted(interval.layers.items()):
            if scale < HARD_SCALE:
                self._warned_hard = True
                top = sorted(zip(worst, names), reverse=True)[:3]
                total = math.fsum(v * v for v in worst if math.isfinite(v)) or 1.0
                share = self.norm_type == 2.0  # the layers' squared norms add up to the squared global norm
                listed = ", ".join(f"{n} ({v:.4g}" + (f", {100 * v * v / total:.2g}% of the squared norm)" if share
                                                      else ")") for v, n in top)
                which = f" of optimizer {key}" if len(interval.layers) > 1 else ""
                rank_zero_warn(
                    f"`L0L1Clipping`: the gradient{which} was scaled by {scale:.3g} (less than {HARD_SCALE}) on a "
                    f"step of the logging interval logged at step {step}. The largest layer gradient "
                    f"norms at that step: {listed}. This warning is shown once per fit."
                )
                return

    def _probe(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """The gradient of this step's batch at the step's midpoint, averaged over data-parallel ranks."""
        probe_loss = self.probe_loss
        assert probe_loss is not None

        def gradient(params: Any) -> Any:
            with trainer.precision_plugin.forward_context():
                loss = probe_loss(pl_module, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
                raise TypeError(f"`probe_loss` must return the loss as a one-element tensor, got {got}.")
            return torch.autograd.grad(loss.float().reshape(()), params, allow_unused=True)

        distributed = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        self.clipper.probe(0, gradient, average_over_ranks_ if distributed else None)

    # ------------------------------------------------------------------ results and state
    def latest(self) -> dict[str, float]:
        r"""Statistics of the last optimizer step (reads the device: never call it per step).

        Keys (with the default ``prefix``): ``l0l1/grad_norm`` (before scaling), ``l0l1/grad_norm_scaled``,
        ``l0l1/scale``, ``l0l1/max_norm`` (the norm threshold in use: ``max_norm``,
        or :math:`(1/\eta - L_0)/L_1` for ``l0l1``), ``l0l1/lr_effective`` (lr x scale of the
        first param group, ``_pg{j}`` for the others), ``l0l1/steps``,
        ``l0l1/nonfinite_steps``, ``l0l1/clip_rate``; with the estimator, ``l0l1/smoothness``,
        ``l0l1/L0``, ``l0l1/L1``, ``l0l1/lr_suggested``, ``l0l1/smoothness_pairs``. With several
        optimizers every key ends in ``_opt{i}``. A non-finite step leaves the values of the last finite one.
        """
        return self.clipper.latest(self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"clipper": self.clipper.state_dict(), "warned_nonfinite": self._warned_nonfinite,
                "interval": self.publisher.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state_dict.get("clipper", {}))
        self._warned_nonfinite = bool(state_dict.get("warned_nonfinite", False))
        self.publisher.load_state_dict(state_dict.get("interval") or {})  # absent in older checkpoints

    # ------------------------------------------------------------------ helpers
    def _agreement(self, trainer: Trainer, scaler: Any) -> Optional[Callable[[Tensor], Tensor]]:
        """The cross-rank verdict on non-finite gradients, where ranks could otherwise disagree."""
        wanted = self.nonfinite != "propagate" if self.sync_nonfinite is None else self.sync_nonfinite
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not wanted or scaler is not None or not distributed or torch.distributed.get_world_size() < 2:
            return None
        return all_ranks_finite

    def _sharding(self, trainer: Trainer) -> tuple[Any, Any]:
        """FSDP1: the shard process group and a predicate for sharded params (detected once)."""
        if not self._fsdp1_checked:
            self._fsdp1_checked = True
            self._fsdp1 = _find_fsdp1_group(trainer.strategy.model if trainer.strategy else None)
        if self._fsdp1 is None:
            return None, None
        return self._fsdp1[0], _is_fsdp_flattened


def _warn_divergence(text: str) -> None:
    rank_zero_warn(f"`L0L1Clipping`: {text}", category=DivergenceWarning)


def _check_probe_setup(trainer: Trainer, pl_module: LightningModule) -> None:
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            "`L0L1Clipping(probe_loss=...)` needs automatic optimization (it probes the batch of the "
            "step Lightning just took); with manual optimization call `GradientClipper.probe` yourself."
        )
    if trainer.accumulate_grad_batches != 1:
        raise RuntimeError(
            "`L0L1Clipping(probe_loss=...)` needs `accumulate_grad_batches=1`, got "
            f"{trainer.accumulate_grad_batches}: the step's gradient is summed over several batches, "
            "the probe would see only the last one."
        )


_PACKAGES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


def _init_defaults() -> dict[str, Any]:
    import inspect

    params = inspect.signature(L0L1ClippingBase.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


# Users meet the class as `L0L1Clipping` (the per-namespace subclasses add only the `Callback` base): a
# misspelt or extra argument is reported as `L0L1Clipping.__init__() got an unexpected keyword argument ...`.
L0L1ClippingBase.__init__.__qualname__ = "L0L1Clipping.__init__"
if hasattr(L0L1ClippingBase.__init__.__code__, "co_qualname"):  # Python >= 3.11 names the code object's
    L0L1ClippingBase.__init__.__code__ = L0L1ClippingBase.__init__.__code__.replace(
        co_qualname="L0L1Clipping.__init__")  # type: ignore[call-arg,unused-ignore]  # 3.11+ in the stubs


def _namespace_of(cls: type, base: str) -> Optional[str]:
    """``"lightning"`` or ``"pytorch_lightning"``: the package of the class named ``base`` in ``cls``'s MRO."""
    for c in cls.__mro__:
        if c.__name__ == base:
            module = c.__module__
            if module.startswith("lightning.pytorch."):
                return "lightning"
            if module.startswith("pytorch_lightning."):
                return "pytorch_lightning"
    return None


def _log_step(trainer: Trainer) -> int:
    """The step Lightning labels the current batch's logged rows with (its stepped batches so far)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    n = getattr(loop, "_batches_that_stepped", None)
    return int(n) if isinstance(n, int) else max(int(trainer.global_step) - 1, 0)


def _optimizer_index(trainer: Trainer, optimizer: Optimizer) -> int:
    for i, opt in enumerate(trainer.optimizers):
        if opt is optimizer or getattr(opt, "_optimizer", None) is optimizer:
            return i
    return 0


def _unscale_if_fused(scaler: Any, optimizer: Optimizer) -> None:
    """Fused optimizers unscale inside ``step()``, so Lightning leaves their grads scaled.

    Unscale them here instead: the scaler then records the optimizer as unscaled, passes
    ``grad_scale=None`` and its ``found_inf`` to the fused kernel, which skips an overflow
    step in-kernel. The norm the callback computes is of the true, unscaled gradients.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", None)
    stage = states[id(optimizer)]["stage"] if states is not None else OptState.READY
    if stage is OptState.READY:
        scaler.unscale_(optimizer)


def _find_fsdp1_group(model: Any) -> Optional[tuple[Any]]:
    if model is None:
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    except ImportError:  # pragma: no cover
        return None
    for m in model.modules():
        # NO_SHARD units hold whole, already all-reduced gradients: nothing to sum over the group.
        if isinstance(m, FullyShardedDataParallel) and m.sharding_strategy != ShardingStrategy.NO_SHARD:
            return (m.process_group,)
    return None


def _is_fsdp_flattened(param: Tensor) -> bool:
    return bool(getattr(param, "_fsdp_flattened", False))


def __getattr__(name: str) -> Any:
    # `lightning_l0l1.callback.L0L1Clipping`: the class of the namespace in use, as `lightning_l0l1.L0L1Clipping`
    if name == "L0L1Clipping":
        import lightning_l0l1

        return lightning_l0l1.L0L1Clipping
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
