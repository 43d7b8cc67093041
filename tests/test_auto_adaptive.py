"""``auto`` under optimizers that normalize the gradient (Adam, AdamW, RMSprop, Adagrad).

References are independent of the clipper's own output where possible:

* the rule's closed form (:func:`~lightning_l0l1.rules.auto_adaptive_scale`) against hand arithmetic, and
  its threshold's floor against an average of the reported norms computed here;
* the first step: its length is the trust radius ``initial_step * max(||theta||, 1)`` when Adam's own
  first step (``lr`` per coordinate) is longer, measured on the parameters;
* every later step's length stays within the limits the estimate sets (a loose bound: the factor is set
  from the previous step's length);
* the whole run equals torch's Adam driven by hand with the learning rate and gradient factors the
  clipper reports, and resumes bitwise from a checkpoint;
* the learning rate is a tensor during ``optimizer.step()`` only: schedulers see their own floats, and a
  step that never runs (a GradScaler's overflow) changes nothing;
* no host read in the step; an optimizer that takes only float learning rates gets one.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _reference import F64, backward, batches
from _sync import HostReads
from torch import nn

from lightning_l0l1 import GradientClipper
from lightning_l0l1.rules import auto_adaptive_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize(
    ("norm", "low", "ratio", "natural", "radius"),
    [
        (4.0, 1.0, 1.0, 8.0, 100.0),  # both limits bind: gamma 2, step limit 2 over 8
        (1.0, 1.0, 1.0, 8.0, 100.0),  # norm below gamma: no clipping
        (4.0, 1.0, 1.0, 0.5, 100.0),  # the step is already shorter than 2 / ratio: c = 1
        (4.0, 1.0, 1.0, 8.0, 1.0),  # the trust radius binds
        (4.0, math.inf, 0.0, 8.0, 2.0),  # nothing measured: no clipping, the radius alone
    ],
)
def test_closed_form(norm, low, ratio, natural, radius):
    s, gamma, c = auto_adaptive_scale(*(torch.tensor(v, dtype=F64) for v in (norm, low, ratio, natural, radius)))
    want_gamma = 2 * low / ratio if ratio > 0 and math.isfinite(low) else math.inf
    want_s = min(1.0, want_gamma / norm)
    want_c = min(1.0, min(radius, 2 / ratio if ratio > 0 else math.inf) / natural)
    assert (float(s), float(gamma), float(c)) == pytest.approx((want_s, want_gamma, want_c), rel=1e-15)


@pytest.mark.parametrize(("raw", "typical", "want"), [(2.0, 3.0, 3.0), (2.0, 1.0, 2.0), (2.0, math.nan, 2.0)])
def test_the_threshold_is_floored_at_the_typical_norm(raw, typical, want):
    t = torch.tensor
    s, gamma, _ = auto_adaptive_scale(t(4.0), t(raw / 2), t(1.0), t(8.0), t(100.0), typical=t(typical))
    assert (float(gamma), float(s)) == (want, want / 4.0)


def test_the_floor_is_the_average_of_the_earlier_norms():
    """The threshold on every step is at least the average (weight 0.9 on the previous one) of the norms
    before it, computed here from the norms the clipper reports; the floor binds on some clipped steps."""
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.2, weight_decay=0.1)
    clipper = GradientClipper(nonfinite="propagate")
    average, bound = math.nan, 0
    for x, y in batches(40, F64):
        backward(net, x, y)
        clipper.step(opt)
        opt.step()
        st = clipper.latest()
        if not math.isnan(average):
            assert st["l0l1/max_norm"] >= average * (1 - 1e-12)
            bound += st["l0l1/scale"] < 1 and st["l0l1/max_norm"] == pytest.approx(average, rel=1e-12)
        norm = st["l0l1/grad_norm"]
        average = norm if math.isnan(average) else 0.9 * average + 0.1 * norm
    assert bound >= 2


@pytest.mark.parametrize(("make", "initial_step", "fraction"), [
    (lambda ps: torch.optim.Adam(ps, lr=0.5), None, 2e-1),  # Adam-type: the default bound is 0.2 * ||theta||
    (lambda ps: torch.optim.SGD(ps, lr=50.0), None, 1e-2),  # plain SGD keeps 0.01 * ||theta||
    (lambda ps: torch.optim.Adam(ps, lr=0.5), 1e-3, 1e-3),  # a bound given is the bound used
])
def test_the_first_step_is_the_trust_radius(make, initial_step, fraction):
    """Adam's first step moves every coordinate by lr * g / (|g| + eps), far longer than the radius here:
    the factor c = radius / (lr sqrt(n)) makes the step exactly the radius, measured on the parameters."""
    net = _net()
    opt = make(net.parameters())
    clipper = GradientClipper(nonfinite="propagate", initial_step=initial_step)
    x, y = batches(1, F64)[0]
    backward(net, x, y)
    before = _flat(net)
    clipper.step(opt)
    opt.step()
    length = float(torch.linalg.vector_norm(_flat(net) - before))
    assert length == pytest.approx(fraction * max(float(torch.linalg.vector_norm(before)), 1.0), rel=1e-6)


def test_every_step_stays_within_the_limits_it_sets():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.2, weight_decay=0.1)
    clipper = GradientClipper(nonfinite="propagate")
    for t, (x, y) in enumerate(batches(40, F64)):
        backward(net, x, y)
        before = _flat(net)
        clipper.step(opt)
        st = clipper._states[0]
        env = st.estimator.envelope
        radius = float(st.rule.delta) * 2.0 ** t
        limit = min(radius, 2 / float(env.ratio) if float(env.ratio) > 0 else math.inf)
        opt.step()
        length = float(torch.linalg.vector_norm(_flat(net) - before))
        assert length <= 1.5 * limit, (t, length, limit)
    assert int(clipper._states[0].counters.clipped) > 0


def test_run_equals_torch_adam_driven_by_hand():
    """The clipper only multiplies the gradients by ``scale`` and the learning rate by ``lr_effective / lr``:
    torch's Adam given those two by hand takes bitwise the same steps."""
    data = batches(25, F64)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    clipper = GradientClipper(nonfinite="propagate")
    ref = _net()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    for x, y in data:
        backward(net, x, y)
        backward(ref, x, y)
        clipper.step(opt)
        opt.step()
        st = clipper.latest()
        for p in ref.parameters():
            p.grad.mul_(st["l0l1/scale"])
        ref_opt.param_groups[0]["lr"] = torch.tensor(st["l0l1/lr_effective"], dtype=F64)
        ref_opt.step()
        ref_opt.param_groups[0]["lr"] = 0.05
    assert torch.equal(_flat(net), _flat(ref))
    assert int(clipper._states[0].counters.clipped) > 0


