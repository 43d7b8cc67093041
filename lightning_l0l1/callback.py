"""The Lightning callback: argument checks, hooks, strategy detection, checkpoint state.

All tensor work is in :class:`~lightning_l0l1.clipper.GradientClipper`; this module
only finds the gradients Lightning is about to step and hands them over.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_l0l1.clipper import GradientClipper, Mode, NonFinite, _count, _flag
from lightning_l0l1.stats import LoggerSink, StepStatistics, WandbSink, stat_names

__all__ = ["L0L1Clipping"]


class L0L1Clipping(Callback):
    r"""Scale the global gradient on every optimizer step: ``auto`` (nothing to tune), clipping, adaptive, (L0,L1).

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
    Lightning's own ``gradient_clip_val`` clipping. The norm is global under DDP,
    FSDP1 (one all-reduce over the shard group) and FSDP2 / ``ModelParallelStrategy``
    (DTensor grads: one all-reduce), accumulated in float32 for half-precision grads.
    Nothing in the step reads a tensor on the host, except the single boolean the
    ``skip``/``zero``/``raise`` non-finite policies need (none with ``propagate``,
    none under an fp16 GradScaler, which skips overflow steps itself).

    Args:
        mode: ``"auto"`` (default): no threshold to tune. Hard clipping with a base step and a step
            length measured online: :math:`\eta_\text{eff} = \min(\eta, 1/\underline L, 2/(\tilde r\lVert g\rVert))`,
            with :math:`\underline L` the smallest smoothness measured so far and :math:`\tilde r` the
            median of smoothness / gradient norm over the last 20 pairs
            (:func:`lightning_l0l1.rules.auto_scale`). On the README's minibatch benchmark (a character
            LSTM at SGD lr 20) it is 1.0% above the best hand-tuned threshold over twelve seeds, and
            within 0.5-3% of the best threshold at learning rates 5 to 100, where the best threshold
            moves by 25x. It sets a plain-SGD step, corrected under SGD with momentum by the measured
            ratio of the step taken to the step set; Adam-type optimizers (warned) divide its scaling
            away (README, "Which optimizers"). It holds a snapshot of the gradients and
            parameters: two gradient-sized buffers (``snapshot_device="cpu"`` keeps them in host memory).
            ``"clip"``, ``"adaptive"``: the threshold ``max_norm``; ``"l0l1"``: the constants ``l0``, ``l1``.
        max_norm: the threshold :math:`\gamma` of ``clip`` and ``adaptive`` (> 0, required there);
            ``auto`` refuses one (it sets its own), ``l0l1`` ignores it.
        l0: :math:`L_0 \ge 0` for ``l0l1``.
        l1: :math:`L_1 \ge 0` for ``l0l1`` (not both 0).
        norm_type: p of the p-norm (``float("inf")`` or ``"inf"`` for the max-norm).
        nonfinite: a NaN/Inf global norm: ``"skip"`` (default) drops the step (grads
            set to ``None``, counted, warned once); ``"zero"`` zeroes the gradients;
            ``"raise"`` raises :class:`~lightning_l0l1.NonFiniteGradientError` with the
            step; ``"propagate"`` checks nothing, costs nothing, like torch.
        foreach: use torch's ``_foreach`` kernels (``None``: where supported).
        estimate: run the smoothness estimator (``None``: on in ``auto`` only); in the fixed modes
            it only adds ``l0l1/smoothness``, ``l0l1/L0``, ``l0l1/L1``, ``l0l1/lr_suggested``.
            Costs two gradient-sized buffers and, per step, one extra pass over gradients and
            parameters.
        estimate_every: form a secant pair every K steps only, plus one at step 1 (cost divided by
            about K).
        probe_loss: the paper's noise-free measurement. ``probe_loss(pl_module, batch)`` returns the
            loss of ``batch`` (the step's own batch) as ``training_step`` computes it, without logging;
            after each estimated step the callback evaluates its gradient at the midpoint of the step
            and forms the secant pair from it, instead of from two different minibatches, whose
            noise biases the secant upwards. Costs one extra forward and backward pass per estimated
            step (``estimate_every`` thins it). Implies ``estimate=True``; automatic optimization,
            ``accumulate_grad_batches=1`` and unsharded gradients (single device, DDP) only.
        snapshot_device: ``"cpu"`` keeps the estimator's snapshot in host memory.
        initial_step: ``auto``: the first update moves the parameters by at most
            ``initial_step * max(||theta||, 1)``; the bound doubles every step. Default 1e-2 (measured
            on the LSTM benchmark: 3e-3 to 1e-1 end within 3% of the best threshold, 1e-3 at 4%).
        fused_handoff: with a fused optimizer (``Adam(fused=True)`` ...), no GradScaler and one scale
            for the optimizer, hand the scale and the skip verdict to the optimizer's kernel instead
            of scaling the gradients: no scaling pass, no host read (see the README).
        log_stats: aggregate the statistics on the device and publish them to ``trainer.loggers``
            (and W&B) every ``log_every_n_steps`` optimizer steps, rank zero only: one
            device-to-host transfer per interval, none in between.
        log_every_n_steps: the logging interval in optimizer steps (``None``: the trainer's).
        prefix: the metric-name prefix.
        prog_bar: show ``grad_norm`` and ``scale`` in the progress bar. This reads both values
            on the host **every step** (a sync): off by default.
        wandb_table_every: refresh the W&B smoothness table (the paper's Figure 1) at most every
            this many logging intervals (and at most every 30 s).

    Raises:
        ValueError: at construction, for any invalid argument (named, with its value).
        RuntimeError: at ``setup`` under DeepSpeed, which clips inside its own engine.

    Example:
        >>> from lightning_l0l1 import L0L1Clipping
        >>> trainer = pl.Trainer(callbacks=[L0L1Clipping()])  # auto: nothing to tune  # doctest: +SKIP
        >>> trainer = pl.Trainer(callbacks=[L0L1Clipping(mode="clip", max_norm=1.0)])  # doctest: +SKIP

    References:
        Zhang, He, Sra, Jadbabaie, ICLR 2020. https://arxiv.org/abs/1905.11881
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
        probe_loss: Optional[Callable[[pl.LightningModule, Any], Tensor]] = None,
        snapshot_device: Optional[Literal["cpu"]] = None,
        initial_step: float = 1e-2,
        fused_handoff: bool = True,
        log_stats: bool = True,
        log_every_n_steps: Optional[int] = None,
        prefix: str = "l0l1/",
        prog_bar: bool = False,
        wandb_table_every: int = 10,
    ) -> None:
        super().__init__()
        if probe_loss is not None and not callable(probe_loss):
            raise ValueError(f"`probe_loss` must be a callable (pl_module, batch) -> loss tensor, got {probe_loss!r}.")
        if probe_loss is not None and estimate is False:
            raise ValueError(
                "`probe_loss` measures the smoothness for the estimator: it cannot go with `estimate=False`."
            )
        if probe_loss is not None:
            estimate = True
        self.probe_loss = probe_loss
        self._clipper = GradientClipper(
            mode=mode,
            max_norm=max_norm,
            l0=l0,
            l1=l1,
            norm_type=norm_type,
            nonfinite=nonfinite,
            foreach=foreach,
            estimate=estimate,
            estimate_every=estimate_every,
            snapshot_device=snapshot_device,
            initial_step=initial_step,
            fused_handoff=fused_handoff,
            probe=probe_loss is not None,
        )
        self.estimate = self._clipper.estimate
        self.estimate_every = estimate_every
        self.snapshot_device = snapshot_device
        self.initial_step = self._clipper.initial_step
        self.fused_handoff = fused_handoff
        _flag("log_stats", log_stats)
        _count("log_every_n_steps", log_every_n_steps, allow_none=True)
        if not isinstance(prefix, str):
            raise ValueError(f"`prefix` must be a string, got {prefix!r}.")
        _flag("prog_bar", prog_bar)
        _count("wandb_table_every", wandb_table_every)
        self.log_stats = log_stats
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.wandb_table_every = wandb_table_every
        self._aggs: dict[int, StepStatistics] = {}
        self._n_groups: dict[int, int] = {}
        self._epoch_norms: dict[int, list[Tensor]] = {}
        self._since_log = 0
        self._sinks: Optional[tuple[LoggerSink, Optional[WandbSink]]] = None
        self._want_histogram = False
        self.mode = self._clipper.mode
        self.max_norm = self._clipper.max_norm
        self.l0 = self._clipper.l0
        self.l1 = self._clipper.l1
        self.norm_type = self._clipper.norm_type
        self.nonfinite = self._clipper.nonfinite
        self._warned_nonfinite = False
        self._fsdp1: Optional[tuple[Any]] = None  # (process_group,) under FSDP1, else None (checked once per fit)
        self._fsdp1_checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode, max_norm=self.max_norm, l0=self.l0, l1=self.l1, norm_type=self.norm_type,
            estimate=self.estimate,
        )

    @property
    @override
    def _legacy_state_key(self) -> Any:
        # Before `auto` became the default it could not refuse `max_norm`, and kept the then default
        # `max_norm=1.0` in its state key: Lightning looks this key up when `state_key` is not in a
        # checkpoint, so those checkpoints still resume (their estimator state loads as it is).
        if self.mode == "auto":
            return self._generate_state_key(
                mode="auto", max_norm=1.0, l0=None, l1=None, norm_type=self.norm_type, estimate=True
            )
        return super()._legacy_state_key

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
        self._fsdp1_checked = False
        self._sinks = None  # this trainer's loggers and W&B run, not those of an earlier fit

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        key = _optimizer_index(trainer, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            _unscale_if_fused(scaler, optimizer)
        process_group, is_shard = self._sharding(trainer)
        outcome = self._clipper.step(
            optimizer,
            key,
            process_group=process_group,
            is_shard=is_shard,
            nonfinite_handled=scaler is not None,
            step_label=trainer.global_step,
            allow_handoff=not trainer.gradient_clip_val,
        )
        if outcome is not None and self.log_stats and outcome.values is not None:
            agg = self._aggs.get(key)
            if agg is None or agg.n_values != outcome.values.numel():
                agg = self._aggs[key] = StepStatistics(outcome.values.numel()).to(outcome.values.device)
                self._n_groups[key] = len(optimizer.param_groups)
            elif agg.device != outcome.values.device:  # restored from a checkpoint on the CPU
                agg = self._aggs[key] = agg.to(outcome.values.device)
            agg.update(outcome.values, outcome.finite_mask, outcome.clipped)
            if key == 0 and self._want_histogram:
                self._epoch_norms.setdefault(key, []).append(
                    torch.where(outcome.finite_mask, outcome.norm, torch.full_like(outcome.norm, float("nan")))  # type: ignore[arg-type]
                )
            if key == 0:
                self._since_log += 1
        if outcome is not None and self.prog_bar:
            sfx = f"_opt{key}" if len(trainer.optimizers) > 1 else ""  # as in the logged names
            pl_module.log(f"{self.prefix}grad_norm{sfx}", outcome.norm, prog_bar=True, logger=False, on_step=True)
            if outcome.values is not None:
                pl_module.log(f"{self.prefix}scale{sfx}", outcome.values[2], prog_bar=True, logger=False, on_step=True)
        if outcome is not None and outcome.finite is False and not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(
                f"`L0L1Clipping`: the global gradient norm is not finite at step {trainer.global_step}; "
                f"the step's gradients were {outcome.action} (`nonfinite={self.nonfinite!r}`). "
                "Further non-finite steps are counted in `l0l1/nonfinite_steps` without a warning."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Per-step norms for the per-epoch W&B histogram are kept only where one will be drawn.
        self._want_histogram = self.log_stats and trainer.is_global_zero and self._get_sinks(trainer)[1] is not None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.probe_loss is not None:
            self._probe(trainer, pl_module, batch)
        interval = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if self.log_stats and self._since_log >= interval:
            self._flush(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        norms, self._epoch_norms = self._epoch_norms, {}
        if not self.log_stats or not trainer.is_global_zero:
            return
        _, wb = self._get_sinks(trainer)
        if wb is None or not norms.get(0):
            return
        values = torch.stack(norms[0]).tolist()  # one transfer per epoch
        wb.histogram(values, trainer.global_step, trainer.current_epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_stats:
            return
        if self._since_log:
            self._flush(trainer)
        if not trainer.is_global_zero:
            return
        _, wb = self._get_sinks(trainer)
        if wb is not None:
            latest = self.latest()
            keep = ("L0", "L1", "max_norm", "clip_rate", "nonfinite_steps", "lr_suggested", "steps")
            summary = {
                k: v for k, v in latest.items() if any(k[len(self.prefix) :].startswith(p) for p in keep)
            }
            wb.finish({k: v for k, v in summary.items() if math.isfinite(v)}, trainer.global_step)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """The gradient of this step's batch at the step's midpoint, averaged over data-parallel ranks."""
        probe_loss = self.probe_loss
        assert probe_loss is not None

        def gradient(params: Any) -> Any:
            with trainer.precision_plugin.forward_context():
                loss = probe_loss(pl_module, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(
                    f"`probe_loss` must return the loss as a one-element tensor, got {type(loss).__name__}."
                )
            return torch.autograd.grad(loss.float().reshape(()), params, allow_unused=True)

        reduce = None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = trainer.world_size

            def reduce(grads: list[Tensor]) -> None:  # one all-reduce, averaged like DDP's gradients
                dtype = torch.float32
                for g in grads:  # at least float32, float64 if any gradient is
                    dtype = torch.promote_types(dtype, g.dtype)
                flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
                torch.distributed.all_reduce(flat)
                flat.div_(world)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

        self._clipper.probe(0, gradient, reduce)

    def _get_sinks(self, trainer: pl.Trainer) -> tuple[LoggerSink, Optional[WandbSink]]:
        if self._sinks is None:
            loggers = list(trainer.loggers)
            wandb_logger = next(
                (lg for lg in loggers if any(c.__name__ == "WandbLogger" for c in type(lg).__mro__)), None
            )  # subclasses too: otherwise the sink would log every row a second time to the same run
            wb: Optional[WandbSink] = None
            config = {
                "mode": self.mode, "max_norm": self.max_norm, "l0": self.l0, "l1": self.l1,
                "norm_type": self.norm_type, "nonfinite": self.nonfinite, "estimate": self.estimate,
                "estimate_every": self.estimate_every, "log_every_n_steps": self.log_every_n_steps,
                "probe": self.probe_loss is not None,
            }
            if wandb_logger is not None:
                # WandbLogger(prefix="p") logs our rows as "p-l0l1/...": declare their x-axis under that name
                outer = getattr(wandb_logger, "_prefix", "") or ""
                join = getattr(wandb_logger, "LOGGER_JOIN_CHAR", "-")
                wb = WandbSink(lambda: wandb_logger.experiment, self.prefix, config, log_metrics=False,
                               table_every=self.wandb_table_every,
                               logged_prefix=f"{outer}{join}{self.prefix}" if outer else None)
            elif "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
                wb = WandbSink(lambda: sys.modules["wandb"].run, self.prefix, config, log_metrics=True,
                               table_every=self.wandb_table_every)
            owners = {id(wandb_logger): wb} if wandb_logger is not None else None  # one warning per W&B outage
            self._sinks = (LoggerSink(loggers, owners), wb)
        return self._sinks

    def _flush(self, trainer: pl.Trainer) -> None:
        """Publish the interval's aggregates: one device-to-host transfer, rank zero only."""
        self._since_log = 0
        aggs = dict(self._aggs)
        if not trainer.is_global_zero or not aggs:
            for agg in aggs.values():
                agg.reset()
            return
        keys = sorted(aggs)
        parts, layout = [], []
        for key in keys:
            vec = aggs[key].compute()
            counters = self._clipper.device_counters(key)
            parts.append(vec.to(torch.float64))
            if counters is None:
                counters = vec.new_full((5,), math.nan)
            parts.append(counters.to(vec.device, torch.float64))
            layout.append((key, vec.numel()))
        flat = torch.cat([p.to(parts[0].device) for p in parts]).tolist()  # the one transfer
        metrics: dict[str, float] = {}
        pair_norm = math.nan
        several = len(keys) > 1
        i = 0
        for key, n in layout:
            sfx = f"_opt{key}" if several else ""
            names = stat_names(self._n_groups.get(key, 1))
            values = flat[i : i + n]
            i += n
            for name, v in zip(names, values):
                if name not in ("finite_steps", "steps"):
                    metrics[f"{self.prefix}{name}{sfx}"] = v
            nonfinite, smooth, l0, l1, pnorm = flat[i : i + 5]
            i += 5
            metrics[f"{self.prefix}nonfinite_steps{sfx}"] = nonfinite
            if self.estimate:
                metrics[f"{self.prefix}smoothness{sfx}"] = smooth
                metrics[f"{self.prefix}L0{sfx}"] = l0
                metrics[f"{self.prefix}L1{sfx}"] = l1
                if l0 > 0:
                    metrics[f"{self.prefix}lr_suggested{sfx}"] = 1.0 / l0
                if key == keys[0]:
                    pair_norm = pnorm
        for agg in aggs.values():
            agg.reset()
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}  # no NaN/inf reaches a logger
        if not metrics:
            return
        loggers, wb = self._get_sinks(trainer)
        if wb is not None:  # first: its define_metric must precede the first l0l1 row
            wb.log(metrics, trainer.global_step, f"{self.prefix}smoothness" if self.estimate else None, pair_norm)
        loggers.log(metrics, trainer.global_step)

    # ------------------------------------------------------------------ results and state
    def latest(self) -> dict[str, float]:
        """Statistics of the last optimizer step (reads the device: never call it per step).

        Keys: ``l0l1/grad_norm`` (before scaling), ``l0l1/grad_norm_scaled``,
        ``l0l1/scale``, ``l0l1/max_norm`` (the norm threshold in use: ``max_norm``,
        or :math:`(1/\\eta - L_0)/L_1` for ``l0l1``), ``l0l1/lr_effective`` (lr x scale of the
        first param group, ``_pg{j}`` for the others), ``l0l1/steps``,
        ``l0l1/nonfinite_steps``, ``l0l1/clip_rate``. With several optimizers every key
        ends in ``_opt{i}``. A non-finite step leaves the values of the last finite one.
        """
        return self._clipper.latest()

    @override
    def state_dict(self) -> dict[str, Any]:
        # The open logging interval too: a run resumed mid-interval logs at the same steps, with the
        # same aggregates, as one that was never interrupted.
        interval = {
            "since_log": self._since_log,
            "aggs": {
                key: {**agg.checkpoint(), "n_groups": self._n_groups.get(key, 1)} for key, agg in self._aggs.items()
            },
        }
        return {"clipper": self._clipper.state_dict(), "warned_nonfinite": self._warned_nonfinite,
                "interval": interval}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._clipper.load_state_dict(state_dict.get("clipper", {}))
        self._warned_nonfinite = bool(state_dict.get("warned_nonfinite", False))
        interval = state_dict.get("interval") or {}  # absent in older checkpoints: a new interval starts
        self._since_log = int(interval.get("since_log", 0))
        self._aggs = {key: StepStatistics.restore(saved) for key, saved in interval.get("aggs", {}).items()}
        self._n_groups = {key: int(saved.get("n_groups", 1)) for key, saved in interval.get("aggs", {}).items()}

    # ------------------------------------------------------------------ helpers
    def _sharding(self, trainer: pl.Trainer) -> tuple[Any, Any]:
        """FSDP1: the shard process group and a predicate for sharded params (detected once)."""
        if not self._fsdp1_checked:
            self._fsdp1_checked = True
            self._fsdp1 = _find_fsdp1_group(trainer.strategy.model if trainer.strategy else None)
        if self._fsdp1 is None:
            return None, None
        return self._fsdp1[0], _is_fsdp_flattened


def _optimizer_index(trainer: pl.Trainer, optimizer: Optimizer) -> int:
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
