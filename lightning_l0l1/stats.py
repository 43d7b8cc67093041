"""Statistics: aggregation on the device between logging steps, and the sinks that publish them.

:class:`StepStatistics` is a torchmetrics ``Metric`` whose ``update`` only accumulates (masked
so that a non-finite step never reaches an aggregate) and whose ``compute`` returns every
aggregate as one tensor, so publishing an interval costs one device-to-host transfer.

The sinks only receive Python floats: :class:`LoggerSink` writes to ``trainer.loggers`` (CSV,
TensorBoard, W&B...), :class:`WandbSink` adds what only W&B can show (metric axes, the run
config and summary, the paper's Figure 1 as a live table and scatter plot, a per-epoch histogram).
``wandb`` is imported inside :class:`WandbSink` only. A failing sink warns once and is switched
off: logging never stops a run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["LoggerSink", "StepStatistics", "WandbSink"]


class StepStatistics(Metric):
    """Aggregates one optimizer's per-step statistics over a logging interval, on the device.

    ``update(values, finite, clipped)`` takes the step's vector
    ``[grad_norm, grad_norm_scaled, scale, max_norm, lr_effective...]`` and two 0-d bools. The
    states are sums (means are formed in ``compute``), the extremes of ``grad_norm``, and the
    counts of steps, finite steps and clipped steps. Nothing is read on the host.

    The values are already global (the norm is all-reduced where it needs to be), so no
    distributed synchronisation happens in ``compute``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, n_values: int) -> None:
        super().__init__(sync_on_compute=False, dist_sync_on_step=False)
        self.n_values = n_values
        self.add_state("sums", torch.zeros(n_values, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("norm_max", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("norm_min", torch.tensor(math.inf, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("finite", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("steps", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("clipped", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, finite: Tensor, clipped: Tensor) -> None:  # type: ignore[override]
        v = values.to(self.sums.dtype)
        f = finite.to(self.sums.dtype)
        self.sums += torch.where(finite, v, torch.zeros_like(v))
        self.norm_max = torch.maximum(self.norm_max, torch.where(finite, v[0], self.norm_max))
        self.norm_min = torch.minimum(self.norm_min, torch.where(finite, v[0], self.norm_min))
        self.finite += f
        self.steps += 1
        self.clipped += (clipped & finite).to(self.sums.dtype)

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
        """``[means..., grad_norm max, grad_norm min, clip_rate, finite steps, steps]`` (NaN where undefined)."""
        n = self.finite.clamp_min(1)
        none = self.finite == 0
        nan = torch.full_like(self.norm_max, math.nan)
        means = torch.where(none, torch.full_like(self.sums, math.nan), self.sums / n)
        return torch.cat(
            [
                means,
                torch.stack(
                    [
                        torch.where(none, nan, self.norm_max),
                        torch.where(none, nan, self.norm_min),
                        torch.where(none, nan, self.clipped / n),
                        self.finite,
                        self.steps,
                    ]
                ),
            ]
        )


def stat_names(n_groups: int) -> list[str]:
    """Names of :meth:`StepStatistics.compute`'s entries (before prefix and optimizer suffix)."""
    lr = ["lr_effective"] + [f"lr_effective_pg{j}" for j in range(1, n_groups)]
    return [
        "grad_norm",
        "grad_norm_scaled",
        "scale",
        "max_norm",
        *lr,
        "grad_norm_max",
        "grad_norm_min",
        "clip_rate",
        "finite_steps",
        "steps",
    ]


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
            g = pair_norm if math.isfinite(pair_norm) else metrics.get(f"{self.prefix}grad_norm")
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
        run.log({f"{self.prefix}smoothness_table": table, f"{self.prefix}figure1": plot, self.STEP_KEY: step})

    def histogram(self, values: Sequence[float], step: int, epoch: int) -> None:
        def go() -> None:
            import wandb

            finite = [v for v in values if math.isfinite(v)]
            if finite:
                run = self._run()
                run.log({f"{self.prefix}grad_norm_hist": wandb.Histogram(finite), "epoch": epoch, self.STEP_KEY: step})

        self._guard("histogram", go)

    def finish(self, summary: dict[str, float], step: int) -> None:
        def go() -> None:
            import wandb

            run = self._run()
            if self.rows:
                self._log_table(wandb, run, step)
            for k, v in summary.items():
                run.summary[k] = v

        self._guard("summary", go)
