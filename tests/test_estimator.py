"""The online (L0, L1) estimator (lightning_l0l1.estimator) and ``mode="auto"`` of GradientClipper.

Every numeric claim is checked against closed forms or against references computed here from the
recorded iterates (float64, plain Python), never against the estimator's own output:

* functions with known constants, driven by full-batch gradient descent under ``mode="auto"``: the
  constants are verified on a grid first (valid, and tight: neither can be lowered), then the fit must
  be within a factor 1.5 of them, and the fitted line must lie above every secant of the trajectory;
* NaN/Inf gradients and zero steps, the envelope fit as a linear program, host syncs, arguments,
  checkpoints (plain and through Lightning), the CPU snapshot, ``estimate`` in a fixed mode and
  ``estimate_every``.

When more pairs can bind the envelope than its buffer holds (``CAPACITY``), the two closest are merged
into a point that dominates both: the line stays above every pair (tested on 100 hull vertices).

The step ``mode="auto"`` sets from the estimate (the rule, the doubling bound, the momentum ratio, the
speed-up over fixed-step gradient descent) is tested with the other modes' steps, in test_clipper.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import statistics
from collections.abc import Callable, Sequence

import pytest
import torch
from _models import Regressor, loader, make_data, make_net, params_of, trainer
from _reference import BIG_LR, F64, TOL, GradFn, backward, batches, cosh_fn, descend, mlp_opt
from _sync import HostReads
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_l0l1 import L0L1Clipping
from lightning_l0l1.clipper import GradientClipper
from lightning_l0l1.estimator import (
    CAPACITY,
    PENDING,
    WINDOW,
    EnvelopeState,
    envelope_fit,
    envelope_fold,
    envelope_init,
    envelope_record,
    envelope_update,
    log_mean,
    secant_pair,
)
from lightning_l0l1.snapshots import FullSnapshot

FACTOR = 1.5  # the fitted constants must be within this factor of the true ones

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- references


def ref_log_mean(a: float, b: float) -> float:
    return a if a == b else (a - b) / (math.log(a) - math.log(b))


def ref_secants(xs: Sequence[Tensor], gs: Sequence[Tensor]) -> list[tuple[float, float]]:
    """(log-mean gradient norm, ||g_{t+1} - g_t|| / ||x_{t+1} - x_t||) of every valid consecutive pair."""
    out = []
    for i in range(len(xs) - 1):
        dx = math.sqrt(sum(float(v) ** 2 for v in (xs[i + 1] - xs[i]).reshape(-1)))
        dg = math.sqrt(sum(float(v) ** 2 for v in (gs[i + 1] - gs[i]).reshape(-1)))
        a, b = float(gs[i].norm()), float(gs[i + 1].norm())
        if dx > 0 and math.isfinite(dg / dx) and a > 0 and b > 0:
            out.append((ref_log_mean(a, b), dg / dx))
    return out


def constants(clipper: GradientClipper) -> tuple[float, float]:
    stats = clipper.latest()
    return stats["l0l1/L0"], stats["l0l1/L1"]


def assert_above_all(l0: float, l1: float, pairs: Sequence[tuple[float, float]], rtol: float = 1e-6) -> None:
    """The fitted line L0 + L1 n lies above every observed (n, smoothness) pair."""
    assert pairs
    for n, s in pairs:
        assert l0 + l1 * n >= s * (1 - rtol), f"line {l0} + {l1} n is below the secant {s} at n = {n}"


def assert_within(value: float, true: float, factor: float = FACTOR) -> None:
    assert true / factor <= value <= true * factor, f"{value} not within a factor {factor} of {true}"


def check_constants(
    hess_grad: Sequence[tuple[float, float]], l0: float, l1: float, tight: bool = True
) -> float:
    """On a grid of (||Hessian||, ||grad||): (l0, l1) is valid, and if ``tight`` neither can be lowered
    (the grid attains ``max(H - l1 n) = l0`` and ``sup (H - l0)/n = l1``). Returns ``max H/(l0 + l1 n)``."""
    worst = max(h / (l0 + l1 * n) for h, n in hess_grad)
    assert worst <= 1 + 1e-12, "the constants are not valid"
    if tight:
        assert max(h - l1 * n for h, n in hess_grad) >= l0 * (1 - 1e-9)
        assert max((h - l0) / n for h, n in hess_grad if n > 0) >= l1 * (1 - 1e-5)
    return worst


# ---------------------------------------------------------------------------- the test functions


def exp_fn(a: Tensor) -> tuple[GradFn, Callable[[Tensor], float]]:
    """f(x) = exp(a.x): g = a e^{a.x}, H = a a^T e^{a.x}, so ||H|| = ||a|| ||g|| exactly: (0, ||a||)."""
    return (lambda x: a * torch.exp(a @ x)), (lambda x: float(a.norm() ** 2 * torch.exp(a @ x)))


def logistic_fn(a: Tensor) -> tuple[GradFn, Callable[[Tensor], float]]:
    """f(x) = log(1 + exp(-a.x)), u = a.x: ||g|| = ||a|| s(-u), ||H|| = ||a||^2 s(u) s(-u) = ||a|| ||g|| s(u).

    (0, ||a||) is valid and tight as u -> inf (where the descent goes). It is not the only minimal pair:
    every (c, ||a|| - 2 sqrt(c)) is valid too, and the envelope fit chooses among them by its pivot.
    """
    return (
        lambda x: -a * torch.sigmoid(-(a @ x)),
        lambda x: float(a.norm() ** 2 * torch.sigmoid(a @ x) * torch.sigmoid(-(a @ x))),
    )


def quartic_fn(l0: float, l1: float) -> tuple[GradFn, Callable[[Tensor], float]]:
    """f(x) = (L0 L1^2/72) x^4 + (L0/4) x^2: f' = (L0 L1^2/18) x^3 + (L0/2) x, f'' = (L0 L1^2/6) x^2 + L0/2."""
    return (
        lambda x: (l0 * l1**2 / 18) * x**3 + (l0 / 2) * x,
        lambda x: float((l0 * l1**2 / 6) * x**2 + l0 / 2),
    )


