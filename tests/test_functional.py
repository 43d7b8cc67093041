"""lightning_l0l1.functional against torch.nn.utils.clip_grad_norm_ and float64 closed forms."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from _reference import norm_rtol, ref_norm
from _sync import HostReads
from torch import nn

from lightning_l0l1.functional import clip_gradients_, grad_norm

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
FOREACH = [True, False, None]


def make_model(dtype: torch.dtype = torch.float32, frozen: bool = True) -> nn.Module:
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    if frozen:
        net[2].requires_grad_(False)
    return net


def backward(net: nn.Module, mult: float, dtype: torch.dtype = torch.float32) -> None:
    x = torch.linspace(-2, 2, 30, dtype=dtype).reshape(6, 5)
    (net(x).pow(2).sum() * mult).backward()


def grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


def set_random_grads(params: list[nn.Parameter], dtype: torch.dtype, scale: float) -> None:
    for p in params:
        p.grad = (torch.randn(p.shape, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- clip vs torch
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("mult", [100.0, 1e-4])  # clipped, and below the threshold
def test_clip_matches_torch_clip_grad_norm(mult, norm_type, dtype, foreach):
    ours = make_model(dtype)
    theirs = copy.deepcopy(ours)
    backward(ours, mult, dtype)
    backward(theirs, mult, dtype)
    assert ours[2].weight.grad is None  # frozen parameters take part with grad None

    norm = clip_gradients_(ours.parameters(), max_norm=0.7, norm_type=norm_type, foreach=foreach)
    ref = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm=0.7, norm_type=norm_type, foreach=foreach)

    assert norm.dim() == 0 and norm.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(norm, ref.to(norm.dtype), rtol=rtol, atol=0)
    assert (norm.item() > 0.7) == (mult > 1)  # both regimes are exercised
    for a, b in zip(grads(ours), grads(theirs)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)
    assert len(grads(ours)) == 4


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_single_tensor_matches_torch(norm_type):
    w = nn.Parameter(torch.zeros(4, 3))
    w.grad = torch.randn(4, 3) * 10
    v = nn.Parameter(torch.zeros(4, 3))
    v.grad = w.grad.clone()
    norm = clip_gradients_(w, max_norm=1.5, norm_type=norm_type)
    ref = torch.nn.utils.clip_grad_norm_(v, max_norm=1.5, norm_type=norm_type)
    torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, v.grad, rtol=1e-6, atol=0)
    assert torch.linalg.vector_norm(w.grad.double(), norm_type).item() == pytest.approx(1.5, rel=1e-5)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_closed_form_every_dtype(norm_type, dtype, foreach):
    params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(6, 4), (4,), (3, 3)]]
    set_random_grads(params, dtype, scale=5.0)
    before = [p.grad.double().clone() for p in params]
    n = ref_norm(before, norm_type)
    s = min(1.0, 0.9 / (n + 1e-6))
    norm = clip_gradients_(params, 0.9, "clip", norm_type, foreach=foreach)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert norm.dtype == acc
    assert norm.item() == pytest.approx(n, rel=norm_rtol(dtype))
    for p, b in zip(params, before):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, (b * s).to(dtype))


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", [1.0, 2.0])
def test_clip_fp16_overflowing_norm(norm_type, foreach):
    """torch's fp16 per-tensor norm is inf and zeroes the gradients; ours clips them."""
    g = torch.full((100_000,), 300.0, dtype=torch.float16)
    w, v = nn.Parameter(torch.zeros_like(g)), nn.Parameter(torch.zeros_like(g))
    w.grad, v.grad = g.clone(), g.clone()
    assert torch.isinf(torch.nn.utils.clip_grad_norm_(v, 1.0, norm_type))
    n = ref_norm([g], norm_type)
    norm = clip_gradients_(w, 1.0, norm_type=norm_type, foreach=foreach)
    assert norm.item() == pytest.approx(n, rel=2e-4)
    assert torch.isfinite(w.grad).all() and w.grad.any()
    torch.testing.assert_close(w.grad, (g.double() / (n + 1e-6)).half(), rtol=2e-3, atol=0)


# ---------------------------------------------------------------- adaptive
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_adaptive_closed_form(scale, norm_type, dtype, foreach):
    params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(5, 5), (5,), (2,)]]
    params.append(nn.Parameter(torch.zeros(3, dtype=dtype)))  # no grad: left out
    set_random_grads(params[:3], dtype, scale=scale)
    before = [p.grad.double().clone() for p in params[:3]]
    gamma = 0.8
    n = ref_norm(before, norm_type)
    s = gamma / (n + gamma)
    norm = clip_gradients_(params, gamma, mode="adaptive", norm_type=norm_type, foreach=foreach)
    assert norm.item() == pytest.approx(n, rel=norm_rtol(dtype))
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, (b * s).to(dtype))
    assert params[3].grad is None
    assert ref_norm([p.grad for p in params[:3]], norm_type) < gamma


# ---------------------------------------------------------------- grad_norm
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", [*NORM_TYPES, "inf"])
def test_grad_norm_matches_torch_and_does_not_modify(norm_type, dtype, foreach):
    net = make_model(dtype)
    backward(net, 3.0, dtype)
    before = grads(net)
    ours = grad_norm(net.parameters(), norm_type, foreach=foreach)
    p = float(norm_type)
    theirs = torch.nn.utils.get_total_norm(before, p)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)
    assert ours.item() == pytest.approx(ref_norm(before, p), rel=rtol)
    for a, b in zip(grads(net), before):
        assert torch.equal(a, b)


def test_grad_norm_single_tensor_and_half_precision():
    w = nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    assert grad_norm(w).item() == pytest.approx(5.0, rel=1e-7)
    h = nn.Parameter(torch.zeros(100_000, dtype=torch.float16))
    h.grad = torch.full_like(h, 300.0)
    out = grad_norm([h])
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(300.0 * math.sqrt(1e5), rel=2e-4)


