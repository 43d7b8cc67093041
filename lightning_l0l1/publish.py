"""Publishing: aggregation on the device between logging steps, and the sinks that receive the results.

:class:`Publisher` keeps one :class:`StepStatistics` per optimizer, finds the sinks of a trainer's
loggers, and publishes each logging interval with one device-to-host transfer (rank zero only).
:class:`StepStatistics` is a torchmetrics ``Metric`` whose ``update`` only accumulates (masked so
that a non-finite step never reaches an aggregate) and whose ``compute`` returns every aggregate
as one tensor. The sinks only receive Python floats: :class:`LoggerSink` writes to
``trainer.loggers`` (CSV, TensorBoard, W&B...), :class:`WandbSink` adds what only W&B can show
(metric axes, the run config and summary, the paper's Figure 1 as a live table and scatter plot,
a per-epoch histogram). ``wandb`` is imported inside :class:`WandbSink` only. A failing sink warns
once and is switched off: logging never stops a run. Metric names come from
:mod:`lightning_l0l1.stats`.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_l0l1.norms import PerTensorNorms
from lightning_l0l1.state import check_array, check_number, damaged
from lightning_l0l1.stats import (
    COUNTER_FIELDS,
    RECORD_FIELDS,
    StepRecord,
    clip_rate,
    interval_metrics,
    metric_name,
    summary_metrics,
)

__all__ = ["Interval", "LayerGrouping", "LayerStatistics", "LoggerSink", "Publisher", "StepStatistics", "WandbSink"]


class StepStatistics(Metric):
    """Aggregates one optimizer's per-step statistics over a logging interval, on the device.

    ``update(values, finite, clipped)`` takes a :class:`~lightning_l0l1.stats.StepRecord`'s
    ``values``, ``finite`` and ``clipped``. The
    states are sums (means are formed in ``compute``), the extremes of ``grad_norm``, and the
    counts of steps, finite steps and clipped steps. Nothing is read on the host.

    The values are already global (the norm is all-reduced where it needs to be), so no
    distributed synchronisation happens in ``compute``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    # The states registered by ``add_state`` (annotations only: no class attribute is created).
    sums: Tensor
    norm_max: Tensor
    norm_min: Tensor
    finite: Tensor
    steps: Tensor
    clipped: Tensor

    def __init__(self, n_values: int) -> None:
        super().__init__(sync_on_compute=False, dist_sync_on_step=False)
        self.n_values = n_values
        self.add_state("sums", torch.zeros(n_values, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("norm_max", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("norm_min", torch.tensor(math.inf, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("finite", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("steps", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("clipped", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, finite: Tensor, clipped: Tensor) -> None:
        # in place (`add_`, `out=`): an assignment to a state goes through Module.__setattr__, slow per step
        v = values.to(self.sums.dtype)
        self.sums.add_(torch.where(finite, v, torch.zeros_like(v)))
        torch.maximum(self.norm_max, torch.where(finite, v[0], self.norm_max), out=self.norm_max)
        torch.minimum(self.norm_min, torch.where(finite, v[0], self.norm_min), out=self.norm_min)
        self.finite.add_(finite.to(self.sums.dtype))
        self.steps.add_(1)
        self.clipped.add_((clipped & finite).to(self.sums.dtype))

    STATES = ("sums", "norm_max", "norm_min", "finite", "steps", "clipped")

    def checkpoint(self) -> dict[str, Any]:
        """The open interval's states, on the CPU (for a callback's ``state_dict``)."""
        return {"n_values": self.n_values, **{k: getattr(self, k).detach().cpu().clone() for k in self.STATES}}

    @classmethod
    def restore(cls, saved: dict[str, Any]) -> StepStatistics:
        """An aggregate holding what :meth:`checkpoint` saved (on the CPU; ``.to(device)`` moves it)."""
        agg = cls(int(saved["n_values"]))
        for k in cls.STATES:
            setattr(agg, k, torch.as_tensor(saved[k], dtype=torch.float64).clone())
        agg._update_count = int(saved["steps"])  # torchmetrics warns on compute() before any update
        return agg

    def compute(self) -> Tensor:
        """The record's means, then :data:`~lightning_l0l1.stats.INTERVAL_FIELDS` (NaN where undefined):
        the layout of :func:`~lightning_l0l1.stats.stat_names`."""
        n = self.finite.clamp_min(1)
        none = self.finite == 0
        nan = torch.full_like(self.norm_max, math.nan)
        means = torch.where(none, torch.full_like(self.sums, math.nan), self.sums / n)
        extremes = [torch.where(none, nan, self.norm_max), torch.where(none, nan, self.norm_min)]
        return torch.cat([means, torch.stack([*extremes, clip_rate(self.clipped, self.finite), self.finite,
                                              self.steps])])


class LayerStatistics(Metric):
    """Aggregates one optimizer's per-layer gradient norms over a logging interval, on the device.

    ``update(norms, finite, scale)`` takes one step's per-layer norms (1-d), whether the step was
    finite and its scale. The states are the sums over finite steps (for the means), the maxima, and
    the per-layer norms of the interval's most-scaled finite step with its scale (``worst_scale``,
    ``inf`` while there is none): what a "clipped hard" warning names. Nothing is read on the host.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    sums: Tensor
    maxes: Tensor
    finite: Tensor
    worst_scale: Tensor
    worst_norms: Tensor

    def __init__(self, n_layers: int) -> None:
        super().__init__(sync_on_compute=False, dist_sync_on_step=False)
        self.n_layers = n_layers
        self.add_state("sums", torch.zeros(n_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("maxes", torch.full((n_layers,), -math.inf, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("finite", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("worst_scale", torch.tensor(math.inf, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("worst_norms", torch.zeros(n_layers, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, norms: Tensor, finite: Tensor, scale: Tensor) -> None:
        v = norms.to(self.sums.dtype)
        self.sums.add_(torch.where(finite, v, torch.zeros_like(v)))
        torch.maximum(self.maxes, torch.where(finite, v, self.maxes), out=self.maxes)
        self.finite.add_(finite.to(self.sums.dtype))
        s = torch.where(finite, scale.to(self.sums.dtype), math.inf)
        torch.where(s < self.worst_scale, v, self.worst_norms, out=self.worst_norms)
        torch.minimum(self.worst_scale, s, out=self.worst_scale)

    def compute(self) -> Tensor:
        """``[means, maxima, norms at the most-scaled step, that step's scale]`` (NaN means without a finite step)."""
        none = self.finite == 0
        means = torch.where(none, torch.full_like(self.sums, math.nan), self.sums / self.finite.clamp_min(1))
        maxes = torch.where(none, torch.full_like(self.maxes, math.nan), self.maxes)
        return torch.cat([means, maxes, self.worst_norms, self.worst_scale.reshape(1)])


LayerBy = Literal["module", "parameter"]


class LayerGrouping:
    """Per-layer gradient norms of one step from the per-parameter norms the global norm is formed from.

    Args:
        names: ``id(param)`` to the parameter's name (``model.named_parameters()``).
        by: ``"module"``: one norm per module (the name without its last part, ``net.0`` for
            ``net.0.weight`` and ``net.0.bias``); ``"parameter"``: one per parameter.
        norm_type: the p of the norms: a layer's norm is the p-norm of its parameters' norms.

    The parameter-to-layer index is built once per set of parameters with a gradient (a device
    tensor, copied once); a step is then one ``index_add_`` (``scatter_reduce_`` for the max-norm) over
    the vector of per-parameter norms the global norm was formed from, on the device.
    """

    def __init__(self, names: dict[int, str], by: LayerBy, norm_type: float) -> None:
        self.names, self.by, self.p = names, by, float(norm_type)
        self._plans: dict[tuple[int, ...], tuple[list[str], Tensor]] = {}

    def layer_of(self, name: str) -> str:
        return name.rsplit(".", 1)[0] if self.by == "module" and "." in name else name

    def plan(self, ids: tuple[int, ...], device: torch.device) -> tuple[list[str], Tensor]:
        """The layer names and each parameter's layer index (on ``device``) for these parameters."""
        found = self._plans.get(ids)
        if found is None:
            layers: dict[str, int] = {}
            index = [layers.setdefault(self.layer_of(self.names.get(i, f"param{k}")), len(layers))
                     for k, i in enumerate(ids)]
            if len(self._plans) > 8:  # the set of parameters with a gradient changes rarely
                self._plans.clear()
            found = self._plans[ids] = (list(layers), torch.tensor(index, device=device))
        return found

    def step(self, param_norms: PerTensorNorms) -> tuple[list[str], Tensor]:
        """The layer names and their norms (1-d float64, on the device) of one step, from the per-parameter
        norms' segments (:attr:`~lightning_l0l1.clipper.StepOutcome.param_norms`)."""
        vectors = [v for _, v in param_norms]
        norms = (vectors[0] if len(vectors) == 1 else torch.cat([v.to(vectors[0].device) for v in vectors]))
        norms = norms.to(torch.float64)
        layers, index = self.plan(tuple(i for ids, _ in param_norms for i in ids), norms.device)
        out = norms.new_zeros(len(layers))
        if math.isinf(self.p):
            return layers, out.scatter_reduce_(0, index, norms.abs(), "amax")
        return layers, out.index_add_(0, index, norms.pow(self.p)).pow(1.0 / self.p)


@dataclass
class Interval:
    """One logging interval, read in one transfer.

    Attributes:
        metrics: the interval's finite metrics by name.
        pair_norm: the norm the first optimizer's last secant pair is paired with (NaN: none).
        layers: per optimizer key, ``(layer names, means, maxima, norms at the most-scaled step, its scale)``.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    pair_norm: float = math.nan
    layers: dict[int, tuple[list[str], list[float], list[float], list[float], float]] = field(default_factory=dict)


def _warn_once(owner: Any, what: str, err: BaseException) -> None:
    if not getattr(owner, "_warned", False):
        owner._warned = True
        warnings.warn(
            f"`L0L1Clipping`: {what} failed ({type(err).__name__}: {err}); it is switched off for the rest "
            "of the run. Training goes on.",
            RuntimeWarning,
            stacklevel=3,
        )


class LoggerSink:
    """Writes metric dicts to a list of Lightning loggers; a logger that raises is dropped with one warning.

    ``warn_owners`` maps ``id(logger)`` to the object whose warn-once flag that logger's failure
    shares (the :class:`WandbSink` for a ``WandbLogger``: one W&B outage, one warning).
    """

    def __init__(self, loggers: Sequence[Any], warn_owners: Optional[dict[int, Any]] = None) -> None:
        self.loggers = list(loggers)
        self.warn_owners = dict(warn_owners or {})

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in list(self.loggers):
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:
                self.loggers.remove(logger)
                owner = self.warn_owners.get(id(logger)) or self._owner_for(logger)
                _warn_once(owner, f"logging to {type(logger).__name__}", err)

    def _owner_for(self, logger: Any) -> Any:
        """A warn-once flag per logger: a second failing logger is warned about too."""
        flags = self.__dict__.setdefault("_flags", {})
        return flags.setdefault(id(logger), type("_Flag", (), {})())


class WandbSink:
    """What W&B adds: metric axes, config, summary, the Figure 1 table and scatter, histograms.

    Args:
        run_getter: returns the ``wandb`` run (e.g. ``WandbLogger.experiment``), called lazily.
        prefix: the metric prefix (``"l0l1/"``).
        config: the callback's settings, stored under ``config["l0l1"]``.
        log_metrics: also log the interval metrics (when no ``WandbLogger`` does it already).
        table_every: refresh the Figure 1 table at most every this many logging intervals...
        table_min_seconds: ...and at most once per this many seconds.
        max_rows: the table keeps at most this many rows (older ones are thinned out).
        logged_prefix: the prefix the interval metrics reach the run with, where a logger adds its own
            (``WandbLogger(prefix="train")`` logs ``train-l0l1/grad_norm``); their x-axis is declared
            for it too. Default: ``prefix``.
    """

    STEP_KEY = "trainer/global_step"

    def __init__(
        self,
        run_getter: Callable[[], Any],
        prefix: str,
        config: dict[str, Any],
        log_metrics: bool,
        table_every: int = 10,
        table_min_seconds: float = 30.0,
        max_rows: int = 5000,
        logged_prefix: Optional[str] = None,
    ) -> None:
        self._get_run = run_getter
        self.prefix = prefix
        self.logged_prefix = prefix if logged_prefix is None else logged_prefix
        self.config = config
        self.log_metrics = log_metrics
        self.table_every = table_every
        self.table_min_seconds = table_min_seconds
        self.max_rows = max_rows
        self.rows: list[list[float]] = []
        self.enabled = True
        self._started = False
        self._intervals = 0
        self._last_table = -math.inf

    def _run(self) -> Any:
        run = self._get_run()
        if run is None:
            raise RuntimeError("no active W&B run")
        if not self._started:
            self._started = True
            run.define_metric(self.STEP_KEY)
            for p in dict.fromkeys((self.prefix, self.logged_prefix)):  # once each, in order
                run.define_metric(f"{p}*", step_metric=self.STEP_KEY)
            run.config.update({"l0l1": self.config}, allow_val_change=True)
        return run

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if not self.enabled:
            return
        try:
            fn()
        except Exception as err:
            self.enabled = False
            _warn_once(self, f"W&B {what}", err)

    def log(
        self, metrics: dict[str, float], step: int, smoothness_key: Optional[str], pair_norm: float = math.nan
    ) -> None:
        """Log the interval (if asked) and add a Figure 1 row: the last secant's smoothness with the
        gradient norm it is paired with (``pair_norm``; the interval's mean norm if not given)."""
        def go() -> None:
            import wandb

            run = self._run()
            if self.log_metrics:
                run.log({**metrics, self.STEP_KEY: step})
            g = pair_norm if math.isfinite(pair_norm) else metrics.get(metric_name(self.prefix, "grad_norm"))
            sm = metrics.get(smoothness_key) if smoothness_key else None
            if g is not None and sm is not None and g > 0 and sm > 0 and math.isfinite(g) and math.isfinite(sm):
                self.rows.append([float(step), g, sm, math.log10(g), math.log10(sm)])
                if len(self.rows) > self.max_rows:
                    self.rows = self.rows[::2]
            self._intervals += 1
            now = time.monotonic()
            due = self._intervals % self.table_every == 0 and now - self._last_table >= self.table_min_seconds
            if self.rows and due:
                self._last_table = now
                self._log_table(wandb, run, step)

        self._guard("logging", go)

    def _log_table(self, wandb: Any, run: Any, step: int) -> None:
        table = wandb.Table(
            columns=["step", "grad_norm", "smoothness", "log10_grad_norm", "log10_smoothness"], data=self.rows
        )
        plot = wandb.plot.scatter(
            table, "log10_grad_norm", "log10_smoothness", title="Local smoothness vs gradient norm (log-log)"
        )
        run.log({metric_name(self.prefix, "smoothness_table"): table, metric_name(self.prefix, "figure1"): plot,
                 self.STEP_KEY: step})

    def histogram(self, values: Sequence[float], step: int, epoch: int) -> None:
        def go() -> None:
            import wandb

            finite = [v for v in values if math.isfinite(v)]
            if finite:
                run = self._run()
                run.log({metric_name(self.prefix, "grad_norm_hist"): wandb.Histogram(finite), "epoch": epoch,
                         self.STEP_KEY: step})

        self._guard("histogram", go)

    def layers(self, names: Sequence[str], means: Sequence[float], maxes: Sequence[float], step: int,
               suffix: str = "") -> None:
        """An interval's per-layer norms: a histogram of the means, and a table (layer, mean, max) at the
        Figure 1 table's pace."""
        def go() -> None:
            import wandb

            run = self._run()
            finite = [m for m in means if math.isfinite(m)]
            row: dict[str, Any] = {self.STEP_KEY: step}
            if finite:
                row[metric_name(self.prefix, f"layer_grad_norm_hist{suffix}")] = wandb.Histogram(finite)
            if self._intervals % self.table_every == 0 or self._intervals <= 1:
                data = [[n, m, x] for n, m, x in zip(names, means, maxes) if math.isfinite(m)]
                row[metric_name(self.prefix, f"layer_grad_norm_table{suffix}")] = wandb.Table(
                    columns=["layer", "grad_norm_mean", "grad_norm_max"], data=data)
            if len(row) > 1:
                run.log(row)

        self._guard("per-layer norms", go)

    def run_name(self, name: str) -> str:
        """The name a metric has in the run (a ``WandbLogger`` prefix added)."""
        return self.logged_prefix + name[len(self.prefix) :] if name.startswith(self.prefix) else name

    def finish(self, summary: dict[str, float], step: int, stale: Sequence[str] = ()) -> None:
        """The final table; ``summary`` into the run's summary, and the ``stale`` metrics out of it."""
        def go() -> None:
            import wandb

            run = self._run()
            if self.rows:
                self._log_table(wandb, run, step)
            for k, v in summary.items():
                run.summary[k] = v
            present = set(run.summary.keys())
            for name in dict.fromkeys(n for k in stale for n in (k, self.run_name(k))):
                if name in present:  # a metric now undefined: its last value is not the run's
                    del run.summary[name]

        self._guard("summary", go)


def find_sinks(
    loggers: Sequence[Any], prefix: str, config: dict[str, Any], table_every: int
) -> tuple[LoggerSink, Optional[WandbSink]]:
    """The sinks for a trainer's ``loggers``: all of them, and W&B's extras where a W&B run is in use.

    A ``WandbLogger`` (or a subclass) among the loggers already logs the metrics: its sink adds the
    rest. Without one, a run started with ``wandb.init()`` gets the metrics and the rest directly.
    """
    loggers = list(loggers)
    wandb_logger = next(
        (lg for lg in loggers if any(c.__name__ == "WandbLogger" for c in type(lg).__mro__)), None
    )  # subclasses too: otherwise the sink would log every row a second time to the same run
    wb: Optional[WandbSink] = None
    if wandb_logger is not None:
        # WandbLogger(prefix="p") logs our rows as "p-l0l1/...": declare their x-axis under that name
        outer = getattr(wandb_logger, "_prefix", "") or ""
        join = getattr(wandb_logger, "LOGGER_JOIN_CHAR", "-")
        wb = WandbSink(lambda: wandb_logger.experiment, prefix, config, log_metrics=False, table_every=table_every,
                       logged_prefix=f"{outer}{join}{prefix}" if outer else None)
    elif "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
        wb = WandbSink(lambda: sys.modules["wandb"].run, prefix, config, log_metrics=True, table_every=table_every)
    owners = {id(wandb_logger): wb} if wandb_logger is not None else None  # one warning per W&B outage
    return LoggerSink(loggers, owners), wb


class Publisher:
    """Aggregates each optimizer's step records over a logging interval and publishes them.

    The interval is counted in steps of the first optimizer. Everything stays on the device until
    :meth:`flush`, which reads all aggregates and counters in one transfer, on rank zero only.

    Args:
        prefix: the metric-name prefix.
        every: the logging interval in optimizer steps (``None``: the trainer's ``log_every_n_steps``).
        table_every: refresh the W&B smoothness table at most every this many intervals.
        config: the settings recorded in the W&B run's config.
    """

    def __init__(self, prefix: str, every: Optional[int], table_every: int, config: dict[str, Any]) -> None:
        self.prefix, self.every, self.table_every = prefix, every, table_every
        self.config = {**config, "log_every_n_steps": every}
        self._aggs: dict[int, StepStatistics] = {}
        self._since_log = 0
        self._epoch_norms: list[Tensor] = []
        self.keep_norms = False  # keep the first optimizer's norms for a per-epoch histogram
        self._sinks: Optional[tuple[LoggerSink, Optional[WandbSink]]] = None
        #: per-layer norms (``None``: off); set by the callback at ``setup``.
        self.layers: Optional[LayerGrouping] = None
        self._layer_aggs: dict[int, tuple[list[str], LayerStatistics]] = {}
        #: each optimizer's last step's layer names and norms (on the device), for a non-finite warning.
        self.last_layer_norms: dict[int, tuple[list[str], Tensor]] = {}
        self.last_layer_key = 0  # the optimizer of the last step with layer norms
        #: every metric published this fit, with its last value (what a run summary must not keep stale).
        self.published: dict[str, float] = {}

    def sinks(self, loggers: Sequence[Any]) -> tuple[LoggerSink, Optional[WandbSink]]:
        """The sinks of these loggers, found once per fit (see :meth:`reset`)."""
        if self._sinks is None:
            self._sinks = find_sinks(loggers, self.prefix, self.config, self.table_every)
        return self._sinks

    def reset(self) -> None:
        """Forget the sinks: the next fit's loggers are not the last one's."""
        self._sinks = None
        self.published = {}

    def add(self, key: int, record: StepRecord, param_norms: Optional[PerTensorNorms] = None) -> None:
        """Aggregate one step of optimizer ``key`` (on the device, no host read); with :attr:`layers` set,
        also its per-layer norms from ``param_norms`` (:attr:`StepOutcome.param_norms`)."""
        n = record.values.numel()
        agg = self._aggs.get(key)
        if agg is None or agg.n_values != n:
            agg = self._aggs[key] = StepStatistics(n).to(record.values.device)
        elif agg.device != record.values.device:  # restored from a checkpoint on the CPU
            agg = self._aggs[key] = agg.to(record.values.device)
        agg.update(record.values, record.finite, record.clipped)
        if self.layers is not None and param_norms:
            names, norms = self.layers.step(param_norms)
            self.last_layer_norms[key], self.last_layer_key = (names, norms), key
            held = self._layer_aggs.get(key)
            if held is None or held[0] != names:
                held = self._layer_aggs[key] = (names, LayerStatistics(len(names)).to(norms.device))
            held[1].update(norms, record.finite, record.scale)
        if key == 0:
            self._since_log += 1
            if self.keep_norms:
                self._epoch_norms.append(torch.where(record.finite, record.grad_norm, math.nan))

    def interval(self, trainer_every: Optional[int]) -> Optional[int]:
        """The logging interval: ``every``, else the trainer's ``log_every_n_steps`` (50 where it has none);
        ``None`` where the trainer's is 0 (the trainer's logging is off, and so is the interval's)."""
        if self.every is not None:
            return self.every
        if trainer_every is None:
            return 50
        return int(trainer_every) if int(trainer_every) > 0 else None

    def due(self, trainer_every: Optional[int]) -> bool:
        """An interval is complete."""
        every = self.interval(trainer_every)
        return every is not None and self._since_log >= every

    @property
    def pending(self) -> bool:
        """Steps have been aggregated since the last flush."""
        return self._since_log > 0

    def collect(self, counters: Callable[[int], Optional[Tensor]], estimate: bool) -> Interval:
        """The interval's aggregates and the clipper's ``counters(key)``, read in one transfer; a new interval
        starts."""
        self._since_log = 0
        out = self._read(counters, estimate) if self._aggs else Interval()
        for agg in self._aggs.values():
            agg.reset()
        for _, lagg in self._layer_aggs.values():
            lagg.reset()
        return out

    def publish(self, interval: Interval, step: int, loggers: Sequence[Any], to_loggers: bool, estimate: bool) -> None:
        """Rank zero: W&B's extras (and its rows where no ``WandbLogger`` writes them), and the rows to
        ``loggers`` where Lightning does not write them itself (``to_loggers``)."""
        metrics = interval.metrics
        self.published.update(metrics)
        log, wb = self.sinks(loggers)
        if wb is not None and metrics:  # first: its define_metric must precede the first l0l1 row
            wb.log(metrics, step, metric_name(self.prefix, "smoothness") if estimate else None, interval.pair_norm)
        if wb is not None:
            for key, (names, means, maxes, _, _) in interval.layers.items():
                wb.layers(names, means, maxes, step, suffix=f"_opt{key}" if len(interval.layers) > 1 else "")
        if to_loggers and metrics:
            log.log(metrics, step)

    def _read(self, counters: Callable[[int], Optional[Tensor]], estimate: bool) -> Interval:
        """Every aggregate and counter, read in one transfer, as named metrics."""
        keys = sorted(self._aggs)
        parts = []
        for key in keys:
            vec = self._aggs[key].compute()
            c = counters(key)
            if c is None:  # no step yet since the state was restored
                c = vec.new_full((len(COUNTER_FIELDS),), math.nan)
            parts += [vec.to(torch.float64), c.to(vec.device, torch.float64)]
        layer_keys = sorted(k for k, (_, agg) in self._layer_aggs.items() if agg.update_count)
        layer_parts = [self._layer_aggs[k][1].compute() for k in layer_keys]
        flat = torch.cat([p.to(parts[0].device) for p in [*parts, *layer_parts]]).tolist()  # the one transfer
        blocks, i = [], 0
        for key, vec in zip(keys, parts[::2]):
            n, k = vec.numel(), len(COUNTER_FIELDS)
            n_groups = self._aggs[key].n_values - len(RECORD_FIELDS)
            blocks.append((key, n_groups, flat[i : i + n], flat[i + n : i + n + k]))
            i += n + k
        metrics, pair_norm = interval_metrics(self.prefix, blocks, estimate)
        out = Interval(metrics, pair_norm)
        several = len(self._aggs) > 1
        for key in layer_keys:
            names = self._layer_aggs[key][0]
            n = len(names)
            means, maxes, worst = flat[i : i + n], flat[i + n : i + 2 * n], flat[i + 2 * n : i + 3 * n]
            out.layers[key] = (names, means, maxes, worst, flat[i + 3 * n])
            i += 3 * n + 1
            for name, mean, mx in zip(names, means, maxes):
                for what, v in (("layer_grad_norm", mean), ("layer_grad_norm_max", mx)):
                    if math.isfinite(v):
                        out.metrics[metric_name(self.prefix, f"{what}/{name}", key, several)] = v
        return out

    def epoch_end(self, step: int, epoch: int, is_global_zero: bool, loggers: Sequence[Any]) -> None:
        """The epoch's histogram of the first optimizer's norms (W&B only)."""
        norms, self._epoch_norms = self._epoch_norms, []
        if not is_global_zero or not norms:
            return
        _, wb = self.sinks(loggers)
        if wb is not None:
            wb.histogram(torch.stack(norms).tolist(), step, epoch)  # one transfer per epoch

    def finish(self, step: int, loggers: Sequence[Any], latest: Callable[[], dict[str, float]],
               last: Optional[dict[str, float]] = None) -> None:
        """The run's summary and final table (W&B only).

        The summary holds current values only: the run's figures from ``latest()`` and the last
        interval's metrics (``last``); every other metric published this fit (a value that was finite
        once and is undefined now, such as ``lr_suggested`` once :math:`L_0 = 0`) is removed from it.
        """
        _, wb = self.sinks(loggers)
        if wb is not None:
            summary = {**(last or {}), **summary_metrics(self.prefix, latest())}
            stale = [k for k in self.published if k not in summary]
            wb.finish(summary, step, stale)

    def progress_names(self, key: int, several: bool) -> tuple[str, str]:
        """The progress-bar names of the norm and the scale."""
        return metric_name(self.prefix, "grad_norm", key, several), metric_name(self.prefix, "scale", key, several)

    def state_dict(self) -> dict[str, Any]:
        """The open interval: a run resumed mid-interval logs at the same steps, the same aggregates."""
        return {"since_log": self._since_log, "aggs": {key: agg.checkpoint() for key, agg in self._aggs.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            TypeError, ValueError: a damaged field, named by its path (``interval.aggs[0].sums``).
        """
        if not isinstance(sd, Mapping):
            raise damaged("interval", "a dict", sd, TypeError)
        since = int(check_number("interval.since_log", sd.get("since_log", 0), integer=True, low=0))
        aggs = sd.get("aggs", {})
        if not isinstance(aggs, Mapping):
            raise damaged("interval.aggs", "a dict", aggs, TypeError)
        restored = {}
        for key, saved in aggs.items():
            path = f"interval.aggs[{key!r}]"
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise damaged(path, "keyed by an optimizer index (an integer >= 0)", key, TypeError)
            if not isinstance(saved, Mapping):
                raise damaged(path, "a dict", saved, TypeError)
            for name in ("n_values", *StepStatistics.STATES):
                if name not in saved:
                    raise damaged(path, f"a dict with `{name}`", f"one without it (keys {sorted(map(str, saved))})")
            n = int(check_number(f"{path}.n_values", saved["n_values"], integer=True, low=1))
            check_array(f"{path}.sums", saved["sums"], (n,), inf=True)
            check_array(f"{path}.norm_max", saved["norm_max"], (), inf=True, neg_inf=True)
            check_array(f"{path}.norm_min", saved["norm_min"], (), inf=True, neg_inf=True)
            counts = {name: float(check_array(f"{path}.{name}", saved[name], (), low=0.0))
                      for name in ("finite", "steps", "clipped")}
            for name in ("finite", "clipped"):
                if counts[name] > counts["steps"]:
                    raise damaged(f"{path}.{name}", f"at most `steps` ({counts['steps']})", saved[name])
            restored[key] = StepStatistics.restore(dict(saved))
        self._since_log, self._aggs = since, restored
