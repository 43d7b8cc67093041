r"""``auto``'s divergence watch: a warning, once, where the training loss rises while ``auto`` does not back off.

``auto``'s safeguards (the first-step bound, the base step and the step length it measures, the rise
bound under momentum) hold the step within what the estimate has seen; they cannot see what the loss
does between measurements: a learning rate far outside the range ``auto`` is tested over (Adam at
``lr`` 1), data that changes, a schedule that raises the rate. The watch looks at the one quantity
that tells: the training loss, fed to :meth:`GradientClipper.step(..., loss=...)
<lightning_l0l1.clipper.GradientClipper.step>` (the callback feeds it from ``on_before_backward``).

It works in windows of ``W`` steps that were given a loss. Over each window it sums, on the device, the
loss, the effective learning rate of the first param group, the secant smoothness and the gradient
norm (finite values only, each with its count): a few element-wise kernels per step, no host read.
When a window closes its sums are copied to the host (on CUDA without blocking, into pinned memory),
and the window closed before it is read: **one host read per window, one window late**, so the copy has
long finished on CUDA. The criterion (:class:`Criterion`) then judges the windows in order: with
:math:`\bar\ell_k` the mean loss of window :math:`k`, :math:`b` the window of the lowest mean so far
and :math:`\bar\eta_k` the mean effective learning rate, window :math:`k` has **risen** when

.. math::

    \bar\ell_k - \bar\ell_b > \max\left((\rho - 1)\lvert\bar\ell_b\rvert,\ \mu\lvert\bar\ell_0\rvert\right)
    \quad\text{and}\quad \bar\eta_k \ge \beta\,\bar\eta_b

(:data:`RISE_FACTOR` :math:`\rho = 2`: for a positive loss, more than twice the lowest mean;
:data:`MARGIN` :math:`\mu = 10^{-3}` of the first window's mean, so that noise around a loss converged to
near 0 cannot trigger it; :data:`BACKOFF` :math:`\beta = 1/2`: ``auto`` did not halve the step), and
:data:`PATIENCE` (3) risen windows in a row give the warning. A window without a finite loss has risen
(its mean is infinite). It is a heuristic on the training loss, not a proof of divergence: a loss that is
meant to rise (a curriculum that makes the data harder, a restart of the schedule) can trigger it, and a
divergence slower than the criterion, or one in which ``auto`` halves the step, does not.

Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "BACKOFF",
    "DEFAULT_WINDOW",
    "MARGIN",
    "PATIENCE",
    "RISE_FACTOR",
    "Criterion",
    "DivergenceWarning",
    "Watch",
    "WatchState",
    "Window",
]

#: The default window, in optimizer steps that were given a loss.
DEFAULT_WINDOW = 50
#: A window has risen when its mean loss exceeds this multiple of the lowest window mean so far...
RISE_FACTOR = 2.0
#: ...by more than this fraction of the first window's mean (noise around a loss near 0 never has)...
MARGIN = 1e-3
#: ...while the mean effective learning rate is at least this fraction of the one at the lowest window.
BACKOFF = 0.5
#: This many risen windows in a row give the warning.
PATIENCE = 3

#: What a window sums on the device, each finite value with its count: ``[loss, lr, smoothness, grad_norm]``.
_SUMMED = ("loss", "lr_effective", "smoothness", "grad_norm")


class DivergenceWarning(UserWarning):
    """The training loss rose for several windows while ``auto`` kept its step (see :mod:`lightning_l0l1.watch`)."""


@dataclass(frozen=True)
class Window:
    """One closed window, read on the host.

    Attributes:
        first, last: the optimizer steps it spans (1-based, as the clipper counts them).
        loss: the mean of its finite losses (``inf`` where none was finite).
        lr_effective: the mean effective learning rate of the first param group (NaN: none finite).
        smoothness: the mean secant smoothness (NaN: no pair yet).
        grad_norm: the mean global gradient norm before scaling (NaN: none finite).
        nonfinite: how many of its losses were NaN or infinite.
    """

    first: int
    last: int
    loss: float
    lr_effective: float
    smoothness: float
    grad_norm: float
    nonfinite: int = 0

    @classmethod
    def from_sums(cls, first: int, last: int, steps: int, sums: Sequence[float]) -> Window:
        """From the device sums ``[sum, count] * len(_SUMMED)``."""
        means = [s / n if n > 0 else math.nan for s, n in zip(sums[0::2], sums[1::2])]
        loss = means[0] if sums[1] > 0 else math.inf
        return cls(first, last, loss, means[1], means[2], means[3], steps - int(sums[1]))

    @property
    def steps(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass
class Criterion:
    """The host-side judgement over closed windows, in order (pure Python: testable on made-up windows).

    Attributes:
        rise: :data:`RISE_FACTOR`. margin: :data:`MARGIN`. backoff: :data:`BACKOFF`. patience: :data:`PATIENCE`.
        first: the first window (its mean sets the absolute margin).
        best: the window with the lowest mean loss so far.
        risen: the risen windows of the current run (empty after a window that has not risen).
    """

    rise: float = RISE_FACTOR
    margin: float = MARGIN
    backoff: float = BACKOFF
    patience: int = PATIENCE
    first: Optional[Window] = None
    best: Optional[Window] = None
    risen: list[Window] = field(default_factory=list)

    def judge(self, w: Window) -> bool:
        """Take window ``w``; true when it completes :attr:`patience` risen windows in a row."""
        if self.first is None:
            self.first = w
        best = self.best
        if best is None or w.loss < best.loss:  # NaN never gets here: a window's loss is finite or inf
            self.best, self.risen = w, []
            return False
        floor = self.margin * abs(self.first.loss) if math.isfinite(self.first.loss) else 0.0
        # `rise` times the lowest mean, for a positive loss; by more than its magnitude for a negative one
        above = (self.rise - 1.0) * abs(best.loss)
        kept = not (w.lr_effective < self.backoff * best.lr_effective)  # NaN: nothing says auto backed off
        if w.loss - best.loss > max(above, floor) and kept:
            self.risen.append(w)
        else:
            self.risen = []
        return len(self.risen) >= self.patience


def _g(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def message(c: Criterion, key: Optional[int] = None) -> str:
    """What the warning says: the loss at its best and now, the effective learning rate and the estimate over
    those windows, and what to do."""
    assert c.best is not None and c.risen
    best, now = c.best, c.risen
    which = f" of optimizer {key}" if key is not None else ""
    losses = ", ".join(f"{_g(w.loss)} (steps {w.steps})" for w in now)
    lrs = ", ".join(_g(w.lr_effective) for w in now)
    smooth = ", ".join(_g(w.smoothness) for w in now)
    nonfinite = sum(w.nonfinite for w in now)
    bad = f"; {nonfinite} of those steps had a non-finite loss" if nonfinite else ""
    return (
        f"the training loss{which} rose while `mode='auto'` kept its step. Its mean over windows of "
        f"{best.last - best.first + 1} steps was {_g(best.loss)} at its lowest (steps {best.steps}), then {losses}: "
        f"{len(now)} windows in a row more than {c.rise:g} times that{bad}. Over the same windows the effective "
        f"learning rate was {_g(best.lr_effective)}, then {lrs}; the measured smoothness {_g(best.smoothness)}, then "
        f"{smooth}; the gradient norm {_g(best.grad_norm)}, then {', '.join(_g(w.grad_norm) for w in now)}. The "
        "estimate gave `auto` no reason to shorten the step, so this rise is outside what it guards against (e.g. "
        "a learning rate far above the tested range, such as Adam at lr 1, or data or a schedule that change). "
        "Lower the optimizer's learning rate (`lr`), or set the threshold yourself with `mode='clip'` and "
        "`max_norm`. This warning is shown once; `divergence_window=None` turns the watch off."
    )


class _HostCopy:
    """A small device vector on its way to the host: on CUDA copied without blocking into pinned memory (waited
    for in :meth:`get`, a window later, when it has long finished); elsewhere a copy read in :meth:`get`."""

    def __init__(self, values: Tensor) -> None:
        self._event = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values.clone()

    def get(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()  # the window's one host read


@dataclass
class WatchState:
    """One optimizer's watch (not checkpointed: it starts afresh after a resume).

    Attributes:
        sums: the open window's device sums, ``[sum, count]`` of each of ``loss``, ``lr_effective``,
            ``smoothness``, ``grad_norm`` (``None`` before the first loss).
        count: the steps in the open window. first: its first step.
        queued: the window closed last, on its way to the host, with its first and last step.
        criterion: the judgement over the windows read so far.
        warned: the warning was given.
    """

    sums: Optional[Tensor] = None
    count: int = 0
    first: int = 0
    queued: Optional[tuple[_HostCopy, int, int, int]] = None
    criterion: Criterion = field(default_factory=Criterion)
    warned: bool = False


class Watch:
    """The divergence watch over windows of ``window`` steps (see the module's description).

    Example:
        >>> watch = Watch(window=2)
        >>> state = watch.init()
        >>> one = torch.tensor(1.0)
        >>> for step in range(1, 5):
        ...     watch.update(state, step, torch.tensor(float(step)), one, one, one)
        >>> [w.loss for w in (state.criterion.first, state.criterion.best)]
        [1.5, 1.5]
    """

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window

    def init(self) -> WatchState:
        return WatchState()

    def update(
        self, state: WatchState, step: int, loss: Union[Tensor, float], lr_effective: Tensor, smoothness: Tensor,
        grad_norm: Tensor,
    ) -> Optional[Criterion]:
        """Add step ``step``; the criterion the first time it is met (the caller warns), else ``None``.

        Per step: a handful of element-wise kernels on the device. At the end of a window: its sums are queued
        for the host and the window queued before is read (one host read) and judged.
        """
        like = lr_effective
        if state.sums is None or state.sums.device != like.device:
            dtype = torch.float32 if like.device.type == "mps" else torch.float64
            state.sums = torch.zeros(2 * len(_SUMMED), device=like.device, dtype=dtype)
        sums = state.sums
        if not isinstance(loss, Tensor):
            loss = torch.tensor(float(loss))
        values = torch.stack([t.detach().reshape(()).to(sums.device, sums.dtype)
                              for t in (loss, lr_effective, smoothness, grad_norm)])
        ok = torch.isfinite(values)
        sums.add_(torch.stack([torch.where(ok, values, 0.0), ok.to(sums.dtype)], dim=1).reshape(-1))
        if state.count == 0:
            state.first = step
        state.count += 1
        if state.count < self.window:
            return None
        queued, state.queued = state.queued, (_HostCopy(sums), state.first, step, state.count)
        sums.zero_()
        state.count = 0
        if queued is None or state.warned:
            return None
        copy, first, last, steps = queued
        if state.criterion.judge(Window.from_sums(first, last, steps, copy.get())):
            state.warned = True
            return state.criterion
        return None
