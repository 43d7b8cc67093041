"""Conditional computation: the set of parameters with a gradient changes from step to step.

Alternating heads, experts that receive no tokens, layers unfrozen mid-run and param groups added
mid-run. The estimator pairs a parameter only with itself (by its place in the optimizer, never by
shape). Every secant it forms is compared with a reference computed here from the gradients and
parameters recorded at each step, keyed by the parameter objects themselves:

* the set of step ``t`` equals the set of step ``t - 1``: the secant over it, between ``t - 1`` and ``t``;
* else, if the set of ``t - 1`` differed from that of ``t - 2`` and the set of ``t`` equals the set of
  ``t - 2`` (two heads used in turn): the secant over it between ``t - 2`` and ``t``;
* else the secant between ``t - 1`` and ``t`` over the parameters that have a gradient at both
  (none in common: no pair);

always paired with the log-mean of the whole gradient norms at its two ends, and with the length of the
step just taken, ``||theta_t - theta_(t-1)||`` over the parameters that had a gradient at ``t - 1``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Optional

import pytest
import torch
from torch import Tensor, nn

from lightning_l0l1.clipper import GradientClipper
from lightning_l0l1.estimator import Secant

F64 = torch.float64
Step = dict[int, Tensor]


def ref_log_mean(a: float, b: float) -> float:
    return a if abs(math.log(a) - math.log(b)) < 1e-6 else (a - b) / (math.log(a) - math.log(b))


def norm_over(x: Step, y: Step, keys: list[int]) -> float:
    return math.sqrt(sum(float((x[k] - y[k]).double().pow(2).sum()) for k in keys))


def whole_norm(g: Step) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in g.values()))


def expected_pairs(grads: list[Step], params: list[Step], every: list[Step]) -> dict[int, tuple[float, float, float]]:
    """Step -> (norm, smoothness, step length) of the pair the estimator should form there (see the module)."""
    out = {}
    sets = [sorted(g) for g in grads]
    for t in range(1, len(grads)):
        if sets[t] == sets[t - 1]:
            start, keys = t - 1, sets[t]
        elif t >= 2 and sets[t - 1] != sets[t - 2] and sets[t] == sets[t - 2]:
            start, keys = t - 2, sets[t]
        else:
            start, keys = t - 1, sorted(set(sets[t]) & set(sets[t - 1]))
        if not keys:
            continue
        smooth = norm_over(grads[start], grads[t], keys) / norm_over(params[start], params[t], keys)
        length = norm_over(every[t - 1], every[t], sets[t - 1])
        out[t] = (ref_log_mean(whole_norm(grads[start]), whole_norm(grads[t])), smooth, length)
    return out


class Experts(nn.Module):
    """A trunk always in use and three experts (heads) of the same shape, used as the scenario says."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.experts = nn.ModuleList(nn.Linear(8, 2) for _ in range(3))

    def forward(self, x: Tensor, used: list[int]) -> Tensor:
        h = torch.tanh(self.trunk(x))
        out = h.pow(2).mean()  # the trunk always has a gradient
        for k in used:
            out = out + (self.experts[k](h) - x[:, :2]).pow(2).mean()
        return out


def alternate(t: int) -> list[int]:
    return [t % 2]


_ROUTES = [[0, 1], [1], [1], [0, 2], [0, 1, 2], [2], [0, 2], [1], [], [0]]


def routed(t: int) -> list[int]:
    """Experts chosen per step; some steps give an expert no token (and one gives none any)."""
    return _ROUTES[t % len(_ROUTES)]


SCENARIOS = ["alternating_heads", "experts_without_tokens", "unfrozen_mid_run", "param_group_added_mid_run"]


