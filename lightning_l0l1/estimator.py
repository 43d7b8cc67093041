r"""Online estimation of the (L0, L1) smoothness constants along the training trajectory.

Pure tensor code: this module imports only :mod:`torch`, keeps all its state in tensors on the
gradients' device, and never reads a value on the host.

One measurement per step: the secant smoothness along the step just taken, paired with the
logarithmic mean of the gradient norms at its two ends,

.. math::

    \hat L_t = \frac{\lVert g_{t+1} - g_t\rVert}{\lVert \theta_{t+1} - \theta_t\rVert}, \qquad
    n_t = \mathrm{LM}(\lVert g_t\rVert, \lVert g_{t+1}\rVert), \quad \mathrm{LM}(a, b) = \frac{a - b}{\ln a - \ln b}.

The pairs feed three estimates, all in :class:`EnvelopeState`:

* the envelope :math:`(L_0, L_1) \ge 0`, the line above every pair that is lowest at the pivot
  norm :math:`m` (the geometric mean of the smallest and largest norm seen),
  :math:`\min L_0 + L_1 m` s.t. :math:`L_0 + L_1 n_i \ge \hat L_i`, solved exactly over the
  pairs that can bind it (:data:`CAPACITY` slots);
* ``low``, the smallest smoothness seen;
* ``ratio``, the lower median of :math:`\hat L_i / n_i` over the last :data:`WINDOW` pairs.

:class:`SecantEstimator` forms the pairs from a snapshot of the previous step's gradients and
parameters (:mod:`lightning_l0l1.snapshots`: sampled by default, or whole), or from a midpoint
probe (:meth:`SecantEstimator.probe`). Pairs with a non-finite
value, a zero step or a zero gradient norm are ignored. ``docs/how-it-works.md`` explains the
choices (the log-mean pairing, the envelope, minibatch noise).

References:
    Zhang, He, Sra, Jadbabaie, ICLR 2020. https://arxiv.org/abs/1905.11881
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional, TypeVar, Union

import torch
from torch import Tensor

from lightning_l0l1.gradients import Gradients
from lightning_l0l1.norms import GradGroup, group_norms
from lightning_l0l1.snapshots import FullSnapshot, Snapshot, make_snapshot

__all__ = [
    "CAPACITY",
    "PENDING",
    "WINDOW",
    "EnvelopeState",
    "EstimatorState",
    "MomentumState",
    "Secant",
    "SecantEstimator",
    "amplification_update",
    "envelope_fit",
    "envelope_fold",
    "envelope_init",
    "envelope_record",
    "envelope_update",
    "log_mean",
    "momentum_init",
    "secant_pair",
]


_S = TypeVar("_S", bound="_TensorState")


class _TensorState:
    """A dataclass of tensors: moved, saved and restored field by field."""

    #: fields stored as int64 (all others float64)
    INTEGER_FIELDS: ClassVar[tuple[str, ...]] = ()

    def to(self: _S, device: torch.device) -> _S:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Tensor]:
        """Every field as a CPU tensor (a copy)."""
        return {f.name: getattr(self, f.name).detach().cpu().clone() for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def _restore(cls: type[_S], sd: dict[str, Any], empty: _TensorState, device: torch.device) -> _S:
        # explicit dtypes: a list of Python floats would otherwise become float32; a field missing
        # from ``sd`` (saved before it existed) has measured nothing, which is what ``empty`` holds
        return cls(**{
            f.name: torch.as_tensor(
                sd[f.name] if f.name in sd else getattr(empty, f.name),
                dtype=torch.int64 if f.name in cls.INTEGER_FIELDS else torch.float64,
            ).to(device)
            for f in fields(cls)  # type: ignore[arg-type]
        })


@dataclass
class EnvelopeState(_TensorState):
    r"""The pairs that can bind an upper envelope, its fitted line, and the recent ratios.

    Attributes:
        norms: ``[C]`` gradient norms of the kept pairs (0: empty slot).
        smooth: ``[C]`` their smoothness.
        lo, hi: log of the smallest and largest norm of any valid pair seen (the pivot's range).
        l0, l1: the fitted constants (0-d).
        pairs: number of valid pairs seen (0-d int64).
        last: the last valid secant smoothness (0-d).
        last_norm: the gradient norm that pair is paired with (the log-mean of its endpoints).
        low: the smallest valid smoothness seen (``inf`` before the first pair).
        window: ``[WINDOW]`` the ratios :math:`\hat L_i / n_i` of the most recent valid pairs, a ring
            buffer written at ``pairs % WINDOW`` (NaN: empty slot).
        ratio: their lower median (0 before the first pair).
        pending_norms, pending_smooth: ``[PENDING]`` pairs recorded but not yet in the hull and the
            fit (:func:`envelope_record`; norm 0: empty slot).
    """

    INTEGER_FIELDS: ClassVar[tuple[str, ...]] = ("pairs",)

    norms: Tensor
    smooth: Tensor
    lo: Tensor
    hi: Tensor
    l0: Tensor
    l1: Tensor
    pairs: Tensor
    last: Tensor
    last_norm: Tensor
    low: Tensor
    window: Tensor
    ratio: Tensor
    pending_norms: Tensor
    pending_smooth: Tensor

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], device: torch.device) -> EnvelopeState:
        """Restore :meth:`state_dict` (or a plain dict of lists); missing fields start empty."""
        return cls._restore(sd, envelope_init(), device)


@dataclass
class MomentumState(_TensorState):
    """How much longer an optimizer's steps are than the steps set for it (SGD with momentum).

    Attributes:
        amp_window: ``[WINDOW]`` the most recent ratios of the step taken to the step set (NaN: empty).
        amp_count: how many were recorded (0-d int64).
        amp: their lower median (1 before the first).
        intended: the length of the step set at the last step (NaN: none recorded).
    """

    INTEGER_FIELDS: ClassVar[tuple[str, ...]] = ("amp_count",)

    amp_window: Tensor
    amp_count: Tensor
    amp: Tensor
    intended: Tensor

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], device: torch.device) -> MomentumState:
        """Restore :meth:`state_dict`; missing fields start empty."""
        return cls._restore(sd, momentum_init(), device)


#: Capacity of the envelope: pairs that can bind it (the vertices of the upper hull of all pairs
#: seen, with the origin). Points below that hull can never bind a line above it and are dropped,
#: so the envelope is exact while the hull has at most this many vertices (a handful in practice).
CAPACITY = 16

#: Number of recent pairs whose lower median ratio :math:`\hat L / n` is ``ratio``.
WINDOW = 20

#: The estimator enters its pairs into the hull and refits the line once per this many pairs (and
#: whenever the estimates are read): the hull and the fit are a few dozen small operations, the
#: per-step estimates that steer ``auto`` (``low``, ``ratio``) are kept current at every pair.
PENDING = 8


def envelope_init(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> EnvelopeState:
    """An empty envelope (float64: the fit spans many decades of norms)."""
    z = torch.zeros((), device=device, dtype=dtype)
    big = torch.finfo(dtype).max
    return EnvelopeState(
        norms=torch.zeros(CAPACITY, device=device, dtype=dtype),
        smooth=torch.zeros(CAPACITY, device=device, dtype=dtype),
        lo=torch.full((), big, device=device, dtype=dtype),
        hi=torch.full((), -big, device=device, dtype=dtype),
        l0=z.clone(),
        l1=z.clone(),
        pairs=torch.zeros((), device=device, dtype=torch.int64),
        last=z.clone(),
        last_norm=z.clone(),
        low=torch.full((), math.inf, device=device, dtype=dtype),
        window=torch.full((WINDOW,), math.nan, device=device, dtype=dtype),
        ratio=z.clone(),
        pending_norms=torch.zeros(PENDING, device=device, dtype=dtype),
        pending_smooth=torch.zeros(PENDING, device=device, dtype=dtype),
    )


def momentum_init(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> MomentumState:
    """No ratio measured yet: ``amp`` is 1."""
    return MomentumState(
        amp_window=torch.full((WINDOW,), math.nan, device=device, dtype=dtype),
        amp_count=torch.zeros((), device=device, dtype=torch.int64),
        amp=torch.ones((), device=device, dtype=dtype),
        intended=torch.full((), math.nan, device=device, dtype=dtype),
    )


def log_mean(a: Tensor, b: Tensor) -> Tensor:
    r"""Logarithmic mean :math:`(a - b)/(\ln a - \ln b)`, :math:`a` when :math:`a = b` (branch-free).

    Symmetric to the bit: swapping ``a`` and ``b`` negates both differences exactly.
    """
    diff = torch.log(a) - torch.log(b)
    # (a - b) / diff is NaN where a == b: that branch is not taken there
    return torch.where(diff.abs() < 1e-6, (a + b) / 2, (a - b) / diff)


def _binding(norms: Tensor, smooth: Tensor) -> Tensor:
    """Which points can bind a line ``L0 + L1 n`` with ``L0, L1 >= 0`` lying above all of them.

    A point cannot bind if another lies at a smaller-or-equal norm with a larger-or-equal
    smoothness (the line rises with n), or if it lies on or below the segment between two
    others, or between the origin and another (a line above both ends is above the segment).
    Ties keep the first of equal points.
    """
    has = norms > 0
    n, L = norms, smooth
    idx = torch.arange(n.numel(), device=n.device)
    # dominance: j != k with n_j <= n_k, L_j >= L_k (strict in one, or equal with j < k)
    le_n = n[:, None] <= n[None, :]
    ge_l = L[:, None] >= L[None, :]
    strict = (n[:, None] < n[None, :]) | (L[:, None] > L[None, :]) | (idx[:, None] < idx[None, :])
    dominated = (has[:, None] & le_n & ge_l & strict & (idx[:, None] != idx[None, :])).any(dim=0)
    # below a segment (i, j) with n_i < n_k < n_j; the origin is the extra left end i = -1
    ni = torch.cat([n.new_zeros(1), n])
    li = torch.cat([L.new_zeros(1), L])
    hi_ok = torch.cat([torch.ones(1, dtype=torch.bool, device=n.device), has])
    span = n[None, :] - ni[:, None]  # [I, J]
    ok_ij = hi_ok[:, None] & has[None, :] & (span > 0)
    t = (n[None, None, :] - ni[:, None, None]) / torch.where(ok_ij, span, 1.0)[:, :, None]  # [I, J, K]
    inside = ok_ij[:, :, None] & (t > 0) & (t < 1)
    interp = li[:, None, None] + t * (L[None, :, None] - li[:, None, None])
    below = (inside & (interp >= L[None, None, :])).flatten(0, 1).any(dim=0)
    return has & ~dominated & ~below


def _compact(norms: Tensor, smooth: Tensor, keep: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """The kept pairs, sorted by norm, in ``capacity`` slots (zeros after them).

    When ``m`` pairs are kept and ``m > capacity``, the ``m - capacity`` smallest gaps in log-norm
    between kept neighbours are closed: each run of pairs joined that way becomes one pair (its
    smallest norm, its largest smoothness). Any line with ``L1 >= 0`` above that point is above all
    of them, so the envelope stays a valid upper bound (a slight over-estimate instead of dropped
    pairs). One excess pair merges the two closest. Branch-free, no host read.
    """
    size = norms.numel()
    inf = torch.full_like(norms, float("inf"))
    order = torch.argsort(torch.where(keep, norms, inf), stable=True)
    n, L, k = norms[order], smooth[order], keep[order]
    both = k[1:] & k[:-1]
    gaps = torch.where(both, torch.log(n[1:].clamp_min(1e-300)) - torch.log(n[:-1].clamp_min(1e-300)), inf[1:])
    excess = (k.sum() - capacity).clamp_min(0)
    # rank of each gap (stable: the first of equal gaps closes first); the `excess` smallest close
    rank = torch.empty_like(order[1:]).scatter_(
        0, torch.argsort(gaps, stable=True), torch.arange(size - 1, device=norms.device)
    )
    closed = rank < excess
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=norms.device), ~closed])
    group = torch.cumsum(starts.long(), 0) - 1
    zero = torch.zeros(size, dtype=norms.dtype, device=norms.device)
    g_n = zero.scatter_reduce(0, group, torch.where(k, n, inf), "amin", include_self=False)
    g_l = zero.scatter_reduce(0, group, torch.where(k, L, -inf), "amax", include_self=False)
    # (a float count, not a bool reduction: that one is not implemented on every device)
    g_k = zero.scatter_reduce(0, group, k.to(norms.dtype), "amax", include_self=False) > 0
    out_n = torch.where(g_k, g_n, zero)[:capacity]
    out_l = torch.where(g_k, g_l, zero)[:capacity]
    return out_n, out_l


def envelope_record(state: EnvelopeState, norm: Tensor, smooth: Tensor) -> EnvelopeState:
    """Add one pair like :func:`envelope_update`, except that it waits in ``pending`` for the next
    :func:`envelope_fold` to enter the hull and the fit (``l0``, ``l1``); everything else (``low``,
    ``ratio``, ``last``, ``pairs`` ...) is current. Call :func:`envelope_fold` at least every
    :data:`PENDING` records, and before reading ``l0``, ``l1``, ``norms`` or ``smooth``."""
    dtype = state.smooth.dtype
    norm, smooth = norm.to(dtype), smooth.to(dtype)
    valid = torch.isfinite(norm) & torch.isfinite(smooth) & (norm > 0) & (smooth >= 0)
    safe_norm = torch.where(valid, norm, 1.0)
    log_n = torch.log(safe_norm)
    window, med = _ring_median(state.window, state.pairs, smooth / safe_norm, valid, 0.0)
    at = _slot(state.pairs, state.pending_norms, valid)  # both pending buffers: the same slot
    return dataclasses.replace(
        state,
        lo=torch.where(valid, torch.minimum(state.lo, log_n), state.lo),
        hi=torch.where(valid, torch.maximum(state.hi, log_n), state.hi),
        pairs=state.pairs + valid,
        last=torch.where(valid, smooth, state.last),
        last_norm=torch.where(valid, norm, state.last_norm),
        low=torch.where(valid, torch.minimum(state.low, smooth), state.low),
        window=window,
        ratio=med,
        pending_norms=torch.where(at, norm, state.pending_norms),
        pending_smooth=torch.where(at, smooth, state.pending_smooth),
    )


def envelope_fold(state: EnvelopeState) -> EnvelopeState:
    """The pending pairs entered into the hull and the line refit (pending emptied)."""
    norms = torch.cat([state.norms, state.pending_norms])
    smooths = torch.cat([state.smooth, state.pending_smooth])
    norms, smooths = _compact(norms, smooths, _binding(norms, smooths), state.norms.numel())
    l0, l1 = envelope_fit(norms, smooths, torch.exp((state.lo + state.hi) / 2))
    empty = torch.zeros_like(state.pending_norms)
    return dataclasses.replace(state, norms=norms, smooth=smooths, l0=l0, l1=l1, pending_norms=empty,
                               pending_smooth=empty.clone())


def envelope_update(state: EnvelopeState, norm: Tensor, smooth: Tensor) -> EnvelopeState:
    """Add one (norm, smoothness) pair; an invalid pair (non-finite, norm <= 0, smooth < 0) changes nothing.

    Returns a new state (the input's tensors are not modified).
    """
    return envelope_fold(envelope_record(state, norm, smooth))


def _slot(count: Tensor, ring: Tensor, valid: Tensor) -> Tensor:
    """A mask over ``ring``: true at slot ``count % len(ring)`` if ``valid``, nowhere otherwise (a write
    through ``torch.where``: no gather of the old value, no host read)."""
    return (torch.arange(ring.numel(), device=ring.device) == count % ring.numel()) & valid


def _ring_median(
    window: Tensor, count: Tensor, value: Tensor, valid: Tensor, empty: Union[Tensor, float]
) -> tuple[Tensor, Tensor]:
    """Write ``value`` at slot ``count % len(window)`` if ``valid`` (else leave the window as it is);
    return the new window and the lower median of its filled (non-NaN) slots, ``empty`` if none."""
    window = torch.where(_slot(count, window, valid), value, window)
    # NaN sorts last. Not `torch.nanmedian`: on CUDA it reads the NaN count on the host to pick its
    # index, a sync per step; here the index stays on the device.
    filled = torch.count_nonzero(window == window)  # NaN != NaN
    lower = window.sort().values.gather(0, ((filled - 1) // 2).clamp_min(0).view(1))[0]
    return window, torch.where(filled > 0, lower, empty)


def amplification_update(state: MomentumState, taken: Tensor) -> MomentumState:
    """Record ``taken / state.intended``: how much longer the optimizer's step was than the one set.

    A non-finite or non-positive ratio (no step set yet, a skipped step) changes nothing.
    """
    dtype = state.amp.dtype
    ratio = taken.to(dtype) / state.intended
    valid = torch.isfinite(ratio) & (ratio > 0)
    window, med = _ring_median(state.amp_window, state.amp_count, ratio, valid, 1.0)
    return dataclasses.replace(state, amp_window=window, amp_count=state.amp_count + valid, amp=med)


def envelope_fit(norms: Tensor, smooth: Tensor, pivot: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The line :math:`L_0 + L_1 n` above all given pairs (``norms > 0``), lowest at ``pivot``.

    ``pivot`` defaults to the geometric mean of the smallest and largest norm. The optimum of this
    two-variable linear program is at a breakpoint of the intercept function: a slope through two
    pairs, a slope through one pair and the origin, or 0. All of them are evaluated at once
    (a fixed-size batched computation), so the fit is exact and branch-free. Ties go to the
    larger slope.

    Returns ``(l0, l1)``, both 0 when there is no pair.
    """
    has = norms > 0
    big = torch.finfo(norms.dtype).max
    zero = torch.zeros((), dtype=norms.dtype, device=norms.device)
    if pivot is None:
        log_n = torch.log(norms.clamp_min(1e-300))
        lo = torch.where(has, log_n, torch.full_like(log_n, big)).min()
        hi = torch.where(has, log_n, torch.full_like(log_n, -big)).max()
        pivot = torch.exp((lo + hi) / 2)
    # Candidate slopes: pairwise, through the origin, and 0; invalid ones become 0 (always a candidate).
    dn = norms[:, None] - norms[None, :]
    pair_ok = has[:, None] & has[None, :] & (dn > 0)
    pair = torch.where(pair_ok, (smooth[:, None] - smooth[None, :]) / torch.where(pair_ok, dn, 1.0), zero)
    ratio = torch.where(has, smooth / norms.clamp_min(1e-300), zero)
    cands = torch.cat([pair.flatten(), ratio, zero.view(1)]).clamp_min(0)
    gap = torch.where(has[None, :], smooth[None, :] - cands[:, None] * norms[None, :], -big)
    intercept = gap.amax(dim=1).clamp_min(0)
    objective = intercept + cands * pivot
    best = objective.min()
    tie = objective <= best + best.abs() * 1e-12
    k = torch.argmax(torch.where(tie, cands, torch.full_like(cands, -1.0))).view(1)
    any_pair = has.any()
    # gather, not `intercept[k]`: indexing with a 0-d tensor reads it on the host (a sync per step)
    l0, l1 = intercept.gather(0, k).squeeze(0), cands.gather(0, k).squeeze(0)
    return torch.where(any_pair, l0, zero), torch.where(any_pair, l1, zero)


def secant_pair(dg: Tensor, dtheta: Tensor, norm_prev: Tensor, norm_cur: Tensor) -> tuple[Tensor, Tensor]:
    """The (representative norm, smoothness) of one step: ``(LM(|g_t|, |g_t+1|), |dg| / |dtheta|)``.

    A zero step gives a non-finite smoothness, which :func:`envelope_update` ignores.
    """
    smooth = torch.where(dtheta > 0, dg / dtheta, math.nan)
    return log_mean(norm_prev, norm_cur), smooth


@dataclass
class Secant:
    """One measurement: the pair that enters the envelope, and the length of the step it was taken over.

    Attributes:
        norm: the gradient norm the pair is paired with (the log-mean of the step's end norms).
        smooth: the secant smoothness :math:`\\lVert\\Delta g\rVert / \\lVert\\Delta\theta\rVert`.
        step: the length of the whole step taken, :math:`\\lVert\theta_{t+1} - \theta_t\rVert`.
    """

    norm: Tensor
    smooth: Tensor
    step: Tensor


@dataclass
class EstimatorState:
    """One optimizer's estimator state.

    Attributes:
        envelope: the estimates (:class:`EnvelopeState`).
        snapshot: the gradients and parameters (sampled or whole) of the step a pair starts from.
        snap_step: the step index the snapshot was taken at (-2: none usable).
        probe_params: the parameters to probe after the step (the probe only), in snapshot order.
        unfolded: pairs recorded since the envelope's hull was last refit (see :meth:`folded`).
        snap_ids: which parameters the snapshot holds, in its order (see
            :attr:`~lightning_l0l1.gradients.Gradients.ids`; ``None``: not known, a snapshot restored from a
            checkpoint written before they were kept, matched by shape at its first use).
        other, other_step, other_ids: the snapshot before it, of another set of parameters (kept only
            while the set of parameters with a gradient changes from step to step: alternating heads),
            its step and its parameters.
    """

    envelope: EnvelopeState
    snapshot: Snapshot
    snap_step: int = -2
    probe_params: list[Tensor] = dataclasses.field(default_factory=list)
    unfolded: int = 0
    snap_ids: Optional[tuple[tuple[int, int], ...]] = None
    other: Optional[Snapshot] = None
    other_step: int = -2
    other_ids: Optional[tuple[tuple[int, int], ...]] = None

    def record(self, norm: Tensor, smooth: Tensor) -> None:
        """Add a pair: ``low``, ``ratio`` and the rest at once, the hull and the fit every :data:`PENDING`."""
        self.envelope = envelope_record(self.envelope, norm, smooth)
        self.unfolded += 1
        if self.unfolded >= PENDING:
            self.folded()

    def folded(self) -> EnvelopeState:
        """The envelope with every recorded pair in its hull and fit (what ``l0``, ``l1`` are read from)."""
        if self.unfolded:
            self.envelope = envelope_fold(self.envelope)
            self.unfolded = 0
        return self.envelope

    def to(self, device: torch.device) -> None:
        if self.envelope.l0.device != device:
            self.envelope = self.envelope.to(device)
            self.snapshot.to(device)
            if self.other is not None:
                self.other.to(device)

    def state_dict(self, with_buffers: bool) -> dict[str, Any]:
        """``env`` (plain lists); with ``with_buffers``, also the snapshot and its step, if there is one, and
        the one of the set before (alternating parameter sets).

        A snapshot taken at a non-finite step is kept without its gradients (zeros, and ``nonfinite``): every
        pair it starts is invalid, which the restored one's non-finite norm reproduces, while the step length
        measured from its parameters is what the uninterrupted run reads next. One whose parameters are not
        finite either is left out.
        """
        out: dict[str, Any] = {"env": {k: v.tolist() for k, v in self.folded().state_dict().items()}}
        if not with_buffers:
            return out
        main = _saved_snapshot(self.snapshot)
        if main is not None:
            out["snapshot"] = main
            out["snap_step"] = self.snap_step
            if self.snap_ids is not None:
                out["snap_ids"] = [list(i) for i in self.snap_ids]
            if self.other is not None and self.other_ids is not None:
                other = _saved_snapshot(self.other)
                if other is not None:
                    out["other"] = {"snapshot": other, "snap_step": self.other_step,
                                    "snap_ids": [list(i) for i in self.other_ids]}
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], snapshot: Snapshot) -> Optional[EstimatorState]:
        """What :meth:`state_dict` saved, on the CPU, with its snapshot restored into ``snapshot`` (an
        empty one of the kind in use; a saved snapshot of another kind is dropped); ``None`` if it holds
        no estimate."""
        if sd.get("env") is None:
            return None
        state = cls(EnvelopeState.from_state_dict(sd["env"], torch.device("cpu")), snapshot)
        if sd.get("snapshot"):
            _load_snapshot(snapshot, sd["snapshot"], int(sd["snap_step"]))
            if snapshot.valid:
                state.snap_step = int(sd["snap_step"])
                ids = sd.get("snap_ids")
                state.snap_ids = None if ids is None else tuple((int(g), int(j)) for g, j in ids)
            other = sd.get("other")
            if other and state.snap_ids is not None:
                spare = make_snapshot(snapshot.kind, getattr(snapshot, "requested_offload", False),
                                      getattr(snapshot, "seed", 0))
                _load_snapshot(spare, other["snapshot"], int(other["snap_step"]))
                if spare.valid:
                    state.other, state.other_step = spare, int(other["snap_step"])
                    state.other_ids = tuple((int(g), int(j)) for g, j in other["snap_ids"])
        return state


