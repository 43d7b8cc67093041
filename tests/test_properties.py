"""Property-based tests (hypothesis): norms, clipping and the clipper on arbitrary gradient sets,
non-finite entries at arbitrary positions, and arbitrary argument values for every public entry point.

Every property compares against an independent reference (a float64 norm, ``torch.nn.utils``, the
optimizer's own state before the step), never against the package's own output. The example budget
comes from the hypothesis profile registered in ``conftest.py`` ("default", or
``HYPOTHESIS_PROFILE=long``).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest
import torch
from _reference import norm_rtol, ref_norm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_l0l1 import GradientClipper
from lightning_l0l1.functional import clip_gradients_, grad_norm

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
NAN_KEYS = {"window", "amp_window", "intended"}  # NaN marks an empty slot there, by design
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


def fast(**kwargs: Any) -> settings:
    """The loaded profile, without the health checks that tiny torch examples trip (a smaller budget where given)."""
    return settings(suppress_health_check=_SUPPRESS, **kwargs)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype the package accumulates a norm of ``dtype`` gradients in (float32 for the half types)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- gradient sets


@st.composite
def tensors(draw, dtype: torch.dtype, max_elems: int = 50) -> torch.Tensor:
    """A small tensor of ``dtype`` (up to 3 dims): zeros, small values, and a magnitude up to the dtype's limit."""
    ndim = draw(st.integers(0, 3))
    shape: list[int] = []
    budget = max_elems
    for _ in range(ndim):
        n = draw(st.integers(1, max(1, min(6, budget))))
        shape.append(n)
        budget //= n
    numel = math.prod(shape)
    vals = draw(st.lists(st.one_of(st.just(0.0), st.floats(-4.0, 4.0)), min_size=numel, max_size=numel))
    fi = torch.finfo(dtype)
    # a binary exponent from the smallest normal to the largest finite magnitude of the dtype
    lo, hi = int(math.log2(fi.tiny)), int(math.log2(fi.max)) - 2
    exp = draw(st.one_of(st.just(0), st.integers(-10, 10), st.integers(lo, hi)))
    t = torch.ldexp(torch.tensor(vals, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64))
    t = t.clamp(-fi.max, fi.max).to(dtype)  # finite after the cast (clamped to the dtype's range)
    t = torch.nan_to_num(t, posinf=fi.max, neginf=-fi.max)
    return t.reshape(shape)