def run(scenario: str, snapshot: str, steps: int = 16, momentum: float = 0.9, clipper: Optional[GradientClipper] = None,
        stop: Optional[int] = None):
    """Train ``scenario`` with ``auto`` in float64; record each step's raw gradients and parameters."""
    torch.manual_seed(0)
    model = Experts().to(F64)
    route: Callable[[int], list[int]] = alternate if scenario == "alternating_heads" else routed
    if scenario == "param_group_added_mid_run":
        opt = torch.optim.SGD([*model.trunk.parameters(), *model.experts[0].parameters()], lr=0.3, momentum=momentum)
        route = lambda t: [0, 1] if t >= 6 else [0]  # noqa: E731
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum)
    if scenario == "unfrozen_mid_run":
        model.experts[2].requires_grad_(False)
        route = lambda t: [0, 2]  # noqa: E731
    clipper = clipper or GradientClipper(snapshot=snapshot)  # type: ignore[arg-type]
    seen: dict[int, tuple[float, float, float]] = {}
    observe = clipper.rule.observe
    step_now = [0]

    def spy(state: object, secant: Secant) -> None:
        seen[step_now[0]] = (float(secant.norm), float(secant.smooth), float(secant.step))
        observe(state, secant)

    clipper.rule.observe = spy  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(1)
    grads, params, every = [], [], []
    for t in range(steps if stop is None else stop):
        if scenario == "unfrozen_mid_run" and t == 5:
            model.experts[2].requires_grad_(True)
        if scenario == "param_group_added_mid_run" and t == 6:
            opt.add_param_group({"params": list(model.experts[1].parameters()), "lr": 0.1})
        x = torch.randn(8, 4, generator=gen, dtype=F64)
        opt.zero_grad()
        model(x, route(t)).backward()
        ps = [p for g in opt.param_groups for p in g["params"]]
        grads.append({id(p): p.grad.clone() for p in ps if p.grad is not None})
        params.append({id(p): p.detach().clone() for p in ps if p.grad is not None})
        every.append({id(p): p.detach().clone() for p in ps})
        step_now[0] = t
        clipper.step(opt)
        opt.step()
    return model, opt, clipper, seen, (grads, params, every)


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_secant_pairs_only_the_same_parameters(scenario, snapshot):
    """Each pair the estimator forms equals the reference secant over the same parameters (tensors this
    small are kept whole by the sampled snapshot too, so both are exact), and a pair forms exactly where
    the reference has one."""
    *_, seen, recorded = run(scenario, snapshot)
    want = expected_pairs(*recorded)
    assert sorted(seen) == sorted(want)
    for t, (norm, smooth, length) in want.items():
        assert seen[t] == pytest.approx((norm, smooth, length), rel=1e-9), t