def test_no_grads_returns_zero_and_changes_nothing():
    net = make_model()
    assert grad_norm(net.parameters()).item() == 0.0
    assert grad_norm([]).item() == 0.0
    assert clip_gradients_(net.parameters(), 1.0).item() == 0.0
    assert clip_gradients_([], 1.0, mode="adaptive").item() == 0.0
    assert all(p.grad is None for p in net.parameters())


def test_parameters_generator_is_consumed_once():
    net = make_model(frozen=False)
    backward(net, 50.0)
    before = grads(net)
    n = ref_norm(before, 2.0)
    clip_gradients_((p for p in net.parameters()), 1.0)  # a one-shot iterator
    for a, b in zip(grads(net), before):
        torch.testing.assert_close(a, (b.double() * min(1.0, 1.0 / (n + 1e-6))).float())


@pytest.mark.parametrize("mode", ["clip", "adaptive"])
def test_nonfinite_is_propagated_like_torch(mode):
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert math.isnan(clip_gradients_(w, 1.0, mode=mode).item())
    assert torch.isnan(w.grad).all()
    v = nn.Parameter(torch.zeros(3))
    v.grad = torch.tensor([1.0, float("inf"), 2.0])
    assert clip_gradients_(v, 1.0, mode=mode).item() == math.inf
    assert v.grad[0].item() == 0.0 and v.grad[2].item() == 0.0  # scale 0 for an infinite norm


# ---------------------------------------------------------------- argument errors
def _param_with_grad() -> nn.Parameter:
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    return w


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("nan"), float("inf"), "a", True, None, [1.0]])
def test_invalid_max_norm(value):
    w = _param_with_grad()
    with pytest.raises(ValueError) as info:
        clip_gradients_(w, value)
    assert "`max_norm`" in str(info.value)
    assert repr(value) in str(info.value)
    assert torch.equal(w.grad, torch.ones(3))  # nothing was scaled


@pytest.mark.parametrize("value", ["foo", "l0l1", None, 1, "CLIP"])
def test_invalid_mode(value):
    w = _param_with_grad()
    with pytest.raises(ValueError) as info:
        clip_gradients_(w, 1.0, mode=value)
    assert "`mode`" in str(info.value)
    assert repr(value) in str(info.value)
    assert torch.equal(w.grad, torch.ones(3))


@pytest.mark.parametrize("value", [0, -1, float("nan"), "two", True, None])
def test_invalid_norm_type(value):
    w = _param_with_grad()
    for call in (lambda: clip_gradients_(w, 1.0, norm_type=value), lambda: grad_norm(w, value)):
        with pytest.raises(ValueError) as info:
            call()
        assert "`norm_type`" in str(info.value)
        assert repr(value) in str(info.value)
    assert torch.equal(w.grad, torch.ones(3))


# ---------------------------------------------------------------- host syncs and imports
def test_sync_counter_sees_item():
    counter = HostReads()
    with counter:
        torch.ones(()).item()
        bool(torch.ones(()) > 0)
    assert counter.count == 2


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("mode", ["clip", "adaptive"])
def test_no_host_sync(mode, norm_type):
    net = make_model(frozen=False)
    backward(net, 10.0)
    counter = HostReads()
    with counter:
        for _ in range(5):
            clip_gradients_(net.parameters(), 1.0, mode=mode, norm_type=norm_type)
            grad_norm(net.parameters(), norm_type)
    assert counter.count == 0


def test_torch_only_imports():
    code = (
        "import sys\n"
        "import lightning_l0l1.functional, lightning_l0l1.norms, lightning_l0l1.rules, lightning_l0l1.clipper\n"
        "import lightning_l0l1.estimator, lightning_l0l1.modes, lightning_l0l1.gradients, lightning_l0l1.state\n"
        "import lightning_l0l1.stats, lightning_l0l1.validation\n"
        "bad = [m for m in ('pytorch_lightning', 'lightning', 'lightning_fabric', 'wandb', 'torchmetrics')"
        " if m in sys.modules]\n"
        "assert 'torch' in sys.modules\n"
        "print('LOADED:' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED:"


@pytest.mark.parametrize("fn", [clip_gradients_, grad_norm])
def test_sparse_gradients_are_refused_with_the_callbacks_message(fn):
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    args = (emb.parameters(), 1.0) if fn is clip_gradients_ else (emb.parameters(),)
    with pytest.raises(RuntimeError, match="does not support sparse gradients; use dense embeddings"):
        fn(*args)


@pytest.mark.parametrize("fn", [clip_gradients_, grad_norm])
@pytest.mark.parametrize(("value", "hint"), [(None, ""), (nn.Linear(2, 2), "model.parameters()"), (3.0, "")])
def test_parameters_that_are_not_tensors_are_named(fn, value, hint):
    args = (value, 1.0) if fn is clip_gradients_ else (value,)
    with pytest.raises(TypeError, match="`parameters` must be a tensor or an iterable of tensors") as info:
        fn(*args)
    assert type(value).__name__ in str(info.value) and hint in str(info.value)


@pytest.mark.parametrize("fn", [clip_gradients_, grad_norm])
@pytest.mark.parametrize("value", ["x", 1, "True"])
def test_foreach_is_checked(fn, value):
    w = nn.Parameter(torch.zeros(2))
    w.grad = torch.ones(2)
    args = ([w], 1.0) if fn is clip_gradients_ else ([w],)
    with pytest.raises(ValueError, match="`foreach` must be True, False or None") as info:
        fn(*args, foreach=value)
    assert repr(value) in str(info.value)
