"""lightning_l0l1.rules against torch's clipping coefficient and the closed forms of the paper."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_l0l1.rules import CLIP_EPS, adaptive_scale, auto_scale, clip_scale, l0l1_scale, l0l1_threshold

FLOAT_DTYPES = [torch.float32, torch.float64]
NORMS = [0.0, 1e-8, 1e-3, 0.5, 1.0, 2.0, 7.5, 1e3, 1e8, 1e20]
GAMMAS = [1e-3, 0.5, 1.0, 10.0, 1e4]
LOGSPACE = torch.logspace(-8, 12, 201, dtype=torch.float64).tolist()


def t(x: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def torch_clip_coef(norm: float, max_norm: float, dtype: torch.dtype) -> float:
    """The factor ``torch.nn.utils.clip_grads_with_norm_`` multiplies a gradient by."""
    p = torch.nn.Parameter(torch.zeros((), dtype=dtype))
    p.grad = torch.ones((), dtype=dtype)
    torch.nn.utils.clip_grads_with_norm_([p], max_norm, t(norm, dtype), foreach=False)
    return p.grad.item()


# ---------------------------------------------------------------- clip
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("max_norm", GAMMAS)
@pytest.mark.parametrize("norm", NORMS)
def test_clip_scale_equals_torch_coefficient(norm, max_norm, dtype):
    s = clip_scale(t(norm, dtype), max_norm)
    assert s.dtype == dtype and s.dim() == 0
    assert s.item() == pytest.approx(torch_clip_coef(norm, max_norm, dtype), rel=1e-6, abs=0)


@pytest.mark.parametrize("max_norm", GAMMAS)
@pytest.mark.parametrize("norm", NORMS)
def test_clip_scale_closed_form(norm, max_norm):
    expected = min(1.0, max_norm / (norm + 1e-6))
    assert clip_scale(t(norm), max_norm).item() == pytest.approx(expected, rel=1e-12)
    assert CLIP_EPS == 1e-6


def test_clip_scale_accepts_tensor_threshold_and_custom_eps():
    assert clip_scale(t(4.0), t(2.0), eps=0.0).item() == 0.5
    assert clip_scale(t(4.0), 2.0, eps=1.0).item() == pytest.approx(0.4, rel=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_scale_infinite_and_nan_norm(dtype):
    assert clip_scale(t(math.inf, dtype), 1.0).item() == 0.0
    assert math.isnan(clip_scale(t(math.nan, dtype), 1.0).item())


@pytest.mark.parametrize("max_norm", GAMMAS)
def test_clipped_norm_is_at_most_max_norm(max_norm):
    norms = torch.tensor(LOGSPACE, dtype=torch.float64)
    scaled = norms * clip_scale(norms, max_norm)
    assert (scaled <= max_norm * (1 + 1e-12)).all()  # n * (g / (n + eps)) may round one ulp up
    # and it is exactly the threshold (up to eps) above it, the norm itself below
    expected = torch.minimum(norms, torch.full_like(norms, max_norm))
    torch.testing.assert_close(scaled, expected, rtol=1e-6 / min(max_norm, 1.0) + 1e-12, atol=0)


# ---------------------------------------------------------------- adaptive
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("max_norm", GAMMAS)
@pytest.mark.parametrize("norm", NORMS)
def test_adaptive_scale_closed_form(norm, max_norm, dtype):
    s = adaptive_scale(t(norm, dtype), max_norm)
    assert s.dtype == dtype
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert s.item() == pytest.approx(max_norm / (norm + max_norm), rel=rel)


@pytest.mark.parametrize("max_norm", GAMMAS)
def test_adaptive_scaled_norm_is_below_gamma_and_within_factor_two_of_clipping(max_norm):
    norms = torch.tensor(LOGSPACE, dtype=torch.float64)
    s = adaptive_scale(norms, max_norm)
    scaled = norms * s
    assert (scaled < max_norm).all()
    hard = torch.minimum(norms, torch.full_like(norms, max_norm))  # hard clipping's scaled norm (eps = 0)
    assert (scaled <= hard * (1 + 1e-12)).all()
    assert (scaled >= 0.5 * hard).all()
    # the factor 2 is tight at norm == gamma
    at_gamma = t(max_norm) * adaptive_scale(t(max_norm), max_norm)
    assert at_gamma.item() == pytest.approx(0.5 * max_norm, rel=1e-12)


def test_adaptive_scale_float32_never_exceeds_gamma():
    norms = torch.logspace(-6, 30, 300, dtype=torch.float32)
    for gamma in GAMMAS:
        assert (norms * adaptive_scale(norms, gamma) <= gamma * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_adaptive_scale_limits(dtype):
    assert adaptive_scale(t(0.0, dtype), 3.0).item() == 1.0
    assert adaptive_scale(t(math.inf, dtype), 3.0).item() == 0.0


# ---------------------------------------------------------------- l0l1
L0L1_CASES = [(1.0, 1.0), (0.0, 2.0), (5.0, 0.0), (0.1, 10.0), (100.0, 0.01)]
LRS = [0.0, 1e-4, 0.01, 0.3, 1.0, 10.0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize(("l0", "l1"), L0L1_CASES)
@pytest.mark.parametrize("norm", NORMS)
def test_l0l1_scale_closed_form_and_bounds(norm, l0, l1, lr, dtype):
    s = l0l1_scale(t(norm, dtype), lr=lr, l0=l0, l1=l1)
    assert s.dtype == dtype and s.dim() == 0
    denom = lr * (l0 + l1 * norm)
    expected = 1.0 if denom == 0 else min(1.0, 1.0 / denom)
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert s.item() == pytest.approx(expected, rel=rel)
    assert 0.0 <= s.item() <= 1.0


@pytest.mark.parametrize(("l0", "l1"), [(1.0, 1.0), (0.0, 2.0), (0.1, 10.0)])
def test_l0l1_effective_step_is_min_of_lr_and_inverse_smoothness(l0, l1):
    norms = torch.tensor(LOGSPACE, dtype=torch.float64)
    for lr in (1e-3, 0.1, 1.0, 100.0):
        step = lr * l0l1_scale(norms, lr, l0, l1)
        expected = torch.minimum(torch.full_like(norms, lr), 1.0 / (l0 + l1 * norms))
        torch.testing.assert_close(step, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("l0", "l1"), [(1.0, 1.0), (4.0, 0.5), (0.01, 3.0), (250.0, 2.0)])
def test_l0l1_with_lr_one_over_l0_is_adaptive(l0, l1, dtype):
    norms = torch.tensor([0.0, *LOGSPACE[::10]], dtype=dtype)
    a = l0l1_scale(norms, lr=1.0 / l0, l0=l0, l1=l1)
    b = adaptive_scale(norms, l0 / l1)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-30)


def test_l0l1_scale_accepts_tensor_lr():
    s = l0l1_scale(t(3.0), lr=t(0.5), l0=1.0, l1=1.0)
    assert s.item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_l0l1_scale_huge_and_infinite_norm(dtype):
    big = torch.finfo(dtype).max
    s = l0l1_scale(t(big, dtype), lr=0.1, l0=1.0, l1=1.0)
    assert 0.0 <= s.item() <= 1e-30
    assert l0l1_scale(t(math.inf, dtype), lr=0.1, l0=1.0, l1=1.0).item() == 0.0
    assert l0l1_scale(t(big, dtype), lr=0.0, l0=1.0, l1=1.0).item() == 1.0


@pytest.mark.parametrize("rule", ["clip", "adaptive", "l0l1"])
def test_every_rule_is_in_unit_interval(rule):
    norms = torch.tensor([0.0, *LOGSPACE, 1e300], dtype=torch.float64)
    for gamma in GAMMAS:
        if rule == "clip":
            s = clip_scale(norms, gamma)
        elif rule == "adaptive":
            s = adaptive_scale(norms, gamma)
        else:
            s = l0l1_scale(norms, lr=gamma, l0=1.0, l1=0.5)
        assert ((s >= 0) & (s <= 1)).all()


# ---------------------------------------------------------------- threshold
@pytest.mark.parametrize("lr", [1e-4, 0.01, 0.3, 0.99])
@pytest.mark.parametrize(("l0", "l1"), [(1.0, 1.0), (0.0, 2.0), (0.1, 10.0), (0.5, 0.25)])
def test_l0l1_threshold_closed_form_and_consistent_with_scale(l0, l1, lr):
    thr = l0l1_threshold(lr, l0, l1)
    assert thr == pytest.approx((1.0 / lr - l0) / l1, rel=1e-12)
    assert thr > 0
    below = l0l1_scale(t(thr * (1 - 1e-9)), lr, l0, l1).item()
    above = l0l1_scale(t(thr * (1 + 1e-9)), lr, l0, l1).item()
    assert below == 1.0
    assert above < 1.0


@pytest.mark.parametrize(("lr", "l0", "l1"), [(2.0, 1.0, 1.0), (1.0, 1.5, 0.0), (0.5, 3.0, 7.0), (1.0, 1.0, 1.0)])
def test_l0l1_threshold_is_zero_when_lr_l0_at_least_one(lr, l0, l1):
    assert lr * l0 > 1 or (lr * l0 == 1 and l1 > 0)
    assert l0l1_threshold(lr, l0, l1) == 0.0
    if l1 > 0:
        assert l0l1_scale(t(1e-3), lr, l0, l1).item() < 1.0


@pytest.mark.parametrize(("lr", "l0"), [(0.1, 1.0), (1.0, 0.5), (3.0, 0.0), (0.5, 2.0), (1.0, 1.0)])
def test_l0l1_threshold_is_inf_when_l1_zero(lr, l0):
    assert lr * l0 <= 1  # at lr * l0 == 1 the scale is exactly 1 for every norm: no step is scaled
    assert l0l1_threshold(lr, l0, 0.0) == math.inf
    assert l0l1_scale(t(1e30), lr, l0, 0.0).item() == 1.0


@pytest.mark.parametrize("lr", [0.0, -1.0])
def test_l0l1_threshold_is_inf_for_non_positive_lr(lr):
    assert l0l1_threshold(lr, 1.0, 1.0) == math.inf


def test_l0l1_threshold_returns_python_float():
    for args in [(0.1, 1.0, 1.0), (2.0, 1.0, 1.0), (0.1, 1.0, 0.0), (0.0, 1.0, 1.0)]:
        assert type(l0l1_threshold(*args)) is float


# ---------------------------------------------------------------- auto
def auto_reference(
    norm: float, lr: float, low: float, ratio: float, amp: float = 1.0, base_amp: float | None = None
) -> tuple[float, float]:
    """``auto``'s effective step and threshold in plain Python: eta_b = min(lr, 1/(base_amp low)) (lr when
    nothing is measured; base_amp = amp unless given), step length lambda = 2/(amp ratio) (none while
    ratio = 0), eta_eff = min(eta_b, lambda/||g||)."""
    base_amp = amp if base_amp is None else base_amp
    base = min(lr, 1.0 / (base_amp * low)) if 0 < low < math.inf else lr
    length = 2.0 / (amp * ratio) if ratio > 0 else math.inf
    eff = base if norm == 0 else min(base, length / norm)
    return eff, length / base


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("low", [math.inf, 0.0, 1e-3, 0.5, 2.0, 50.0])
@pytest.mark.parametrize("ratio", [0.0, 1e-3, 0.5, 1.0, 3.0, 100.0])
@pytest.mark.parametrize("lr", [1e-3, 0.9, 20.0])
@pytest.mark.parametrize("lr_tensor", [False, True])
def test_auto_scale_closed_form(lr, lr_tensor, ratio, low, dtype):
    for norm in NORMS:
        s, gamma = auto_scale(t(norm, dtype), t(lr) if lr_tensor else lr, t(low), t(ratio))
        eff, ref_gamma = auto_reference(norm, lr, low, ratio)
        assert float(s) * lr == pytest.approx(eff, rel=1e-5 if dtype == torch.float32 else 1e-12), norm
        assert float(gamma) == pytest.approx(ref_gamma, rel=1e-5 if dtype == torch.float32 else 1e-12)
        assert 0.0 <= float(s) <= 1.0


@pytest.mark.parametrize(("l0", "l1"), [(1.0, 1.0), (2.0, 0.5), (0.1, 3.0)])
def test_auto_scale_with_the_true_constants_is_clipping_at_twice_l0_over_l1(l0, l1):
    """With L_low = L0, ratio = L1 and lr >= 1/L0: eta_eff = min(1/L0, 2/(L1 ||g||)): hard clipping at
    gamma = 2 L0/L1, between the l0l1 step and 3 times it (the step length is 2/L1, not 1/L1)."""
    for norm in LOGSPACE:
        s, gamma = auto_scale(t(norm), 1e3, t(l0), t(l1))
        eff = float(s) * 1e3
        assert float(gamma) == pytest.approx(2 * l0 / l1, rel=1e-12)
        assert eff == pytest.approx(min(1 / l0, 2 / (l1 * norm)), rel=1e-12)
        l0l1_step = 1 / (l0 + l1 * norm)
        assert l0l1_step * (1 - 1e-12) <= eff <= 3 * l0l1_step * (1 + 1e-12)


def test_auto_scale_nonfinite_norm():
    one = t(1.0)
    s, _ = auto_scale(t(math.inf), 1.0, one, one)
    assert float(s) == 0.0
    s, _ = auto_scale(t(math.nan), 1.0, one, one)
    assert math.isnan(float(s))
    s, _ = auto_scale(t(math.inf), 1.0, one, t(0.0))  # no ratio yet: nothing clipped, the base step alone
    assert float(s) == 1.0


@pytest.mark.parametrize("lr", [0.0, t(0.0)])
def test_auto_scale_zero_lr_scales_nothing(lr):
    """A zero learning rate moves nothing whatever the scale: s = 1 (as l0l1_scale), never NaN from 0 * inf."""
    for norm in (0.0, 1.0, 1e30):
        s, _ = auto_scale(t(norm), lr, t(2.0), t(1.0))
        assert float(s) == 1.0


@pytest.mark.parametrize("amp", [1.0, 2.5, 10.0])
@pytest.mark.parametrize("low", [math.inf, 0.0, 0.5, 50.0])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 3.0])
def test_auto_scale_with_a_step_amplification(amp, low, ratio):
    """Momentum makes the step taken `amp` times the step set: the step-length limit and the base step
    1/low shrink by 1/amp, the learning rate does not."""
    for lr in (1e-3, 0.9, 20.0):
        for norm in NORMS:
            s, gamma = auto_scale(t(norm), lr, t(low), t(ratio), t(amp))
            eff, ref_gamma = auto_reference(norm, lr, low, ratio, amp)
            assert float(s) * lr == pytest.approx(eff, rel=1e-12), (lr, norm)
            assert float(gamma) == pytest.approx(ref_gamma, rel=1e-12)


@pytest.mark.parametrize("base_amp", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("low", [math.inf, 0.5, 50.0])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 3.0])
def test_auto_scale_with_its_own_amplification_for_the_base_step(base_amp, low, ratio):
    """The base step 1/low may be divided by another amplification than the step-length limit."""
    for lr in (1e-3, 0.9, 20.0):
        for norm in NORMS:
            s, gamma = auto_scale(t(norm), lr, t(low), t(ratio), t(2.0), t(base_amp))
            eff, ref_gamma = auto_reference(norm, lr, low, ratio, 2.0, base_amp)
            assert float(s) * lr == pytest.approx(eff, rel=1e-12), (lr, norm)
            assert float(gamma) == pytest.approx(ref_gamma, rel=1e-12)
