"""``auto`` never ends above its start and never diverges after converging (hypothesis).

Random diagonal and rotated ill-conditioned quadratics (condition number up to 1e4) and a small MLP,
in float32 and bfloat16, learning rates over four decades (1e-3 to 10 for SGD, 1e-5 to 0.1 for Adam
and AdamW), SGD with momentum 0 / 0.5 / 0.9 / 0.99 with and without Nesterov, Adam and AdamW. The
reference is the loss at the start: ``auto`` must end below it, stay finite, and once it has kept
the loss under 1% of the start for 100 steps, never climb back above the start. The default profile runs a few
examples of :data:`STEPS` steps; ``HYPOTHESIS_PROFILE=long`` runs 500 examples of 5000 steps.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_l0l1 import GradientClipper

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
STEPS = 5000 if LONG else 600
HOLD = 100
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]

OPTIMIZERS = [
    ("sgd", 0.0, False), ("sgd", 0.5, False), ("sgd", 0.9, False), ("sgd", 0.99, False),
    ("sgd", 0.5, True), ("sgd", 0.9, True), ("sgd", 0.99, True), ("adam", 0.0, False), ("adamw", 0.0, False),
]


def _lr(kind: tuple[str, float, bool], position: float) -> float:
    """``position`` in [0, 1] across the optimizer family's four decades."""
    low = -5.0 if kind[0] in ("adam", "adamw") else -3.0
    return 10.0 ** (low + 4.0 * position)


def _optimizer(params: list[torch.Tensor], kind: tuple[str, float, bool], lr: float) -> torch.optim.Optimizer:
    name, momentum, nesterov = kind
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)


def _check(losses: list[float], what: str) -> None:
    start = losses[0]
    assert all(math.isfinite(v) for v in losses), f"{what}: a loss is not finite at step " \
        f"{next(i for i, v in enumerate(losses) if not math.isfinite(v))}"
    assert losses[-1] <= start, f"{what}: ends at {losses[-1]:.4g}, above its start {start:.4g}"
    # converged: 100 steps in a row under 1% of the start (a momentum run passes through the minimum
    # while it still oscillates; that is not convergence)
    below = [v < 1e-2 * start for v in losses]
    converged = next((i + HOLD for i in range(len(losses) - HOLD) if all(below[i:i + HOLD])), None)
    if converged is not None and converged < len(losses):
        worst = max(losses[converged:])
        assert worst <= start, (f"{what}: under 1% of the start {start:.4g} for {HOLD} steps up to step {converged}, "
                                f"then back up to {worst:.4g} at step {converged + losses[converged:].index(worst)}")


@st.composite
def quadratics(draw: Any) -> dict[str, Any]:
    dim = draw(st.integers(2, 12))
    log_cond = draw(st.floats(0.0, 4.0))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    eig = torch.logspace(0, log_cond, dim, dtype=torch.float64)
    rotated = draw(st.booleans())
    q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0] if rotated else None
    x0 = torch.randn(dim, generator=g, dtype=torch.float64) * 3
    return {"eig": eig, "q": q, "x0": x0, "what": f"dim {dim}, condition 1e{log_cond:.2f}, rotated {rotated}"}


@settings(max_examples=500 if LONG else 6, deadline=None, suppress_health_check=_SUPPRESS, derandomize=not LONG)
@given(quadratics(), st.sampled_from(OPTIMIZERS), st.floats(0.0, 1.0), st.sampled_from([torch.float32, torch.bfloat16]))
def test_auto_on_quadratics_never_ends_above_its_start_nor_diverges_after_converging(problem, kind, position, dtype):
    lr = _lr(kind, position)
    eig = problem["eig"].to(dtype)
    q = None if problem["q"] is None else problem["q"].to(dtype)
    w = torch.nn.Parameter(problem["x0"].to(dtype).clone())
    opt = _optimizer([w], kind, lr)
    clipper = GradientClipper()
    # the loss of the parameters, judged in float64: the loss the step computes in bfloat16 is rounded to
    # 1/128 of itself (1 ulp at 80 is 0.5), which would make a stalled run "rise"
    eig64, q64 = eig.double(), None if q is None else q.double()
    losses: list[float] = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        z = w if q is None else q @ w
        with torch.no_grad():
            z64 = w.double() if q64 is None else q64 @ w.double()
            losses.append(float(0.5 * (eig64 * z64 * z64).sum()))
        loss = 0.5 * (eig * z * z).sum()
        loss.backward()
        clipper.step(opt)
        opt.step()
    _check(losses, f"{problem['what']}, {kind}, lr {lr:.3g}, {dtype}")


