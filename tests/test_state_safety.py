"""No state can be shared or poisoned by accident: one state per optimizer, loaded state checked, pickling.

Imports no Lightning namespace (the callback's base class only).
"""

from __future__ import annotations

import copy
import math

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


# ---------------------------------------------------------------------------- loaded state is checked


def _models():
    torch.manual_seed(0)
    sgd_net = nn.Sequential(nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 1))  # a sampled weight
    adam_net = nn.Linear(8, 1)
    return (sgd_net, torch.optim.SGD(sgd_net.parameters(), lr=0.5, momentum=0.9),
            adam_net, torch.optim.Adam(adam_net.parameters(), lr=0.01))


def _steps(cb, models, steps: int, seed: int = 1) -> None:
    """``steps`` steps of both optimizers through the callback's clipper, aggregated by its publisher."""
    sgd_net, sgd, adam_net, adam = models
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 100, generator=data)
        for key, (net, opt, inp) in enumerate(((sgd_net, sgd, x), (adam_net, adam, x[:, :8]))):
            opt.zero_grad()
            (net(inp) - inp[:, :1]).pow(2).mean().backward()
            out = cb.clipper.step(opt, key)
            cb.publisher.add(key, out.record)
            opt.step()


_TRAINED: dict[str, tuple] = {}


def trained(snapshot: str):
    """The callback's state after 6 steps of ``auto`` (SGD with momentum and Adam, key 0 and 1; the
    interval open), and the models' and optimizers' state then."""
    from lightning_l0l1.callback import L0L1ClippingBase

    if snapshot not in _TRAINED:
        cb = L0L1ClippingBase(snapshot=snapshot)  # type: ignore[arg-type]
        models = _models()
        _steps(cb, models, 6)
        saved = [copy.deepcopy(m.state_dict()) for m in models]
        _TRAINED[snapshot] = (cb.state_dict(), saved)
    sd, saved = _TRAINED[snapshot]
    return copy.deepcopy(sd), saved


def resume_and_step(sd, saved, snapshot: str, steps: int = 2):
    from lightning_l0l1.callback import L0L1ClippingBase

    cb = L0L1ClippingBase(snapshot=snapshot)  # type: ignore[arg-type]
    cb.load_state_dict(sd)
    models = _models()
    for m, s in zip(models, saved):
        m.load_state_dict(copy.deepcopy(s))  # (an optimizer's load keeps the tensors it is given)
    _steps(cb, models, steps, seed=2)
    cb.publisher.publish(cb.publisher.collect(cb.clipper.device_counters, True), 9, [], True, True)
    return [p for m in (models[0], models[2]) for p in m.parameters()]


def _opt0(sd):
    return sd["clipper"]["optimizers"][0]


def _drop(d, key):
    del d[key]