@st.composite
def grad_sets(draw, min_size: int = 0, max_size: int = 6):
    """``(params, dtype)``: parameters of one dtype, some frozen (grad ``None``)."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(min_size, max_size))
    params = []
    for _ in range(n):
        g = draw(tensors(dtype))
        p = nn.Parameter(torch.zeros_like(g))
        if draw(st.booleans()) or draw(st.booleans()):  # 3 in 4 have a gradient
            p.grad = g
        params.append(p)
    return params, dtype


def _expected_norm_check(got: float, grads: list[torch.Tensor], p: float, dtype: torch.dtype) -> None:
    """``got`` against the float64 norm, allowing the overflow/underflow of the accumulation dtype.

    The reference is taken of the gradients divided by a power of two (exact), so that it never overflows.
    Torch's norm kernels accumulate ``sum |x|^p`` unscaled in the accumulation dtype: where that sum leaves
    its range, an infinite (overflow) or too small (underflow) norm is what they give, as torch does.
    """
    rtol = norm_rtol(dtype)
    if not grads:
        assert got == 0.0
        return
    m = max(float(g.detach().double().abs().max()) for g in grads)
    if m == 0.0:
        assert got == 0.0
        return
    e = math.frexp(m)[1]
    ref = math.ldexp(ref_norm([torch.ldexp(g.double(), torch.tensor(-e, dtype=torch.float64)) for g in grads], p), e)
    if math.isinf(p):
        assert got == pytest.approx(ref, rel=rtol, abs=0)
        return
    fi = torch.finfo(_acc(dtype))
    log2_sum = p * math.log2(ref)  # log2 of sum |x|^p
    if math.log2(fi.tiny) + 40 < log2_sum < math.log2(fi.max) - 1:
        assert got == pytest.approx(ref, rel=rtol, abs=0), (got, ref)
    elif log2_sum >= math.log2(fi.max) + 1:
        assert got == math.inf
    elif log2_sum >= math.log2(fi.max) - 1:  # at the edge of the range: either
        assert got == math.inf or got == pytest.approx(ref, rel=rtol, abs=0)
    else:  # underflow: sub-normal p-th powers are lost (never more than the true norm)
        assert 0.0 <= got <= ref * (1 + rtol)


# ---------------------------------------------------------------------------- 1. arbitrary gradient sets


@fast()
@given(grad_sets(), st.sampled_from(NORM_TYPES), st.sampled_from([None, True, False]))
def test_grad_norm_matches_float64_reference(gs, p, foreach):
    params, dtype = gs
    grads = [q.grad for q in params if q.grad is not None]
    got = float(grad_norm(params, p, foreach=foreach))
    _expected_norm_check(got, grads, p, dtype)


def _grad_rtol_atol(dtype: torch.dtype) -> tuple[float, float]:
    """Scaled-gradient tolerance: a few roundings of the scale and of the product, and one subnormal step."""
    fi = torch.finfo(dtype)
    smallest_subnormal = fi.tiny * fi.eps
    if dtype == torch.float64:
        return 1e-10, 2 * smallest_subnormal
    if dtype == torch.float32:
        return 2e-5, 2 * smallest_subnormal
    # the norm's error (bfloat16: its per-tensor norms are rounded to bfloat16) and one rounding of each side
    return 2 * fi.eps + norm_rtol(dtype), 2 * smallest_subnormal


@fast()
@given(grad_sets(), st.sampled_from(NORM_TYPES), st.floats(1e-3, 1e3), st.sampled_from([None, True, False]))
def test_clip_gradients_matches_torch(gs, p, max_norm, foreach):
    """``clip`` gives torch's ``clip_grad_norm_`` gradients.

    float32/float64: torch on a same-dtype copy. float16/bfloat16: torch computes the norm *and the
    clipping coefficient* in the half dtype (its norm overflows above 65504 in float16, and a tiny
    coefficient is a half subnormal with a few bits: max_norm=2**-8 on a large float16 gradient gave a
    2**-7 relative error), while the package, by design, accumulates in float32 and multiplies by a float32
    scale. The reference there is torch's function on the exact float32 upcast of the same gradients,
    rounded back to the half dtype.
    """
    params, dtype = gs
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    twins = []
    for q in params:
        t = nn.Parameter(q.detach().to(ref_dtype))
        t.grad = None if q.grad is None else q.grad.to(ref_dtype)  # exact upcast
        twins.append(t)
    clip_gradients_(params, max_norm, mode="clip", norm_type=p, foreach=foreach)
    if twins:
        torch.nn.utils.clip_grad_norm_(twins, max_norm, norm_type=p)
    rtol, atol = _grad_rtol_atol(dtype)
    expected = [t.grad.to(dtype) for t in twins if t.grad is not None]
    got = [q.grad for q in params if q.grad is not None]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)


def _finite_walk(obj: Any, path: str = "") -> None:
    """Every float and tensor value is finite or infinite, never NaN (except the keys with empty slots)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in NAN_KEYS:
                continue
            _finite_walk(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite_walk(v, f"{path}[{i}]")
    elif isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            assert not torch.isnan(obj).any(), path
    elif isinstance(obj, float):
        assert not math.isnan(obj), path


MODES = {
    "clip": {"max_norm": 1.0},
    "adaptive": {"max_norm": 0.5},
    "l0l1": {"l0": 2.0, "l1": 0.5},
    "auto": {},
}


@fast()
@given(grad_sets(min_size=1), st.sampled_from(sorted(MODES)), st.sampled_from(NORM_TYPES),
       st.floats(1e-4, 10.0), st.integers(1, 3))
def test_clipper_scale_in_unit_interval_and_state_without_nan(gs, mode, p, lr, steps):
    params, _ = gs
    grads0 = [None if q.grad is None else q.grad.clone() for q in params]
    clipper = GradientClipper(mode, norm_type=p, **MODES[mode])
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        for q, g in zip(params, grads0):
            q.grad = None if g is None else g.clone()
        out = clipper.step(opt)
        if out is None:
            assert all(g is None for g in grads0)
            return
        rec = out.record
        assert rec is not None
        # finite gradients: also a norm that overflows (inf) scales by a factor in [0, 1]
        s = float(rec.scale)
        assert 0.0 <= s <= 1.0, (s, out.norm)
        for le in rec.lr_effective.tolist():
            assert 0.0 <= le / lr <= 1.0 + 1e-6, (le, lr, out.norm)
        opt.step()
    _finite_walk(clipper.latest())
    _finite_walk(clipper.state_dict())


# ---------------------------------------------------------------------------- 2. non-finite entries


@st.composite
def nonfinite_cases(draw):
    """A small float32 model's gradients, and the same with NaN/inf written at arbitrary positions."""
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=2), min_size=1, max_size=3))
    grads = [torch.tensor(draw(st.lists(st.floats(-3, 3), min_size=math.prod(s), max_size=math.prod(s))),
                          dtype=torch.float32).reshape(s) for s in shapes]
    bad = [g.clone() for g in grads]
    n_bad = draw(st.integers(1, 4))
    for _ in range(n_bad):
        i = draw(st.integers(0, len(bad) - 1))
        j = draw(st.integers(0, bad[i].numel() - 1))
        bad[i].view(-1)[j] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return grads, bad