def grid_pairs(grad_fn: GradFn, hess_fn: Callable[[Tensor], float], points: Sequence[Tensor]) -> list:
    return [(hess_fn(p), float(grad_fn(p).norm())) for p in points]


def along(make_fn: Callable[[Tensor], tuple[GradFn, Callable[[Tensor], float]]], a: Sequence[float], span: float,
          n: int) -> tuple[Tensor, float, GradFn, list]:
    """A function of u = a.x (``make_fn(a)``): a, ||a||, the gradient, and the grid pairs on the n points
    a u / ||a||^2 with u in [-span, span]."""
    a_t = torch.tensor(a, dtype=F64)
    norm_a = float(a_t.norm())
    grad_fn, hess_fn = make_fn(a_t)
    points = [a_t * u / norm_a**2 for u in torch.linspace(-span, span, n, dtype=F64)]
    return a_t, norm_a, grad_fn, grid_pairs(grad_fn, hess_fn, points)


def axis_points(d: int, scale: float, extra: int = 0) -> list[Tensor]:
    """Points t e_1, t in [-scale, scale] (zero included), and ``extra`` random points."""
    ts = torch.linspace(-scale, scale, 4001, dtype=F64)
    pts = [torch.cat([t.view(1), torch.zeros(d - 1, dtype=F64)]) for t in ts]
    g = torch.Generator().manual_seed(0)
    pts += [torch.randn(d, generator=g, dtype=F64) * scale / 3 for _ in range(extra)]
    return pts


# ---------------------------------------------------------------------------- 1. known constants

COSH_CASES = [(1.0, 1.0, 1), (1.0, 1.0, 4), (10.0, 0.1, 1), (0.1, 10.0, 3), (100.0, 1.0, 2), (1.0, 100.0, 1),
              (0.01, 0.01, 2)]


@pytest.mark.parametrize(("l0", "l1", "d"), COSH_CASES)
def test_cosh_constants_are_recovered(l0, l1, d):
    grad_fn, hess_fn = cosh_fn(l0, l1)
    check_constants(grid_pairs(grad_fn, hess_fn, axis_points(d, 20 / l1, extra=200)), l0, l1)

    # One coordinate dominates: ||g|| ~ 1e4 L0/L1 at the start.
    x0 = [10 / l1] + [0.1 / l1 * (-1) ** i for i in range(1, d)]
    clipper = GradientClipper(mode="auto", nonfinite="propagate")
    xs, gs = descend(grad_fn, x0, clipper, steps=100)
    assert float(gs[-1].norm()) <= TOL, "did not reach a stationary point"
    l0_hat, l1_hat = constants(clipper)
    assert_within(l0_hat, l0)
    assert_within(l1_hat, l1)
    assert_above_all(l0_hat, l1_hat, ref_secants(xs, gs))
    stats = clipper.latest()
    assert stats["l0l1/smoothness_pairs"] == len(xs) - 1
    assert stats["l0l1/lr_suggested"] == 1 / l0_hat


def test_cosh_with_equal_coordinates_only_sees_l1_over_sqrt_d():
    # Along the diagonal ||g|| = sqrt(d) (L0/L1) |sinh| and ||H|| = L0 cosh: the constants of the
    # trajectory are (L0, L1/sqrt(d)), which the estimate must find (it cannot know the rest).
    d = 4
    grad_fn, _ = cosh_fn(1.0, 1.0)
    clipper = GradientClipper(mode="auto", nonfinite="propagate")
    xs, gs = descend(grad_fn, [10.0] * d, clipper, steps=100)
    assert float(gs[-1].norm()) <= TOL
    l0_hat, l1_hat = constants(clipper)
    assert_within(l0_hat, 1.0)
    assert_within(l1_hat, 1 / math.sqrt(d))
    assert_above_all(l0_hat, l1_hat, ref_secants(xs, gs))