@settings(max_examples=100 if LONG else 3, deadline=None, suppress_health_check=_SUPPRESS, derandomize=not LONG)
@given(st.integers(0, 2**16), st.sampled_from(OPTIMIZERS), st.floats(0.0, 1.0))
def test_auto_on_a_small_mlp_never_ends_above_its_start(seed, kind, position):
    lr = _lr(kind, position)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = _optimizer(list(net.parameters()), kind, lr)
    clipper = GradientClipper()
    losses: list[float] = []
    for _ in range(STEPS if LONG else 300):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        clipper.step(opt)
        opt.step()
        losses.append(float(loss.detach()))
    _check(losses, f"MLP seed {seed}, {kind}, lr {lr:.3g}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_float32_stays_converged(nesterov):
    """SGD with momentum 0.9 at lr 0.5 on a quadratic with curvatures 10 and 1, float32, 4000 steps: the
    effective learning rate varies from step to step, each value inside the heavy-ball bound; the loss must
    stay converged (a fixed threshold does)."""
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.5, momentum=0.9, nesterov=nesterov)
    clipper = GradientClipper()
    h = torch.tensor([10.0, 1.0])
    losses = []
    for _ in range(4000):
        opt.zero_grad()
        loss = 0.5 * (h * w * w).sum()
        loss.backward()
        clipper.step(opt)
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[:1000]) < 1e-4
    assert max(losses[1000:]) < 1e-4, f"diverged after converging: {max(losses[1000:]):.3g}"


def test_momentum_resume_is_bitwise():
    """The factor's rise bound depends on the last step's factor: a checkpoint carries it, so a resumed run
    under SGD with momentum takes the uninterrupted run's steps, bit for bit."""

    def run(w, opt, clipper, steps):
        h = torch.tensor([10.0, 1.0])
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * (h * w * w).sum()).backward()
            clipper.step(opt)
            opt.step()

    for at in range(2, 62, 4):  # checkpoints while the factor rises, falls and settles
        w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
        opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
        clipper = GradientClipper()
        run(w, opt, clipper, at)
        saved = (w.detach().clone(), copy.deepcopy(opt.state_dict()), clipper.state_dict())
        run(w, opt, clipper, 30)
        w2 = torch.nn.Parameter(saved[0].clone())
        opt2 = torch.optim.SGD([w2], lr=0.5, momentum=0.9)
        opt2.load_state_dict(saved[1])
        resumed = GradientClipper()
        resumed.load_state_dict(saved[2])
        run(w2, opt2, resumed, 30)
        assert torch.equal(w, w2), f"resumed after step {at}"
        assert resumed.latest() == clipper.latest()


@pytest.mark.xfail(strict=True, reason="a known limit: in bfloat16 the stiff coordinates can sit exactly at their "
                   "minimum, where no secant sees their curvature (docs/reliability.md)")
def test_bfloat16_ill_conditioned_quadratic_under_momentum_stays_converged():
    """Found by the long profile: curvatures 1 to 8300 (dim 4), SGD momentum 0.5 at lr 0.393, bfloat16. The
    stiff coordinates settle exactly at 0 while the flat one stalls (its update is below bfloat16's
    resolution); when the flat one moves again, a few pairs measure only its curvature (1), the median ratio
    falls, the step grows within the rise bound, and the stiff coordinate, once disturbed, spikes far above
    the start before it settles again. The property below is what `auto` should satisfy and does not."""
    g = torch.Generator().manual_seed(17)
    eig = torch.logspace(0, 3.92, 4, dtype=torch.float64)
    x0 = torch.randn(4, generator=g, dtype=torch.float64) * 3
    eig64 = eig.to(torch.bfloat16).double()
    eig = eig.to(torch.bfloat16)
    w = torch.nn.Parameter(x0.to(torch.bfloat16).clone())
    opt = torch.optim.SGD([w], lr=0.393, momentum=0.5)
    clipper = GradientClipper()
    losses: list[float] = []
    for _ in range(3200):
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            losses.append(float(0.5 * (eig64 * w.double() ** 2).sum()))
        (0.5 * (eig * w * w).sum()).backward()
        clipper.step(opt)
        opt.step()
    _check(losses, "dim 4, condition 1e3.92, SGD momentum 0.5, lr 0.393, bfloat16")