@fast()
@given(nonfinite_cases(), st.sampled_from(sorted(MODES)), st.sampled_from(["sgd", "adam", "adam_fused"]))
def test_nonfinite_step_is_skipped(case, mode, opt_name):
    grads, bad = case
    params = [nn.Parameter(torch.randn_like(g)) for g in grads]
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=0.01, fused=opt_name == "adam_fused")
    clipper = GradientClipper(mode, nonfinite="skip", **MODES[mode])
    # one finite step first: the optimizer then has state (momentum, moments) to leave untouched
    for q, g in zip(params, grads):
        q.grad = g.clone()
    assert clipper.step(opt) is not None
    opt.step()
    latest_finite = clipper.latest()
    before_params = [q.detach().clone() for q in params]
    before_state = copy.deepcopy(opt.state_dict())
    for q, g in zip(params, bad):
        q.grad = g.clone()
    out = clipper.step(opt)
    opt.step()
    assert out is not None and out.finite is not True
    for a, b in zip(params, before_params):
        assert torch.equal(a.detach(), b)
    after_state = opt.state_dict()
    for k, st_before in before_state["state"].items():
        for name, v in st_before.items():
            w = after_state["state"][k][name]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), (k, name)
            else:
                assert v == w, (k, name)
    latest = clipper.latest()
    assert latest["l0l1/nonfinite_steps"] == 1
    assert latest["l0l1/steps"] == 2
    for name in ("grad_norm", "grad_norm_scaled", "scale", "max_norm", "lr_effective"):
        assert latest[f"l0l1/{name}"] == latest_finite[f"l0l1/{name}"], name


# ---------------------------------------------------------------------------- 3. arbitrary arguments

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.just(torch.tensor(1.0)), st.just(torch.tensor([1.0, 2.0])), st.just(torch.tensor(-1)),
    st.sampled_from(["clip", "adaptive", "l0l1", "auto", "skip", "zero", "raise", "propagate", "inf", "cpu"]),
    st.just(torch.device("cpu")), st.just([1.0]), st.just(object()),
)
CLIPPER_ARGS = ("mode", "max_norm", "l0", "l1", "norm_type", "nonfinite", "foreach", "estimate", "estimate_every",
                "snapshot_device", "initial_step", "fused_handoff", "probe")
CALLBACK_ARGS = (*CLIPPER_ARGS[:-1], "probe_loss", "log_stats", "log_every_n_steps", "prefix", "prog_bar",
                 "wandb_table_every")
NO_LR_CONSTANTS = ("clip", "adaptive", "auto")
# A value for `parameters`: anything but an iterable of non-tensors (a string, a list of numbers), for which
# the functional API raises AttributeError (see test_parameters_iterable_of_non_tensors below).
PARAM_JUNK = JUNK


