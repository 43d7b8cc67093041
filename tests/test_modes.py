"""Contract tests over the rule registry (``lightning_l0l1.modes.RULES``): every mode, present and future.

Each test is parametrised over the registry itself, so a new mode is held to the same contract the
moment it is registered; :data:`SETTINGS` must give it valid settings (a test checks it does).
"""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
import torch
from _reference import ref_norm
from _sync import HostReads
from torch import nn

from lightning_l0l1.clipper import GradientClipper
from lightning_l0l1.estimator import envelope_init, envelope_update
from lightning_l0l1.gradients import Gradients
from lightning_l0l1.modes import RULES, Mode, Rule, StepContext, make_rule

#: Valid settings for each registered mode.
SETTINGS: dict[str, dict[str, Any]] = {
    "auto": {},
    "clip": {"max_norm": 0.7},
    "adaptive": {"max_norm": 0.7},
    "l0l1": {"l0": 1.0, "l1": 2.0},
}
ALL = sorted(RULES)


def _opt(n_groups: int = 2, momentum: float = 0.0) -> tuple[list[nn.Parameter], torch.optim.SGD]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(5, 3), (3,), (4, 2), (2,)]]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.3}] if n_groups == 2 else [{"params": params}]
    return params, torch.optim.SGD(groups, lr=0.1, momentum=momentum)


def _set_grads(params: list[nn.Parameter], scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale


def _context(opt: torch.optim.Optimizer, steps: int = 3) -> StepContext:
    grads = Gradients.collect(opt)
    assert grads is not None
    norms = grads.norms(2.0)
    envelope = envelope_init()
    for n, s in [(1.0, 2.0), (3.0, 4.0), (0.5, 1.5)]:
        envelope = envelope_update(envelope, torch.tensor(n, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    return StepContext(opt, grads, norms, torch.linalg.vector_norm(norms), 2.0,
                       [g["lr"] for g in opt.param_groups], steps=steps, envelope=envelope)


def test_the_registry_is_the_mode_literal_and_every_mode_has_test_settings():
    assert set(get_args(Mode)) == set(RULES) == set(SETTINGS)
    for name, rule in RULES.items():
        assert rule.name == name and issubclass(rule, Rule)


@pytest.mark.parametrize("mode", ALL)
def test_every_mode_builds_from_its_settings_and_the_clipper_reports_them(mode):
    clipper = GradientClipper(mode, **SETTINGS[mode])
    assert clipper.mode == mode and isinstance(clipper.rule, RULES[mode])
    for k, v in SETTINGS[mode].items():
        assert getattr(clipper, k) == v
    assert clipper.estimate is RULES[mode].needs_estimate
    assert clipper.settings()["mode"] == mode


@pytest.mark.parametrize("mode", ALL)
@pytest.mark.parametrize("setting", ["max_norm", "l0", "l1"])
@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "x", True])
def test_every_mode_refuses_a_bad_value_of_each_setting_by_name(mode, setting, bad):
    with pytest.raises(ValueError, match=f"`{setting}`") as info:
        make_rule(mode, **{**SETTINGS[mode], setting: bad})
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_an_unknown_mode_is_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match="`mode`") as info:
        make_rule("clamp")
    assert "'clamp'" in str(info.value) and all(repr(m) in str(info.value) for m in RULES)


@pytest.mark.parametrize("mode", ALL)
@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("scale", [0.0, 1e-4, 1.0, 1e3, 1e30])
def test_scales_are_in_0_1_one_per_group_where_the_lr_enters_and_read_nothing_on_the_host(mode, n_groups, scale):
    params, opt = _opt(n_groups)
    _set_grads(params, scale, seed=1)
    rule = make_rule(mode, **SETTINGS[mode])
    state = rule.init()
    ctx = _context(opt)
    with HostReads() as reads:
        rule.begin(state, ctx)
        scales, threshold = rule.scales(state, ctx)
    assert reads.n == 0
    assert len(scales) == (n_groups if rule.per_group else 1)
    for s in scales:
        assert s.shape == () and 0.0 <= float(s) <= 1.0
    assert isinstance(threshold, float) or (isinstance(threshold, torch.Tensor) and threshold.shape == ())