def _saved_snapshot(snapshot: Snapshot) -> Optional[dict[str, Any]]:
    """``snapshot`` as a checkpoint holds it (see :meth:`EstimatorState.state_dict`); ``None``: not kept."""
    if not snapshot.valid or snapshot.norm is None:
        return None
    sd = snapshot.state_dict()
    if not sd or bool(torch.isfinite(snapshot.norm)):
        return sd or None
    if not all(bool(torch.isfinite(t).all()) for t in sd["params"]):
        return None
    return {**sd, "grads": [torch.zeros_like(t) for t in sd["grads"]], "norm": torch.zeros_like(sd["norm"]),
            "nonfinite": True}


def _load_snapshot(snapshot: Snapshot, sd: dict[str, Any], step: int) -> None:
    """Restore what :func:`_saved_snapshot` kept: one taken at a non-finite step gets a NaN norm back."""
    snapshot.load(sd, torch.device("cpu"), step)
    if snapshot.valid and sd.get("nonfinite") and snapshot.norm is not None:
        snapshot.norm = torch.full_like(snapshot.norm, math.nan)


def _at_midpoint(
    params: list[Tensor], before: list[Tensor], now: list[Tensor],
    gradient: Callable[[Sequence[Tensor]], Sequence[Optional[Tensor]]],
) -> list[Tensor]:
    """``gradient(params)`` with ``params`` moved halfway from ``now`` back to ``before``, then restored
    to ``now`` bit for bit; ``None`` gradients (unused parameters) as zeros."""
    try:
        for p, b in zip(params, before):
            p.add_(b).mul_(0.5)  # the midpoint
        with torch.enable_grad():
            got = list(gradient(params))
    finally:
        torch._foreach_copy_(list(params), now)  # pyright: ignore[reportPrivateImportUsage]
    if len(got) != len(params):
        raise RuntimeError(f"The probe's gradient function returned {len(got)} tensors for {len(params)} parameters.")
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(got, params)]