def _check_error(err: Exception, changed: dict[str, Any]) -> None:
    assert isinstance(err, (ValueError, TypeError)), f"{type(err).__name__}: {err}"
    msg = str(err)
    # "`max_norm`", or the argument with its value ("`probe=True`")
    assert any(re.search(rf"`{name}[`=]", msg) for name in changed), (msg, sorted(changed))


def _one_finite_step(clipper: GradientClipper) -> None:
    """One step on a small finite gradient leaves finite gradients (``None`` only for a skipped step).

    A step is non-finite here only where float32 cannot hold ``sum |g|^p`` (a large ``norm_type``, e.g.
    4**64 > 3.4e38): torch's norm kernels overflow there too, and the non-finite policy then applies.
    """
    w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    g = torch.tensor([3.0, -4.0, 0.25])
    w.grad = g.clone()
    out = clipper.step(opt)
    assert out is not None
    p = clipper.norm_type
    overflows = not math.isinf(p) and p * math.log2(ref_norm([g], p)) > math.log2(torch.finfo(torch.float32).max)
    if out.finite is False or not torch.isfinite(out.norm):
        assert overflows, (p, out)
    if w.grad is None:
        assert clipper.nonfinite == "skip" and overflows
    else:
        assert torch.isfinite(w.grad).all(), w.grad


@fast()
@given(st.sampled_from(sorted(MODES)), st.fixed_dictionaries({}, optional={k: JUNK for k in CLIPPER_ARGS}))
def test_clipper_arguments(mode, changed):
    assume(changed)
    kwargs = {"mode": mode, **MODES[mode], **changed}
    try:
        clipper = GradientClipper(**kwargs)
    except Exception as err:  # the exception's type is the property
        _check_error(err, changed)
        return
    if clipper.mode in NO_LR_CONSTANTS:
        _one_finite_step(clipper)


@fast()
@given(st.fixed_dictionaries(
    {}, optional={"parameters": PARAM_JUNK, **{k: JUNK for k in ("max_norm", "mode", "norm_type", "foreach")}}
))
def test_clip_gradients_arguments(changed):
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([3.0, -4.0, 0.0])
    kwargs = {"parameters": [w], "max_norm": 1.0, "mode": "clip", "norm_type": 2.0, "foreach": None, **changed}
    foreach = kwargs.pop("foreach")
    try:
        clip_gradients_(**kwargs, foreach=foreach)
    except Exception as err:
        _check_error(err, changed)
        return
    assert torch.isfinite(w.grad).all()


@fast()
@given(st.fixed_dictionaries({}, optional={"parameters": PARAM_JUNK, **{k: JUNK for k in ("norm_type", "foreach")}}))
def test_grad_norm_arguments(changed):
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([3.0, -4.0, 0.0])
    kwargs = {"parameters": [w], "norm_type": 2.0, "foreach": None, **changed}
    foreach = kwargs.pop("foreach")
    try:
        grad_norm(**kwargs, foreach=foreach)
    except Exception as err:
        _check_error(err, changed)


@pytest.fixture(scope="module")
def callback_cls():
    from lightning_l0l1.pytorch_lightning import L0L1Clipping

    return L0L1Clipping


@fast()
@given(st.sampled_from(sorted(MODES)), st.fixed_dictionaries({}, optional={k: JUNK for k in CALLBACK_ARGS}))
def test_callback_arguments(callback_cls, mode, changed):
    assume(changed)
    kwargs = {"mode": mode, **MODES[mode], **changed}
    try:
        cb = callback_cls(**kwargs)
    except Exception as err:
        _check_error(err, changed)
        return
    if cb.clipper.mode in NO_LR_CONSTANTS:
        _one_finite_step(cb.clipper)


@pytest.mark.parametrize("entry", ["grad_norm", "clip_gradients_"])
@pytest.mark.parametrize("parameters", ["0", [1.0]], ids=["str", "list_of_float"])
def test_parameters_iterable_of_non_tensors(entry, parameters):
    """Found by hypothesis (minimal input ``grad_norm(parameters='0')``): an AttributeError before."""
    fn = grad_norm if entry == "grad_norm" else lambda ps: clip_gradients_(ps, 1.0)
    with pytest.raises((ValueError, TypeError), match="`parameters`"):
        fn(parameters)
