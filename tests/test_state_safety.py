"""No state can be shared or poisoned by accident: one state per optimizer, loaded state checked, pickling.

Imports no Lightning namespace (the callback's base class only).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_l0l1.clipper import GradientClipper

F64 = torch.float64


def gan(steps: int, clippers: list[GradientClipper], keys: tuple[int, int] = (0, 1), seed: int = 0):
    """A two-optimizer loop (generator, discriminator) in float64: each step steps both, in turn, through
    ``clippers[0]`` and ``clippers[-1]``."""
    torch.manual_seed(seed)
    gen, disc = nn.Linear(4, 4).to(F64), nn.Linear(4, 1).to(F64)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1, momentum=0.9)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        z = torch.randn(8, 4, generator=data, dtype=F64)
        opt_g.zero_grad()
        (-disc(torch.tanh(gen(z)))).mean().backward()
        clippers[0].step(opt_g, keys[0])
        opt_g.step()
        opt_d.zero_grad()
        real = torch.randn(8, 4, generator=data, dtype=F64) + 1
        (disc(torch.tanh(gen(z))).detach().mean() - disc(real).mean() + disc(torch.tanh(gen(z)).detach()).mean()
         ).backward()
        clippers[-1].step(opt_d, keys[1])
        opt_d.step()
    return [p.detach().clone() for p in [*gen.parameters(), *disc.parameters()]]


# ---------------------------------------------------------------------------- one state per optimizer


def test_a_second_optimizer_on_the_same_key_raises_naming_key():
    """One clipper stepped with two optimizers and no ``key``: the second one raises a ``ValueError`` that
    names ``key`` and says to pass one, before anything of either optimizer's state changes."""
    clipper = GradientClipper()
    with pytest.raises(ValueError, match=r"`key=0`.*Pass a different `key=`"):
        gan(1, [clipper], keys=(0, 0))
    assert clipper.state_dict()["optimizers"][0]["steps"] == 1


def test_one_clipper_with_keys_steps_like_a_clipper_per_optimizer():
    """With a key per optimizer, one clipper takes the same steps, bitwise, as two clippers."""
    one = gan(12, [GradientClipper()])
    two = gan(12, [GradientClipper(), GradientClipper()])
    for a, b in zip(one, two):
        assert torch.equal(a, b)


class _Wrapper:
    """A wrapper like Lightning's ``LightningOptimizer`` (``_optimizer``) or Fabric's (``optimizer``)."""

    def __init__(self, inner: torch.optim.Optimizer, attr: str) -> None:
        object.__setattr__(self, attr, inner)
        object.__setattr__(self, "_attr", attr)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, object.__getattribute__(self, "_attr")), name)


@pytest.mark.parametrize("attr", ["_optimizer", "optimizer"])
def test_a_wrapper_counts_as_the_optimizer_it_wraps(attr):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = GradientClipper()
    for o in (opt, _Wrapper(opt, attr), opt):
        model(torch.ones(2, 3)).sum().backward()
        clipper.step(o)  # type: ignore[arg-type]
        opt.step()
    assert clipper.state_dict()["optimizers"][0]["steps"] == 3


def _stepped(clipper: GradientClipper, opt: torch.optim.Optimizer, key: int = 0) -> None:
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    clipper.step(opt, key)
    opt.step()


def test_a_restored_state_is_adopted_by_the_first_optimizer_then_kept():
    """A state loaded from a checkpoint belongs to no optimizer yet: the first one to step its key adopts
    it (a resumed run's new optimizer object); another one on that key then raises. ``release`` hands a
    key over to a new optimizer (a rebuilt one while the old one is still referenced)."""
    clipper = GradientClipper()
    gan(3, [clipper])
    restored = GradientClipper()
    restored.load_state_dict(clipper.state_dict())
    first = torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1)
    second = torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1)
    _stepped(restored, first)
    assert restored.state_dict()["optimizers"][0]["steps"] == 4
    with pytest.raises(ValueError, match="`key=0`"):
        _stepped(restored, second)
    restored.release(0)
    _stepped(restored, second)
    assert restored.state_dict()["optimizers"][0]["steps"] == 5


# ---------------------------------------------------------------------------- pickling


def wide_run(steps: int, clipper: GradientClipper, swap_at: int | None = None, through=None):
    """``auto`` on 20,000+ parameters (a weight the sampled snapshot samples); at ``swap_at`` the clipper
    is replaced by ``through(clipper)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 200), nn.Tanh(), nn.Linear(200, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    for t in range(steps):
        if t == swap_at:
            clipper = through(clipper)
        x = torch.randn(16, 100, generator=data)
        opt.zero_grad()
        (model(x) - x[:, :1]).pow(2).mean().backward()
        clipper.step(opt)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], clipper.latest()


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_pickled_clipper_continues_bitwise(snapshot, how):
    """A trained ``auto`` clipper, pickled and unpickled (or deep-copied) mid-run, takes the uninterrupted
    run's steps: parameters ``torch.equal`` and the same ``latest()``."""
    import pickle

    through = (lambda c: pickle.loads(pickle.dumps(c))) if how == "pickle" else copy.deepcopy
    want, want_latest = wide_run(20, GradientClipper(snapshot=snapshot))  # type: ignore[arg-type]
    got, got_latest = wide_run(20, GradientClipper(snapshot=snapshot), swap_at=10, through=through)  # type: ignore[arg-type]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got_latest == want_latest