def heads_run(alternating: bool, snapshot: str, init: str, out: int, steps: int = 40) -> list[float]:
    """``auto`` on a trunk and two heads, each head fitting its own target: both heads every step, or
    one in turn. The trunk's weight (16 x 1024) is sampled by the sampled snapshot."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(16, 1024), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(1024, out) for _ in range(2))
    if init == "zero":  # heads often start at zero
        for h in heads:
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1, momentum=0.9)
    clipper = GradientClipper(snapshot=snapshot)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    targets = torch.randn(2, 16, out, generator=gen)
    lrs = []
    for t in range(steps):
        x = torch.randn(32, 16, generator=gen)
        opt.zero_grad()
        h = trunk(x)
        used = [t % 2] if alternating else [0, 1]
        (sum(((heads[k](h) - x @ targets[k]) ** 2).mean() for k in used) / len(used)).backward()
        clipper.step(opt)
        opt.step()
        lrs.append(clipper.latest()["l0l1/lr_effective"])
    return lrs


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
@pytest.mark.parametrize(("init", "out"), [("random", 1), ("zero", 32)])
def test_auto_on_alternating_heads_keeps_pace_with_both_heads(snapshot, init, out, one_thread):
    """Two heads used in turn: ``auto``'s effective learning rate stays within a factor 2 of the run that
    uses both heads every step (the same model, data and targets), over the last 10 of 40 steps, and does
    not keep falling (the last step's is at least half the one 20 steps earlier)."""
    alt = heads_run(True, snapshot, init, out)
    both = heads_run(False, snapshot, init, out)
    for a, b in zip(alt[-10:], both[-10:]):
        assert 0.5 <= a / b <= 2.0, (a, b)
    assert alt[-1] >= 0.5 * alt[-21]


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
@pytest.mark.parametrize("scenario", ["alternating_heads", "experts_without_tokens"])
def test_resume_mid_run_of_changing_sets_is_bitwise(scenario, snapshot, tmp_path):
    """A clipper restored (through ``torch.save`` / ``torch.load(weights_only=True)``) in the middle of a
    run whose set of parameters changes every step takes the uninterrupted run's steps bit for bit: the
    snapshot keeps which parameters it holds, and the one of the set before (alternating heads) too."""
    model, *_ = run(scenario, snapshot, steps=16)
    want = [p.detach().clone() for p in model.parameters()]

    first = GradientClipper(snapshot=snapshot)  # type: ignore[arg-type]
    model2, opt2, _, _, _ = run(scenario, snapshot, clipper=first, stop=9)
    torch.save(first.state_dict(), tmp_path / "c.pt")
    resumed = GradientClipper(snapshot=snapshot)  # type: ignore[arg-type]
    resumed.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    route = alternate if scenario == "alternating_heads" else routed
    gen = torch.Generator().manual_seed(1)
    for t in range(16):
        x = torch.randn(8, 4, generator=gen, dtype=F64)
        if t < 9:
            continue
        opt2.zero_grad()
        model2(x, route(t)).backward()
        resumed.step(opt2)
        opt2.step()
    for a, b in zip(model2.parameters(), want):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
def test_a_version_2_state_without_parameter_ids_resumes_bitwise(snapshot, tmp_path):
    """A state dict written before the snapshot recorded its parameters (format 2: no ``snap_ids``) loads,
    its snapshot is matched by shape at its first use, and the run continues bitwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    start = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 4, generator=gen) for _ in range(12)]

    def steps(clipper: GradientClipper, batches: list[Tensor]) -> None:
        for x in batches:
            opt.zero_grad()
            (model(x) - x[:, :1]).pow(2).mean().backward()
            clipper.step(opt)
            opt.step()

    steps(GradientClipper(snapshot=snapshot), xs)  # type: ignore[arg-type]
    want = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start[0]):
            p.copy_(s)
    opt.load_state_dict(start[1])
    first = GradientClipper(snapshot=snapshot)  # type: ignore[arg-type]
    steps(first, xs[:6])
    sd = first.state_dict()
    sd["version"] = 2
    assert "snap_ids" in sd["optimizers"][0]
    del sd["optimizers"][0]["snap_ids"]
    resumed = GradientClipper(snapshot=snapshot)  # type: ignore[arg-type]
    resumed.load_state_dict(sd)
    steps(resumed, xs[6:])
    for a, b in zip(model.parameters(), want):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
@pytest.mark.parametrize(("route", "after"), [(alternate, 1), (alternate, 2), (alternate, 3), (lambda t: [0, 1], 1)])
@pytest.mark.parametrize("nonfinite", ["skip", "zero"])
def test_resume_after_a_non_finite_step_is_bitwise(snapshot, route, after, nonfinite, tmp_path):
    """A checkpoint 1, 2 or 3 steps after a non-finite step, while the heads alternate (and, 1 step after,
    with both heads every step): that step's snapshot holds non-finite gradients, and is kept without
    them; the resumed run takes the uninterrupted run's steps, and ends with its estimates, bit for bit
    (under ``zero`` momentum moves the parameters on the non-finite step, so its step length counts)."""
    bad = 7

    def steps(clipper: GradientClipper, model: Experts, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
        gen = torch.Generator().manual_seed(1)
        for t in range(stop):
            x = torch.randn(8, 4, generator=gen, dtype=F64)
            if t < start:
                continue
            opt.zero_grad()
            loss = model(x, route(t))
            (loss * math.nan if t == bad else loss).backward()
            clipper.step(opt)
            opt.step()

    def fresh() -> tuple[Experts, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Experts().to(F64)
        return model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)

    def clipper() -> GradientClipper:
        return GradientClipper(snapshot=snapshot, nonfinite=nonfinite)  # type: ignore[arg-type]

    model, opt = fresh()
    whole = clipper()
    steps(whole, model, opt, 0, 14)
    want = [p.detach().clone() for p in model.parameters()]
    model2, opt2 = fresh()
    first = clipper()
    steps(first, model2, opt2, 0, bad + after)
    sd = first.state_dict()
    state = sd["optimizers"][0]
    kept = [state["snapshot"]] + ([state["other"]["snapshot"]] if route is alternate else [])
    assert sum(bool(s.get("nonfinite")) for s in kept) == (1 if after <= 2 else 0)  # the non-finite step's
    torch.save(sd, tmp_path / "c.pt")
    resumed = clipper()
    resumed.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    steps(resumed, model2, opt2, bad + after, 14)
    assert all(torch.isfinite(p).all() for p in want)
    for a, b in zip(model2.parameters(), want):
        assert torch.equal(a.detach(), b)
    assert resumed.latest() == whole.latest()  # the estimates too, not only the parameters
    got, ref = resumed.state_dict()["optimizers"][0]["env"], whole.state_dict()["optimizers"][0]["env"]
    assert got.keys() == ref.keys()
    for name in ref:  # bit for bit, NaN (an empty slot) included
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(ref[name]), rtol=0, atol=0, equal_nan=True)


def test_a_state_of_a_newer_format_or_a_damaged_flag_is_refused():
    model = Experts().to(F64)
    clipper = GradientClipper()
    with pytest.raises(ValueError, match="newer lightning_l0l1"):
        clipper.load_state_dict({"version": 99, "optimizers": {}})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4, dtype=F64), [0, 1]).backward()
        clipper.step(opt)
        opt.step()
    sd = copy.deepcopy(clipper.state_dict())
    sd["optimizers"][0]["snapshot"]["nonfinite"] = "yes"
    with pytest.raises(TypeError, match=r"snapshot\.nonfinite"):
        GradientClipper().load_state_dict(sd)