def test_resumes_bitwise(tmp_path):
    data = batches(20, F64)

    def run(clipper, net, opt, part):
        for x, y in part:
            backward(net, x, y)
            clipper.step(opt)
            opt.step()

    net, clipper = _net(), GradientClipper(nonfinite="propagate")
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    run(clipper, net, opt, data[:8])
    torch.save({"c": clipper.state_dict(), "n": net.state_dict(), "o": opt.state_dict()}, tmp_path / "ck.pt")
    run(clipper, net, opt, data[8:])
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    net2 = _net()
    net2.load_state_dict(ck["n"])
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.05)
    opt2.load_state_dict(ck["o"])
    assert opt2.param_groups[0]["lr"] == 0.05  # saved between steps: the user's float
    clipper2 = GradientClipper(nonfinite="propagate")
    clipper2.load_state_dict(ck["c"])
    run(clipper2, net2, opt2, data[8:])
    assert torch.equal(_flat(net), _flat(net2))
    assert clipper2.latest() == clipper.latest()


def test_the_learning_rate_is_scaled_for_the_step_only():
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    clipper = GradientClipper(nonfinite="propagate")
    seen, during = [], []
    for t, (x, y) in enumerate(batches(9, F64)):
        backward(net, x, y)
        clipper.step(opt)
        assert opt.param_groups[0]["lr"] == 0.1 * 0.5 ** (t // 3)  # applied when the step runs, not before
        if t == 0:  # runs after the clipper's pre-hook: sees the learning rate the step uses
            opt.register_step_pre_hook(lambda o, a, k: during.append(o.param_groups[0]["lr"]))
        opt.step()
        if t:
            assert isinstance(during[-1], torch.Tensor)
            assert float(during[-1]) == pytest.approx(clipper.latest()["l0l1/lr_effective"], rel=1e-15)
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert all(type(v) is float for v in seen)
    assert seen == [0.1] * 3 + [0.05] * 3 + [0.025] * 3


def test_a_skipped_step_changes_no_learning_rate():
    """A GradScaler that finds an overflow does not call ``optimizer.step()``: the factor is dropped."""
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    clipper = GradientClipper(nonfinite="propagate")
    x, y = batches(1, F64)[0]
    backward(net, x, y)
    clipper.step(opt)  # no opt.step() after it: nothing changed
    assert opt.param_groups[0]["lr"] == 0.1
    backward(net, x, y)
    clipper.step(opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    opt.step()
    assert float(seen[0]) == pytest.approx(clipper.latest()["l0l1/lr_effective"], rel=1e-15)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=0.05),
    lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1),
])
def test_no_host_read_in_the_step_and_no_warning(make):
    net = _net(torch.float32)
    opt = make(net.parameters())
    clipper = GradientClipper(nonfinite="propagate")
    counter = HostReads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(12):
            backward(net, x, y)
            with counter:
                clipper.step(opt)
            opt.step()
    assert counter.n == 0
    assert clipper.latest()["l0l1/smoothness_pairs"] == 11