@pytest.mark.parametrize("mode", ALL)
def test_scales_never_grow_with_the_norm(mode):
    params, opt = _opt(1)
    rule = make_rule(mode, **SETTINGS[mode])
    state = rule.init()
    last = math.inf
    for k, scale in enumerate([1e-3, 1e-1, 1.0, 10.0, 1e3]):
        _set_grads(params, scale, seed=2)
        ctx = _context(opt)
        rule.begin(state, ctx)
        s = float(rule.scales(state, ctx)[0][0])
        assert s <= last + 1e-15, (k, s, last)
        last = s


@pytest.mark.parametrize("mode", ALL)
def test_the_step_scales_the_gradients_by_the_rules_factor(mode):
    """Whatever the rule, the clipper multiplies each group's gradients by that group's factor."""
    params, opt = _opt(2)
    _set_grads(params, 50.0, seed=3)
    before = [p.grad.clone() for p in params]
    clipper = GradientClipper(mode, **SETTINGS[mode])
    out = clipper.step(opt)
    lr_eff = out.record.lr_effective.tolist()
    for i, (p, g) in enumerate(zip(params, before)):
        group = 0 if i < 2 else 1
        s = lr_eff[group] / opt.param_groups[group]["lr"]
        torch.testing.assert_close(p.grad, g * s, rtol=1e-12, atol=0)
    assert float(out.norm) == pytest.approx(ref_norm(before, 2.0), rel=1e-12)


@pytest.mark.parametrize("mode", ALL)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_resume_from_a_state_dict_is_bitwise(mode, momentum, tmp_path):
    def run(clipper: GradientClipper, params, opt, seeds) -> None:
        for seed in seeds:
            _set_grads(params, 5.0, seed)
            for p in params:  # the gradient of 0.5 ||p||^2 plus noise: a trajectory that depends on the steps
                p.grad.add_(p.detach())
            clipper.step(opt)
            opt.step()

    params, opt = _opt(2, momentum)
    full = GradientClipper(mode, **SETTINGS[mode])
    run(full, params, opt, range(6))
    torch.save({"clipper": full.state_dict(), "opt": opt.state_dict(), "params": [p.detach() for p in params]},
               tmp_path / "ckpt.pt")
    run(full, params, opt, range(6, 12))

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    params2, opt2 = _opt(2, momentum)
    with torch.no_grad():
        for p, q in zip(params2, saved["params"]):
            p.copy_(q)
    opt2.load_state_dict(saved["opt"])
    resumed = GradientClipper(mode, **SETTINGS[mode])
    resumed.load_state_dict(saved["clipper"])
    run(resumed, params2, opt2, range(6, 12))
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert resumed.latest() == full.latest()


@pytest.mark.parametrize("mode", ALL)
def test_a_nonfinite_step_changes_no_parameter_and_no_record(mode):
    params, opt = _opt(2)
    clipper = GradientClipper(mode, **SETTINGS[mode])
    _set_grads(params, 5.0, seed=4)
    clipper.step(opt)
    opt.step()
    before, stats = [p.detach().clone() for p in params], clipper.latest()
    _set_grads(params, 5.0, seed=5)
    params[1].grad[0] = math.nan
    out = clipper.step(opt)
    opt.step()
    assert out.finite is False and out.action == "skipped"
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    after = clipper.latest()
    assert after["l0l1/nonfinite_steps"] == 1 and after["l0l1/steps"] == stats["l0l1/steps"] + 1
    for k in ("grad_norm", "grad_norm_scaled", "scale", "max_norm", "lr_effective", "lr_effective_pg1"):
        assert after[f"l0l1/{k}"] == stats[f"l0l1/{k}"], k


def test_a_new_mode_is_one_registry_entry(monkeypatch):
    """A rule registered in RULES is a mode of the clipper, with nothing else to change."""

    class Half(Rule):
        name = "half"

        @classmethod
        def from_settings(cls, max_norm=None, l0=None, l1=None, initial_step=1e-2) -> Rule:
            return cls()

        def scales(self, state, ctx):
            return [torch.full_like(ctx.norm, 0.5)], math.inf

    monkeypatch.setitem(RULES, "half", Half)
    params, opt = _opt(2)
    _set_grads(params, 1.0, seed=6)
    before = [p.grad.clone() for p in params]
    clipper = GradientClipper("half")  # type: ignore[arg-type]
    clipper.step(opt)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g * 0.5)
    latest = clipper.latest()
    assert latest["l0l1/scale"] == 0.5 and latest["l0l1/clip_rate"] == 0.0