EXP_CASES = [[1.0], [0.3, -0.4], [2.0, 1.0, -2.0], [10.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("a", EXP_CASES)
def test_exp_l1_is_recovered_and_l0_is_negligible(a):
    a_t, norm_a, grad_fn, pairs = along(exp_fn, a, 30, 601)
    check_constants(pairs, 0.0, norm_a)
    assert all(h == pytest.approx(norm_a * n, rel=1e-12) for h, n in pairs)  # ||H|| = ||a|| ||g|| exactly

    # From a.x = 5; there is no stationary point: 40 steps take ||g|| down by ~e^-30.
    clipper = GradientClipper(mode="auto", nonfinite="propagate")
    xs, gs = descend(grad_fn, (5 / norm_a**2 * a_t).tolist(), clipper, steps=40, tol=None)
    secants = ref_secants(xs, gs)
    norms = [n for n, _ in secants]
    assert min(norms) < 1e-4 * max(norms)
    l0_hat, l1_hat = constants(clipper)
    assert_within(l1_hat, norm_a)
    assert 0 <= l0_hat <= 1e-6 * l1_hat * min(norms)
    assert_above_all(l0_hat, l1_hat, secants)


@pytest.mark.parametrize("a", EXP_CASES)
def test_logistic_l1_is_recovered_and_l0_is_small(a):
    a_t, norm_a, grad_fn, pairs = along(logistic_fn, a, 40, 801)
    check_constants(pairs, 0.0, norm_a)
    # and the other end of the minimal pairs: (||a||^2/4, 0), the Hessian's maximum at u = 0
    assert max(h for h, _ in pairs) == pytest.approx(norm_a**2 / 4, rel=1e-12)

    # From a.x = -5 (||g|| ~ ||a||) into the flat tail.
    clipper = GradientClipper(mode="auto", nonfinite="propagate")
    xs, gs = descend(grad_fn, (-5 / norm_a**2 * a_t).tolist(), clipper, steps=60, tol=None)
    secants = ref_secants(xs, gs)
    norms = [n for n, _ in secants]
    assert min(norms) < 1e-4 * norm_a
    l0_hat, l1_hat = constants(clipper)
    assert_within(l1_hat, norm_a)
    # L0 is small against L1 ||g|| at the pivot. Not 0: a long step across the sigmoid's bend
    # gives a secant below ||a|| x norm (ratio ~0.88), and the line lowest at the pivot trades a
    # little slope for an intercept of ~10% of L1 * pivot (the data's, checked by assert_above_all).
    pivot = math.sqrt(min(norms) * max(norms))
    assert 0 <= l0_hat <= 0.15 * l1_hat * pivot
    assert_above_all(l0_hat, l1_hat, secants)


QUARTIC_CASES = [(1.0, 1.0), (2.0, 0.5), (0.5, 4.0), (10.0, 10.0)]


@pytest.mark.parametrize(("l0", "l1"), QUARTIC_CASES)
def test_quartic_constants_are_recovered(l0, l1):
    """The claimed (L0, L1) is valid but loose by a factor 2: with y = L1|x|, f''/L0 = y^2/6 + 1/2 and
    (L0 + L1|f'|)/L0 = 1 + y/2 + y^3/18; the sup of their ratio is 1/2 (at x = 0). The tight pair is
    (L0/2, L1/2): f''(0) = L0/2, and (f'' - L0/2)/|f'| = (L1/2) * 6y/(y^2 + 9) <= L1/2, with equality at y = 3.
    """
    grad_fn, hess_fn = quartic_fn(l0, l1)
    points = [t.view(1) for t in torch.linspace(-30 / l1, 30 / l1, 6001, dtype=F64)]  # contains y = 0 and 3
    pairs = grid_pairs(grad_fn, hess_fn, points)
    assert check_constants(pairs, l0, l1, tight=False) == pytest.approx(0.5, rel=1e-12)
    assert check_constants(pairs, l0 / 2, l1 / 2) == pytest.approx(1.0, rel=1e-12)

    clipper = GradientClipper(mode="auto", nonfinite="propagate")
    xs, gs = descend(grad_fn, [10 / l1], clipper, steps=100)
    assert float(gs[-1].norm()) <= TOL
    l0_hat, l1_hat = constants(clipper)
    assert_within(l0_hat, l0 / 2)
    assert_within(l1_hat, l1 / 2)
    assert_above_all(l0_hat, l1_hat, ref_secants(xs, gs))


# ---------------------------------------------------------------------------- 2. robustness


def test_log_mean_and_secant_pair_closed_forms():
    a, b = torch.tensor(3.0, dtype=F64), torch.tensor(0.02, dtype=F64)
    assert float(log_mean(a, b)) == pytest.approx((3.0 - 0.02) / math.log(3.0 / 0.02), rel=1e-14)
    assert float(log_mean(b, a)) == float(log_mean(a, b))
    assert float(log_mean(a, a)) == 3.0
    n, s = secant_pair(torch.tensor(2.0, dtype=F64), torch.tensor(0.5, dtype=F64), a, b)
    assert float(s) == 4.0 and float(n) == float(log_mean(a, b))
    for dg in (0.0, 1.0):  # zero step: no smoothness, whatever the gradient did
        _, s = secant_pair(torch.tensor(dg, dtype=F64), torch.tensor(0.0, dtype=F64), a, b)
        assert not math.isfinite(float(s))


def state_equal(x, y) -> bool:
    """Every field equal, NaN (an empty window slot) equal to NaN."""
    def same(a: Tensor, b: Tensor) -> bool:
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))

    return all(same(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(EnvelopeState))


@pytest.mark.parametrize(
    ("norm", "smooth"),
    [
        (math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0), (1.0, math.inf), (1.0, -math.inf),
        (0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (math.nan, math.nan),
    ],
)
def test_invalid_pair_changes_nothing(norm, smooth):
    state = envelope_init()
    for n, s in [(1e-3, 1.0), (1.0, 2.0), (1e3, 1e3)]:
        state = envelope_update(state, torch.tensor(n, dtype=F64), torch.tensor(s, dtype=F64))
    before = copy.deepcopy(state)
    after = envelope_update(state, torch.tensor(norm, dtype=F64), torch.tensor(smooth, dtype=F64))
    assert state_equal(after, before) and state_equal(state, before)  # and the input is not modified
    # a zero step goes through secant_pair first
    n, s = secant_pair(torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64),
                       torch.tensor(3.0, dtype=F64))
    assert state_equal(envelope_update(state, n, s), before)


def test_low_is_the_smallest_valid_smoothness_and_survives_a_state_dict():
    """`low` (auto's base step is 1/low) is the minimum over valid pairs only; invalid ones never lower it."""
    state = envelope_init()
    assert math.isinf(float(state.low))
    pairs = [(1.0, 3.0), (2.0, 0.5), (1.0, math.nan), (0.0, 1e-9), (1.0, -1.0), (math.inf, 1e-9), (5.0, 0.7),
             (1e-3, 0.25)]
    valid = [sm for n, sm in pairs if math.isfinite(n) and math.isfinite(sm) and n > 0 and sm >= 0]
    for n, sm in pairs:
        state = envelope_update(state, torch.tensor(n, dtype=F64), torch.tensor(sm, dtype=F64))
    assert float(state.low) == min(valid) == 0.25
    sd = state.state_dict()
    assert float(EnvelopeState.from_state_dict(sd, torch.device("cpu")).low) == 0.25
    # a state saved before `low` existed has measured nothing: inf, not 0 (which would mean "use the lr")
    del sd["low"]
    assert math.isinf(float(EnvelopeState.from_state_dict(sd, torch.device("cpu")).low))


def test_ratio_is_the_median_of_the_recent_valid_ratios_and_survives_a_state_dict():
    """`ratio` (auto's step length is 2/ratio) is the (lower) median of smooth/norm over the last WINDOW valid
    pairs; invalid pairs neither enter the window nor push a valid one out."""
    rng = random.Random(0)
    state = envelope_init()
    assert float(state.ratio) == 0.0
    seen: list[float] = []
    for k in range(3 * WINDOW + 5):
        if k % 7 == 3:
            n, sm = rng.choice([(1.0, math.nan), (0.0, 1.0), (math.inf, 1.0), (1.0, -1.0)])
        else:
            n, sm = 10 ** rng.uniform(-3, 3), 10 ** rng.uniform(-2, 2)
            seen.append(sm / n)
        state = envelope_update(state, torch.tensor(n, dtype=F64), torch.tensor(sm, dtype=F64))
        assert float(state.ratio) == pytest.approx(statistics.median_low(seen[-WINDOW:]), rel=1e-15), k
    restored = EnvelopeState.from_state_dict(state.state_dict(), torch.device("cpu"))
    assert state_equal(restored, state)
    # a state saved before the window existed: an empty window, no ratio (nothing is clipped until pairs come)
    sd = state.state_dict()
    del sd["window"], sd["ratio"]
    old = EnvelopeState.from_state_dict(sd, torch.device("cpu"))
    assert bool(old.window.isnan().all()) and float(old.ratio) == 0.0 and old.window.shape == (WINDOW,)
    n, sm = 2.0, 3.0
    assert float(envelope_update(old, torch.tensor(n, dtype=F64), torch.tensor(sm, dtype=F64)).ratio) == sm / n


def auto_cosh(nonfinite: str) -> tuple[nn.Parameter, torch.optim.SGD, GradientClipper]:
    x = nn.Parameter(torch.tensor([10.0, 0.3], dtype=F64))
    return x, torch.optim.SGD([x], lr=BIG_LR), GradientClipper(mode="auto", nonfinite=nonfinite)


ESTIMATE_KEYS = ("l0l1/L0", "l0l1/L1", "l0l1/smoothness", "l0l1/smoothness_pairs")


@pytest.mark.parametrize("policy", ["skip", "zero"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradient_mid_trajectory_does_not_touch_the_estimate(policy, bad):
    grad_fn, _ = cosh_fn(1.0, 1.0)
    x, opt, clipper = auto_cosh(policy)
    k_bad, steps = 6, 40
    xs, gs, history = [], [], []
    for t in range(steps):
        g = grad_fn(x.detach())
        if t == k_bad:
            g[1] = bad
        xs.append(x.detach().clone())
        gs.append(g.clone())
        x.grad = g.clone()
        outcome = clipper.step(opt)
        assert outcome.finite is (t != k_bad)
        opt.step()
        history.append({k: clipper.latest()[k] for k in ESTIMATE_KEYS})
        if float(g.norm()) <= TOL:
            break
    for h in history:
        assert all(math.isfinite(v) for v in h.values())
    # the pair into the bad step and the pair out of it (against its snapshot) are both ignored
    assert history[k_bad] == history[k_bad - 1] == history[k_bad + 1]
    assert history[k_bad + 2]["l0l1/smoothness_pairs"] == history[k_bad - 1]["l0l1/smoothness_pairs"] + 1
    assert history[-1]["l0l1/smoothness_pairs"] == len(xs) - 3
    # the run still converges with the right constants, above every finite secant
    assert float(gs[-1].norm()) <= TOL
    l0_hat, l1_hat = constants(clipper)
    assert_within(l0_hat, 1.0)
    assert_within(l1_hat, 1.0)
    keep = [i for i in range(len(xs)) if i != k_bad]
    finite_pairs = [p for i, j in zip(keep, keep[1:]) if j == i + 1
                    for p in ref_secants([xs[i], xs[j]], [gs[i], gs[j]])]
    assert_above_all(l0_hat, l1_hat, finite_pairs)


def test_zero_step_is_ignored():
    """lr = 0 for one step: the next pair has ||dtheta|| = 0 (and here dg != 0: a different gradient at the
    same point, as with minibatch noise), so it is not counted and changes nothing."""
    grad_fn, _ = cosh_fn(1.0, 1.0)
    x, opt, clipper = auto_cosh("propagate")
    history = []
    for t in range(8):
        g = grad_fn(x.detach()) * (1.5 if t == 4 else 1.0)
        opt.param_groups[0]["lr"] = 0.0 if t == 3 else BIG_LR
        before = x.detach().clone()
        x.grad = g
        clipper.step(opt)
        opt.step()
        assert torch.equal(x.detach(), before) == (t == 3)
        history.append({k: clipper.latest()[k] for k in ESTIMATE_KEYS})
    assert history[4] == history[3]
    assert history[5]["l0l1/smoothness_pairs"] == history[3]["l0l1/smoothness_pairs"] + 1
    assert history[-1]["l0l1/smoothness_pairs"] == 8 - 1 - 1


# ---------------------------------------------------------------------------- 3. the envelope fit


def fit_pairs(pairs: Sequence[tuple[float, float]]):
    state = envelope_init()
    for n, s in pairs:
        state = envelope_update(state, torch.tensor(n, dtype=F64), torch.tensor(s, dtype=F64))
    return state


def kept(state) -> list[tuple[float, float]]:
    return [(n, s) for n, s in zip(state.norms.tolist(), state.smooth.tolist()) if n > 0]


@pytest.mark.parametrize(("l0", "l1"), [(1.0, 1.0), (1e-3, 10.0), (50.0, 0.02), (0.0, 3.0), (2.0, 0.0)])
def test_points_on_a_line_recover_it(l0, l1):
    norms = torch.logspace(-5, 5, 41, dtype=F64).tolist()  # 10 decades
    state = fit_pairs([(n, l0 + l1 * n) for n in norms])
    assert float(state.l0) == pytest.approx(l0, rel=1e-6, abs=1e-12 * (l0 + l1))
    assert float(state.l1) == pytest.approx(l1, rel=1e-6, abs=1e-12 * (l0 + l1))
    assert int(state.pairs) == len(norms)
    # only the ends of a segment can bind (and a point rounding left 1 ulp above it): memory does not grow
    assert len(kept(state)) <= 4


def test_pairs_on_a_convex_curve_keep_only_the_ends():
    pairs = [(n, math.sqrt(1 + n * n)) for n in torch.logspace(-4, 4, 200, dtype=F64).tolist()]
    state = fit_pairs(pairs[::3] + pairs[1::3] + pairs[2::3])  # in no particular order
    assert sorted(kept(state)) == [pairs[0], pairs[-1]]
    assert_above_all(float(state.l0), float(state.l1), pairs, rtol=1e-12)


def ref_lp(norms: Sequence[float], smooth: Sequence[float], m: float | None = None) -> float:
    """min over a >= 0 of max(0, max_i s_i - a n_i) + a m (m: by default the geometric mean of the smallest
    and largest norm), by golden section on this convex function of the slope a (not the code's method)."""
    m = math.sqrt(min(norms) * max(norms)) if m is None else m

    def h(a: float) -> float:
        return max(0.0, max(s - a * n for n, s in zip(norms, smooth))) + a * m

    lo, hi = 0.0, max(s / n for n, s in zip(norms, smooth)) * 1.01 + 1e-300
    r = (math.sqrt(5) - 1) / 2
    for _ in range(300):
        c, d = hi - r * (hi - lo), lo + r * (hi - lo)
        if h(c) <= h(d):
            hi = d
        else:
            lo = c
    return min(h(lo), h(hi), h(0.0))


@pytest.mark.parametrize("explicit_pivot", [False, True])
def test_envelope_fit_is_the_lowest_line_at_the_pivot_above_the_pairs(explicit_pivot):
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        k = int(torch.randint(1, 12, (), generator=gen))
        idx = torch.randperm(CAPACITY, generator=gen)[:k]  # empty slots (norm 0) anywhere
        norms = torch.zeros(CAPACITY, dtype=F64)
        smooth = torch.zeros(CAPACITY, dtype=F64)
        norms[idx] = 10 ** (torch.rand(k, generator=gen, dtype=F64) * 12 - 6)
        if trial % 3:  # unrelated to the norms
            smooth[idx] = 10 ** (torch.rand(k, generator=gen, dtype=F64) * 8 - 4)
        else:  # below a line through the origin
            smooth[idx] = torch.rand(k, generator=gen, dtype=F64) * norms[idx]
        ns, ss = norms[idx].tolist(), smooth[idx].tolist()
        m = 10 ** float(torch.rand((), generator=gen, dtype=F64) * 12 - 6) if explicit_pivot else None
        fit = envelope_fit(norms, smooth, torch.tensor(m, dtype=F64)) if explicit_pivot else envelope_fit(norms, smooth)
        l0, l1 = (float(v) for v in fit)
        assert l0 >= 0 and l1 >= 0
        assert_above_all(l0, l1, list(zip(ns, ss)), rtol=1e-9)
        m = math.sqrt(min(ns) * max(ns)) if m is None else m
        assert l0 + l1 * m == pytest.approx(ref_lp(ns, ss, m), rel=1e-9), trial


def random_pairs(gen: torch.Generator, trial: int) -> list[tuple[float, float]]:
    """2..40 pairs over 1..6 decades of norms from curves of every shape (convex, concave), with noise."""
    k = int(torch.randint(2, 40, (), generator=gen))
    norms = (10 ** (torch.rand(k, generator=gen, dtype=F64) * (1 + trial % 6) - 3)).tolist()
    c0, c1 = (float(v) for v in torch.rand(2, generator=gen, dtype=F64) * 3)
    noise = (torch.rand(k, generator=gen, dtype=F64) * 2).tolist()
    bend = (trial % 2) * 0.3 * c1
    return [(n, (c0 + c1 * n - bend * n**1.5 / (1 + n**0.5)) * z) for n, z in zip(norms, noise)]


def test_envelope_is_the_exact_fit_over_every_pair_seen():
    """While the pairs that can bind fit in the buffer, the envelope is the linear program over *all* pairs
    fed (pivot from the smallest and largest norm fed): above each of them, and lowest at the pivot."""
    gen = torch.Generator().manual_seed(2)
    for trial in range(24):
        pairs = random_pairs(gen, trial)
        state = fit_pairs(pairs)
        l0, l1 = float(state.l0), float(state.l1)
        assert l0 >= 0 and l1 >= 0
        assert set(kept(state)) <= set(pairs)  # the buffer holds pairs that were fed
        assert len(kept(state)) < CAPACITY  # (no overflow: see test_envelope_buffer_overflow)
        assert_above_all(l0, l1, pairs, rtol=1e-9)
        ns, ss = zip(*pairs)
        m = math.sqrt(min(ns) * max(ns))
        assert l0 + l1 * m == pytest.approx(ref_lp(ns, ss), rel=1e-9), trial
        assert int(state.pairs) == len(pairs)


def test_pair_at_a_smaller_norm_with_a_larger_ratio_binds():
    # (2, 2) alone would give the line 0 + 1 n (lowest at the pivot, ties to the larger slope): below (1, 1.9).
    pairs = [(1.0, 1.9), (2.0, 2.0)]
    state = fit_pairs(pairs)
    assert_above_all(float(state.l0), float(state.l1), pairs, rtol=1e-12)
    assert float(state.l0) == pytest.approx(1.8) and float(state.l1) == pytest.approx(0.1)


def concave_pairs(k: int) -> list[tuple[float, float]]:
    """k pairs on s = sqrt(n), n over 6 decades: every one is a vertex of the upper hull."""
    return [(n, math.sqrt(n)) for n in torch.logspace(-3, 3, k, dtype=F64).tolist()]


@pytest.mark.parametrize("order", ["increasing", "decreasing"])
def test_envelope_buffer_full_of_hull_vertices(order):
    pairs = concave_pairs(CAPACITY)
    state = fit_pairs(pairs if order == "increasing" else pairs[::-1])
    assert len(kept(state)) == CAPACITY
    assert_above_all(float(state.l0), float(state.l1), pairs, rtol=1e-9)
    # the tangent of sqrt at the pivot n = 1, up to the discretisation (CAPACITY = 16 points: within 3%)
    assert float(state.l0) == pytest.approx(0.5, rel=0.03) and float(state.l1) == pytest.approx(0.5, rel=0.03)


@pytest.mark.parametrize("case", ["increasing", "decreasing", "logistic_trajectory"])
def test_envelope_buffer_overflow_keeps_the_line_above_every_pair(case):
    if case == "logistic_trajectory":
        # lr = 1 (the learning rate binds in the tail): after 400 steps the line is 11.5% below a secant
        a = torch.tensor([0.3, -0.4], dtype=F64)
        clipper = GradientClipper(mode="auto", nonfinite="propagate")
        xs, gs = descend(logistic_fn(a)[0], (-20 * a).tolist(), clipper, lr=1.0, steps=400, tol=None)
        (l0, l1), pairs = constants(clipper), ref_secants(xs, gs)
    else:
        pairs = concave_pairs(100)
        state = fit_pairs(pairs if case == "increasing" else pairs[::-1])
        assert len(kept(state)) <= CAPACITY
        l0, l1 = float(state.l0), float(state.l1)
    assert_above_all(l0, l1, pairs, rtol=1e-9)


def fit_pairs_pending(pairs: Sequence[tuple[float, float]], every: int = PENDING):
    """What the estimator does: record each pair, fold every ``every`` records and at the end."""
    state = envelope_init()
    for i, (n, s) in enumerate(pairs, 1):
        state = envelope_record(state, torch.tensor(n, dtype=F64), torch.tensor(s, dtype=F64))
        if i % every == 0:
            state = envelope_fold(state)
    return envelope_fold(state)


def test_pending_pairs_fold_into_the_envelope_fed_one_by_one():
    """Without overflow, folding pairs in batches gives bitwise the envelope fed pair by pair, invalid pairs
    (NaN, zero norm, negative smoothness) included."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(24):
        pairs = random_pairs(gen, trial)
        pairs[trial % len(pairs)] = (float("nan"), 1.0) if trial % 3 == 0 else (0.0, 1.0)
        pairs[(trial + 1) % len(pairs)] = (1.0, -1.0)
        eager = fit_pairs(pairs)
        assert len(kept(eager)) < CAPACITY
        for every in (3, PENDING):
            assert state_equal(fit_pairs_pending(pairs, every), eager), (trial, every)


@pytest.mark.parametrize("extra", [1, 3, PENDING])
def test_folding_many_hull_vertices_at_once_keeps_the_line_above_every_pair(extra):
    """More binding pairs than slots arrive in one fold: as many closest neighbours are merged as needed."""
    pairs = concave_pairs(CAPACITY + extra)  # every pair a hull vertex
    batch = fit_pairs(pairs[:CAPACITY])  # a full hull, then `extra` more vertices in one fold
    for n, s in pairs[CAPACITY:]:
        batch = envelope_record(batch, torch.tensor(n, dtype=F64), torch.tensor(s, dtype=F64))
    batch = envelope_fold(batch)
    assert 0 < len(kept(batch)) <= CAPACITY
    assert set(n for n, _ in kept(batch)) <= set(n for n, _ in pairs)  # merged pairs keep a fed norm
    assert_above_all(float(batch.l0), float(batch.l1), pairs, rtol=1e-9)
    if extra == 1:  # one excess pair: the single closest pair merged, as when fed one by one
        assert state_equal(batch, fit_pairs(pairs))


def test_the_estimator_reads_its_estimates_with_every_pair_folded(monkeypatch):
    """Mid-way between folds, what the clipper reports (and saves) equals a run that folds at every pair."""
    import lightning_l0l1.estimator as est

    def run() -> tuple[dict[str, float], dict]:
        net = _net_for_fold()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        clipper = GradientClipper(mode="auto", nonfinite="propagate")
        for x, y in batches(PENDING + 4, F64):
            backward(net, x, y)
            clipper.step(opt)
            opt.step()
        return clipper.latest(), clipper.state_dict()

    lazy, lazy_sd = run()
    monkeypatch.setattr(est, "PENDING", 1)
    eager, eager_sd = run()
    assert lazy["l0l1/smoothness_pairs"] == PENDING + 3
    assert lazy == eager
    saved = [{k: repr(v) for k, v in sd["optimizers"][0]["env"].items() if not k.startswith("pending")}
             for sd in (lazy_sd, eager_sd)]
    assert saved[0] == saved[1]  # (repr: an empty window slot is NaN)
    assert set(lazy_sd["optimizers"][0]["env"]["pending_norms"]) == {0.0}  # saved with every pair folded


def _net_for_fold() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)


def test_empty_and_large_norm_only_envelopes():
    state = envelope_init()
    l0, l1 = envelope_fit(state.norms, state.smooth)
    assert float(l0) == 0.0 and float(l1) == 0.0
    assert float(state.l0) == float(state.l1) == 0.0
    # One pair: every line through it is lowest at the pivot; ties go to the larger slope, L0 = 0.
    state = fit_pairs([(1e3, 5e2)])
    assert float(state.l0) == 0.0 and float(state.l1) == pytest.approx(0.5, rel=1e-15)
    # Pairs on a ray from the origin: L0 = 0, L1 the ratio.
    state = fit_pairs([(n, 3 * n) for n in (1e2, 3e2, 1e3, 5e3)])
    assert float(state.l0) == pytest.approx(0.0, abs=1e-12) and float(state.l1) == pytest.approx(3.0, rel=1e-12)
    # Only large norms of a (L0, L1) = (1, 1) curve, sqrt(1 + n^2): L0 is not identifiable there and the
    # intercept is the smallest consistent with the data (the chord: about 1/(2 n_min)); L1 is right.
    norms = torch.logspace(2, 4, 13, dtype=F64).tolist()
    state = fit_pairs([(n, math.sqrt(1 + n * n)) for n in norms])
    assert 0 <= float(state.l0) < 1e-2
    assert float(state.l1) == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------------------- 4. host syncs


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="auto"),
        dict(mode="auto", snapshot_device="cpu"),
        dict(mode="auto", estimate_every=3),
        dict(mode="clip", max_norm=0.5, estimate=True),
    ],
)
def test_no_host_sync_with_the_estimator(kwargs):
    net, opt = mlp_opt()
    clipper = GradientClipper(nonfinite="propagate", **kwargs)
    data = batches(20)
    counter = HostReads()
    for x, y in data:
        backward(net, x, y)
        with counter:
            clipper.step(opt)
        opt.step()
    assert counter.n == 0
    stats = clipper.latest()
    every = kwargs.get("estimate_every", 1)
    assert stats["l0l1/steps"] == 20 and stats["l0l1/smoothness_pairs"] == 19 // every + (every > 1)
    with HostReads() as c:  # the counter can see host reads
        clipper.latest()
    assert c.n > 0


# ---------------------------------------------------------------------------- 5. arguments


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        (dict(estimate_every=0), "estimate_every", "0"),
        (dict(estimate_every=-1), "estimate_every", "-1"),
        (dict(estimate_every=1.5), "estimate_every", "1.5"),
        (dict(estimate_every=True), "estimate_every", "True"),
        (dict(snapshot_device="cuda:0"), "snapshot_device", "'cuda:0'"),
        (dict(snapshot_device="cuda"), "snapshot_device", "'cuda'"),
        (dict(initial_step=0), "initial_step", "0"),
        (dict(initial_step=-1), "initial_step", "-1"),
        (dict(initial_step=math.nan), "initial_step", "nan"),
        (dict(initial_step=True), "initial_step", "True"),
        (dict(estimate="yes"), "estimate", "'yes'"),
        (dict(estimate=1), "estimate", "1"),
        (dict(estimate=False), "estimate", "False"),  # mode="auto" needs the estimator
    ],
)
@pytest.mark.parametrize("cls", [GradientClipper, L0L1Clipping])
def test_invalid_estimator_arguments(cls, kwargs, name, value):
    kwargs = {"mode": "auto", **kwargs}
    with pytest.raises(ValueError, match=rf"`{name}(`|={value})") as info:
        cls(**kwargs)
    assert value in str(info.value)


def test_valid_estimator_arguments():
    c = GradientClipper(mode="clip", max_norm=1.0, estimate=False)
    assert c.estimate is False
    assert GradientClipper(mode="clip", max_norm=1.0).estimate is False
    assert GradientClipper(mode="auto").estimate is True
    assert GradientClipper().mode == "auto"  # the default
    c = GradientClipper(mode="l0l1", l0=1.0, l1=1.0, estimate=True, estimate_every=7, snapshot_device="cpu",
                        initial_step=0.5)
    assert (c.estimate, c.estimate_every, c.snapshot_device, c.initial_step) == (True, 7, "cpu", 0.5)


# ---------------------------------------------------------------------------- 6. checkpoints


def run_cosh(x: nn.Parameter, opt: torch.optim.SGD, clipper: GradientClipper, steps: int) -> list[Tensor]:
    grad_fn, _ = cosh_fn(1.0, 1.0)
    out = []
    for _ in range(steps):
        x.grad = grad_fn(x.detach())
        clipper.step(opt)
        opt.step()
        out.append(x.detach().clone())
    return out


@pytest.mark.parametrize("snapshot_device", [None, "cpu"])
@pytest.mark.parametrize("through_file", [False, True])
def test_state_dict_resume_is_bitwise(through_file, snapshot_device, tmp_path):
    x, opt, _ = auto_cosh("propagate")
    clipper = GradientClipper(mode="auto", nonfinite="propagate", snapshot_device=snapshot_device)
    run_cosh(x, opt, clipper, 5)
    sd = clipper.state_dict()
    if through_file:
        torch.save(sd, tmp_path / "clipper.pt")
        sd = torch.load(tmp_path / "clipper.pt", weights_only=True)
    x_state = x.detach().clone()
    uninterrupted = run_cosh(x, opt, clipper, 10)

    # Twice from the same state dict: loading must not alias (and so let a run modify) its tensors.
    for _ in range(2):
        x2 = nn.Parameter(x_state.clone())
        opt2 = torch.optim.SGD([x2], lr=BIG_LR)
        fresh = GradientClipper(mode="auto", nonfinite="propagate", snapshot_device=snapshot_device)
        fresh.load_state_dict(sd)
        resumed = run_cosh(x2, opt2, fresh, 10)
        for a, b in zip(uninterrupted, resumed):
            assert torch.equal(a, b)
        assert fresh.latest() == clipper.latest()


def _probe_loss(module, batch):
    x, y = batch
    return nn.functional.mse_loss(module.net(x), y)


@pytest.mark.parametrize(
    ("probe_loss", "pairs"),
    [(None, 23), (_probe_loss, 24)],  # minibatch secants: one pair fewer than steps; the probe: one per step
    ids=["secant", "probe"],
)
def test_lightning_resume_with_auto_is_bitwise(probe_loss, pairs, tmp_path):
    def cb():
        return L0L1Clipping(mode="auto", probe_loss=probe_loss)

    ds = make_data()
    cb_full = cb()
    full = Regressor(make_net())
    trainer(callbacks=[cb_full], max_epochs=4).fit(full, loader(ds))

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[cb(), ckpt], max_epochs=2, enable_checkpointing=True).fit(Regressor(make_net()), loader(ds))
    cb_resumed = cb()
    resumed = Regressor(make_net(seed=123))
    trainer(callbacks=[cb_resumed], max_epochs=4).fit(resumed, loader(ds), ckpt_path=tmp_path / "last.ckpt")
    for a, b in zip(params_of(resumed.net), params_of(full.net)):
        assert torch.equal(a, b)
    stats = cb_full.latest()
    assert cb_resumed.latest() == stats
    assert stats["l0l1/steps"] == 24 and stats["l0l1/smoothness_pairs"] == pairs
    if probe_loss is None:
        assert stats["l0l1/L1"] > 0


# ---------------------------------------------------------------------------- 7.-9. options


def train(clipper: GradientClipper, steps: int = 15, dtype: torch.dtype = F64, lr: float = 0.05):
    """An MLP on minibatches; returns the net, the per-step raw grads/params (flattened) and the
    per-step scaled grads."""
    net, opt = mlp_opt(dtype, lr=lr)
    raw, params, scaled = [], [], []
    for x, y in batches(steps, dtype):
        backward(net, x, y)
        raw.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double())
        params.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double())
        clipper.step(opt)
        scaled.append([p.grad.clone() for p in net.parameters()])
        opt.step()
    return net, raw, params, scaled


@pytest.fixture
def per_tensor_snapshot(monkeypatch):
    """On the CPU an offloaded snapshot takes the in-place path (nothing to gain from offloading); force the
    path it takes on an accelerator: host buffers, differences reduced to per-tensor norms."""
    take = FullSnapshot.take

    def forced(self, grads, params, norm, step):
        take(self, grads, params, norm, step)
        self.offload = self.requested_offload

    monkeypatch.setattr(FullSnapshot, "take", forced)


@pytest.mark.parametrize("path", ["native", "per_tensor"])
@pytest.mark.parametrize("mode", ["auto", "clip"])
def test_cpu_snapshot_gives_the_same_estimates(mode, path, request):
    kw = dict(mode=mode, max_norm=1.0 if mode == "clip" else None, estimate=True, nonfinite="propagate")
    a = GradientClipper(**kw, snapshot="full")
    net_a, *_ = train(a)
    if path == "per_tensor":
        request.getfixturevalue("per_tensor_snapshot")
    b = GradientClipper(**kw, snapshot_device="cpu")
    net_b, *_ = train(b)
    assert b._states[0].estimator.snapshot.offload is (path == "per_tensor")
    sa, sb = a.latest(), b.latest()
    assert sa["l0l1/smoothness_pairs"] == sb["l0l1/smoothness_pairs"] == 14
    for key in ("l0l1/L0", "l0l1/L1", "l0l1/smoothness", "l0l1/lr_effective", "l0l1/grad_norm"):
        assert sb[key] == pytest.approx(sa[key], rel=1e-10, abs=1e-300), key
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_estimate_in_clip_mode_only_reports():
    on, off = (GradientClipper(mode="clip", max_norm=0.5, estimate=e, nonfinite="propagate") for e in (True, False))
    net_on, raw, params, scaled_on = train(on, dtype=torch.float32)
    net_off, _, _, scaled_off = train(off, dtype=torch.float32)
    for gs_on, gs_off in zip(scaled_on, scaled_off):
        for g1, g2 in zip(gs_on, gs_off):
            assert torch.equal(g1, g2)
    for p, q in zip(net_on.parameters(), net_off.parameters()):
        assert torch.equal(p, q)
    stats, plain = on.latest(), off.latest()
    assert not any(k in plain for k in ESTIMATE_KEYS)
    assert {k: v for k, v in stats.items() if k in plain} == plain
    # the reported smoothness is the last secant, from the raw (unclipped) gradients
    ref = float((raw[-1] - raw[-2]).norm() / (params[-1] - params[-2]).norm())
    assert stats["l0l1/smoothness"] == pytest.approx(ref, rel=1e-5)
    assert stats["l0l1/L0"] >= 0 and stats["l0l1/L1"] >= 0 and stats["l0l1/L0"] + stats["l0l1/L1"] > 0
    assert stats["l0l1/smoothness_pairs"] == len(raw) - 1


@pytest.mark.parametrize("every", [1, 2, 3, 5, 7])
def test_estimate_every(every):
    steps = 22
    clipper = GradientClipper(mode="clip", max_norm=0.5, estimate=True, estimate_every=every, nonfinite="propagate")
    _, raw, params, _ = train(clipper, steps=steps)
    stats = clipper.latest()
    # a pair at step 1 and at every step t = K, 2K, ... (0-based) between steps t-1 and t
    pairs = (steps - 1) // every + (every > 1)
    assert stats["l0l1/smoothness_pairs"] == pairs
    assert pairs == pytest.approx(steps / every, abs=1)
    t = (steps - 1) // every * every
    ref = float((raw[t] - raw[t - 1]).norm() / (params[t] - params[t - 1]).norm())
    assert stats["l0l1/smoothness"] == pytest.approx(ref, rel=1e-10)