class _FloatLrAdam(torch.optim.Adam):
    """An optimizer from outside torch.optim: given a Python float."""

    __module__ = "somewhere.else"


def test_optimizers_outside_torch_and_foreach_get_a_float():
    for make in (lambda ps: _FloatLrAdam(ps, lr=0.05), lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True)):
        net = _net()
        opt = make(net.parameters())
        clipper = GradientClipper(nonfinite="propagate")
        x, y = batches(1, F64)[0]
        backward(net, x, y)
        clipper.step(opt)
        seen = []
        opt.register_step_pre_hook(lambda o, a, k, seen=seen: seen.append(o.param_groups[0]["lr"]))
        opt.step()
        assert type(seen[0]) is float
        assert seen[0] == pytest.approx(clipper.latest()["l0l1/lr_effective"], rel=1e-15)
        assert opt.param_groups[0]["lr"] == 0.05


class _Lion(torch.optim.Optimizer):
    """A sign-based optimizer from outside torch.optim (Lion's update): its step ignores the gradient's scale."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99)):
        super().__init__(params, dict(lr=lr, betas=betas))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-float(group["lr"]))


class _PlainDescent(torch.optim.Optimizer):
    """Gradient descent from outside torch.optim, without `betas`."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-float(group["lr"]))


class SGD8bit(_PlainDescent):
    """A momentum SGD from another package that keeps ``(momentum, dampening)`` under ``betas``."""

    def __init__(self, params, lr=0.1):
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=(0.9, 0.0)))


@pytest.mark.parametrize(("make", "adaptive"), [
    (lambda ps: _Lion(ps, lr=0.05), True),
    (lambda ps: _PlainDescent(ps, lr=0.05), False),
    (lambda ps: SGD8bit(ps, lr=0.05), False),  # `betas`, but SGD by name
])
def test_an_optimizer_auto_does_not_know_is_named_with_how_it_is_treated(make, adaptive):
    net = _net()
    opt = make(net.parameters())
    clipper = GradientClipper(nonfinite="propagate")
    with pytest.warns(UserWarning) as record:
        for x, y in batches(6, F64):
            backward(net, x, y)
            clipper.step(opt)
            opt.step()
    messages = [str(w.message) for w in record if "does not know" in str(w.message)]
    assert len(messages) == 1  # once
    assert type(opt).__qualname__ in messages[0] and "mode='clip'" in messages[0]
    assert ("Adam-type" in messages[0]) == adaptive
    # Adam-type: a learning-rate factor is set for each step
    assert clipper._states[0].rule.adaptive == adaptive
    assert (clipper._states[0].rule.applied is not None) == adaptive