CORRUPTIONS = {
    "delta_nan": (lambda sd: _opt0(sd).__setitem__("delta", float("nan")), ValueError, "optimizers[0].delta"),
    "delta_text": (lambda sd: _opt0(sd).__setitem__("delta", "abc"), TypeError, "optimizers[0].delta"),
    "steps_text": (lambda sd: _opt0(sd).__setitem__("steps", "x"), TypeError, "optimizers[0].steps"),
    "snapshot_truncated": (lambda sd: _opt0(sd)["snapshot"].__setitem__("grads", _opt0(sd)["snapshot"]["grads"][:-1]),
                           ValueError, "optimizers[0].snapshot"),
    "snapshot_tensor_truncated": (lambda sd: _opt0(sd)["snapshot"]["params"].__setitem__(
        0, _opt0(sd)["snapshot"]["params"][0].reshape(-1)[:-1]), ValueError, "optimizers[0].snapshot.params[0]"),
    "optimizers_list": (lambda sd: sd["clipper"].__setitem__("optimizers", [_opt0(sd)]), TypeError, "optimizers"),
    "interval_sums_missing": (lambda sd: _drop(sd["interval"]["aggs"][0], "sums"), ValueError, "sums"),
    "env_window_wrong_shape": (lambda sd: _opt0(sd)["env"].__setitem__("window", [0.5]), ValueError,
                               "optimizers[0].env.window"),
    "negative_pairs": (lambda sd: _opt0(sd)["env"].__setitem__("pairs", -3), ValueError, "optimizers[0].env.pairs"),
    "amp_inf": (lambda sd: _opt0(sd)["momentum"].__setitem__("amp", float("inf")), ValueError,
                "optimizers[0].momentum.amp"),
}


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_state_is_refused_naming_the_field(case, snapshot, one_thread):
    """Each damaged field gives a ``TypeError``/``ValueError`` that names it by its path and says the
    checkpoint is damaged (never an internal error, never a state that turns the parameters NaN)."""
    corrupt, error, field = CORRUPTIONS[case]
    sd, saved = trained(snapshot)
    corrupt(sd)
    with pytest.raises(error, match="damaged") as info:
        resume_and_step(sd, saved, snapshot)
    assert f"`{field}" in str(info.value)


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
def test_an_intact_state_resumes_bitwise(snapshot, one_thread):
    """The reference for the checks above: the checked state, loaded, continues like the uninterrupted run."""
    from lightning_l0l1.callback import L0L1ClippingBase

    sd, saved = trained(snapshot)
    got = resume_and_step(sd, saved, snapshot)
    cb = L0L1ClippingBase(snapshot=snapshot)  # type: ignore[arg-type]
    models = _models()
    _steps(cb, models, 6)
    _steps(cb, models, 2, seed=2)
    for a, b in zip(got, [p for m in (models[0], models[2]) for p in m.parameters()]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- fuzzing the loaded state

_BAD_VALUES = ["abc", None, {}, [], True, float("nan"), float("inf"), -float("inf"), -1, -0.5, 0, 1e308, [1.0, "x"]]


def _leaves(obj, path=()):
    """Every place in the nested state: dict entries, list items, and the containers themselves."""
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _leaves(v, (*path, i))
    return out


def _corrupt(sd, path, op: str, bad):
    """Apply one corruption at ``path`` (the root itself is never replaced)."""
    if not path:
        return
    parent = sd
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    value = parent[key]
    bad = copy.deepcopy(bad)  # (never one object in two places)
    if op == "replace":
        parent[key] = bad
    elif op == "drop":
        del parent[key]
    elif op == "extra" and isinstance(value, dict):
        value["unexpected"] = bad
    elif op == "truncate":
        if isinstance(value, list) and value:
            parent[key] = value[:-1]
        elif isinstance(value, torch.Tensor) and value.numel():
            parent[key] = value.reshape(-1)[:-1].clone()
    elif op == "reshape":
        if isinstance(value, torch.Tensor):
            parent[key] = value.reshape(1, -1).clone()
        elif isinstance(value, list):
            parent[key] = [value]
    elif op == "poison":  # a NaN or infinity inside a tensor or a list of numbers
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            t = value.clone()
            t.view(-1)[-1] = bad if isinstance(bad, float) and not math.isfinite(bad) else float("nan")
            parent[key] = t
        elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
            parent[key] = [*value[:-1], float("nan")]
    elif op == "scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = value * -3 if isinstance(value, int) else value * 1e300


@pytest.mark.parametrize("snapshot", ["sampled", "full"])
def test_fuzzed_states_give_a_clear_error_or_resume_with_finite_parameters(snapshot, one_thread):
    """Many random corruptions of a real state (the callback's: the clipper's two optimizers, SGD with
    momentum and Adam, and the open logging interval): wrong types, NaN/inf, negative and huge numbers,
    dropped keys, truncated lists and tensors, wrong shapes, extra keys. Each either gives a
    ``TypeError``/``ValueError`` that says the state is damaged and names a field in backticks, or loads
    and takes steps (and a logging flush) that leave every parameter finite. ``HYPOTHESIS_PROFILE=long``
    searches deeper."""
    from hypothesis import given
    from hypothesis import strategies as st

    ops = ["replace", "drop", "extra", "truncate", "reshape", "poison", "scale"]

    @given(st.data())
    def check(data):
        sd, saved = trained(snapshot)
        for _ in range(data.draw(st.integers(1, 3), label="corruptions")):
            path = data.draw(st.sampled_from(_leaves(sd)), label="path")
            _corrupt(sd, path, data.draw(st.sampled_from(ops), label="op"),
                     data.draw(st.sampled_from(_BAD_VALUES), label="value"))
        try:
            params = resume_and_step(sd, saved, snapshot)
        except (TypeError, ValueError) as err:
            assert "damaged" in str(err) and "`" in str(err), err
            return
        for p in params:
            assert torch.isfinite(p).all()

    check()