class SecantEstimator:
    """Forms one secant pair per step and adds it to the envelope.

    The pair of step :math:`t` joins the snapshot of step :math:`t-1` (the raw gradient and the
    parameters there) to the raw gradient and parameters now; the snapshot is then refreshed. With
    ``every = K`` a snapshot is taken only on the step before every K-th (and at step 0), so a pair
    forms every K steps. With ``probe``, no pair forms here: :meth:`probe` forms it after the step.

    Args:
        norm_type: the p of the norms.
        every: form a pair every this many steps.
        offload: keep a full snapshot in host memory.
        probe: pairs come from :meth:`probe` (needs ``snapshot="full"``).
        foreach: use the ``_foreach`` kernels (``None``: where supported).
        snapshot: ``"sampled"`` (:class:`~lightning_l0l1.snapshots.SampledSnapshot`) or ``"full"``
            (:class:`~lightning_l0l1.snapshots.FullSnapshot`).
        seed: the sampled snapshot's seed.
    """

    def __init__(
        self, norm_type: float, every: int = 1, offload: bool = False, probe: bool = False,
        foreach: Optional[bool] = None, snapshot: str = "full", seed: int = 0,
    ) -> None:
        self.norm_type, self.every, self.offload, self.probe_enabled, self.foreach = (
            norm_type, every, offload, probe, foreach
        )
        self.snapshot, self.seed = snapshot, seed

    def new_snapshot(self) -> Snapshot:
        return make_snapshot(self.snapshot, self.offload, self.seed)

    def init(self, device: torch.device) -> EstimatorState:
        return EstimatorState(envelope_init(device), self.new_snapshot())

    def observe(self, state: EstimatorState, grads: Gradients, norm: Tensor, t: int) -> Optional[Secant]:
        """Step ``t``'s measurement from the raw gradients ``grads`` (global norm ``norm``), if one forms.

        Raises:
            RuntimeError: with ``probe``, for sharded gradients.
        """
        local_grads, params = grads.local()
        snap = state.snapshot
        take = t == 0 or (t + 1) % self.every == 0
        if self.probe_enabled:
            if not grads.whole:
                raise RuntimeError(
                    "The probe (`probe_loss=` / `probe=True`) needs whole gradients; this optimizer's are "
                    "sharded (FSDP) or DTensors. Use the default minibatch secant (no probe) under sharding."
                )
            state.snap_step, state.probe_params = -2, []
            if take:
                snap.take(local_grads, params, norm, t)
                state.snap_step, state.probe_params = t, [p for ps in grads.params for p in ps]
            return None
        secant = None
        ids = grads.ids
        same = state.snap_ids is None or state.snap_ids == ids  # (unknown ids: matched by shape)
        other = state.other
        if state.snap_step == t - 1 and snap.valid and not same and not grads.distributed:
            if (other is not None and state.other_step == t - 2 and state.other_ids == ids
                    and other.matches(local_grads)):
                # the same parameters as two steps ago (alternating heads): the secant of that step's
                # objective over the last two steps; no single step's length
                d = other.difference_norms(local_grads, params, self.norm_type)
                pair_norm, smooth = secant_pair(d[0], d[1], other.norm, norm)  # type: ignore[arg-type]
                state.record(pair_norm, smooth)
                secant = Secant(pair_norm, smooth, self._step_length(state, grads, d[1]))
            else:
                secant = self._partial(state, grads, norm, local_grads, params)
        elif state.snap_step == t - 1 and same and snap.matches(local_grads):
            if grads.distributed:  # local parts: reduced like the gradients
                dg, dp = snap.differences(local_grads, params, self.norm_type)
                d = grads.norms(self.norm_type, self.foreach,
                                groups=[grads.like(dg, snap.flat), grads.like(dp, snap.flat)])
            else:  # every gradient whole here: the local norms are the global ones
                d = snap.difference_norms(local_grads, params, self.norm_type)
            pair_norm, smooth = secant_pair(d[0], d[1], snap.norm, norm)  # type: ignore[arg-type]
            state.record(pair_norm, smooth)
            secant = Secant(pair_norm, smooth, d[1])
        if take:
            if not same and self.every == 1 and not grads.distributed and state.snap_step == t - 1:
                # the set changed: keep the last snapshot (left intact) for the step after this one
                spare = other if other is not None else self.new_snapshot()
                state.other, state.other_step, state.other_ids = snap, state.snap_step, state.snap_ids
                state.snapshot = snap = spare
            else:
                state.other, state.other_step, state.other_ids = None, -2, None
            snap.take(local_grads, params, norm, t)
            state.snap_step, state.snap_ids = t, ids
        return secant

    def _partial(
        self, state: EstimatorState, grads: Gradients, norm: Tensor, local_grads: list[Tensor], params: list[Tensor]
    ) -> Optional[Secant]:
        """The pair over the parameters that have a gradient now and had one at the snapshot (the set of
        parameters with a gradient changed: alternating heads, experts without tokens, layers unfrozen or
        param groups added): the smoothness and the step length over those alone, paired with the whole
        gradient norms at both ends. ``None`` if no parameter is in both (or one changed shape)."""
        snap = state.snapshot
        assert state.snap_ids is not None
        now = {pid: j for j, pid in enumerate(grads.ids)}
        at = [now.get(pid) for pid in state.snap_ids]
        if all(j is None for j in at) or any(
            j is not None and tuple(local_grads[j].shape) != shape for j, shape in zip(at, snap.layout)
        ):
            return None
        d = snap.partial_difference_norms([None if j is None else local_grads[j] for j in at],
                                          [None if j is None else params[j] for j in at], self.norm_type)
        pair_norm, smooth = secant_pair(d[0], d[1], snap.norm, norm)  # type: ignore[arg-type]
        state.record(pair_norm, smooth)
        return Secant(pair_norm, smooth, self._step_length(state, grads, d[1]))

    def _step_length(self, state: EstimatorState, grads: Gradients, like: Tensor) -> Tensor:
        """The length of the last step, ``||theta_t - theta_(t-1)||`` over the parameters the snapshot of
        step ``t - 1`` holds (those that step moved, whether they have a gradient now or not); NaN (no
        length: the rule ignores it) where one of them is gone from the optimizer."""
        assert state.snap_ids is not None
        now = [grads.param(pid) for pid in state.snap_ids]
        if any(p is None or tuple(p.shape) != shape for p, shape in zip(now, state.snapshot.layout)):
            return torch.full_like(like, math.nan)
        return state.snapshot.partial_difference_norms([None] * len(now), now, self.norm_type)[1].to(like.dtype)

    def probe(
        self,
        state: EstimatorState,
        t: int,
        gradient: Callable[[Sequence[Tensor]], Sequence[Optional[Tensor]]],
        reduce: Optional[Callable[[list[Tensor]], None]] = None,
    ) -> Optional[Secant]:
        """The midpoint pair of the step just taken (``t`` steps so far), if the last step took a snapshot.

        The parameters are moved to the midpoint of the step, ``gradient(params)`` is evaluated
        there, and the parameters are restored bit for bit. See :meth:`GradientClipper.probe`.
        """
        snap, params = state.snapshot, state.probe_params
        assert isinstance(snap, FullSnapshot)
        if not snap.valid or state.snap_step != t - 1 or not params:
            return None
        state.snap_step, state.probe_params = -2, []  # one probe per snapshot
        now = [p.detach().clone() for p in params]  # theta_{t+1}, restored exactly afterwards
        before = [b.to(p.device, non_blocking=True) for b, p in zip(snap.params, params)]
        mid_grads = _at_midpoint(params, before, now, gradient)
        if reduce is not None:
            reduce(mid_grads)
        old_grads = [b.to(p.device, non_blocking=True) for b, p in zip(snap.grads, params)]
        dg = [g - o for g, o in zip(mid_grads, old_grads)]
        dp = [(n - b) * 0.5 for n, b in zip(now, before)]
        d = group_norms([GradGroup(replicated=dg), GradGroup(replicated=dp), GradGroup(replicated=mid_grads)],
                        self.norm_type, foreach=self.foreach)
        pair_norm, smooth = secant_pair(d[0], d[1], snap.norm, d[2])  # type: ignore[arg-type]
        state.record(pair_norm, smooth)
        return Secant(pair_norm, smooth, 2 * d[1])  # dp is half the step
