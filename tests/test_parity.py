"""One behaviour on every path: the callback and Fabric give the plain loop's updates, bit for bit.

The reference is a plain PyTorch loop around :class:`GradientClipper` (``backward``, ``clipper.step``,
``optimizer.step``). Every other way of running a step must produce the same parameters and the same
statistics after :data:`STEPS` optimizer steps: Lightning's automatic optimization in both namespaces
(the clipper then runs inside ``optimizer.step(closure)``), manual optimization (``manual_backward``
then ``LightningOptimizer.step()``), gradient accumulation, Fabric (a wrapped optimizer), bf16 autocast
and an fp16 ``GradScaler`` (the clipper then runs before ``scaler.step``). The arithmetic of each path
is the reference's, so equality is exact (``torch.equal``, ``==`` on the statistics).
"""

from __future__ import annotations

import contextlib
import csv
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_l0l1 import GradientClipper
from lightning_l0l1.modes import INITIAL_STEP_ADAPTIVE

STEPS = 12
BATCH = 4
D = 6


class OutsideAdam(torch.optim.Optimizer):
    """An Adam-type optimizer from outside ``torch.optim`` (it has ``betas``; it takes a Python float lr)."""

    def __init__(self, params: Any, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["t"])
                v_hat = st["v"] / (1 - b2 ** st["t"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-float(group["lr"]))
        return loss


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=3e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.1, fused=True),
    "outside": lambda ps: OutsideAdam(ps, lr=3e-2),
}
MODES: dict[str, dict[str, Any]] = {
    "auto": {},
    "clip": {"mode": "clip", "max_norm": 0.5},
    "adaptive": {"mode": "adaptive", "max_norm": 0.5},
    "l0l1": {"mode": "l0l1", "l0": 1.0, "l1": 0.5},
}


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    y = (x**2).sum(1, keepdim=True) * 3.0 + torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(net(x).float(), y)


def _batches(accumulate: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    ds = _data(STEPS * accumulate * BATCH)
    return iter(DataLoader(ds, batch_size=BATCH, shuffle=False))


def _autocast(precision: str) -> Any:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "16":
        return torch.autocast("cpu", dtype=torch.float16)
    return contextlib.nullcontext()


def reference(mode: str, opt: str, accumulate: int = 1, precision: str = "32") -> tuple[list[torch.Tensor], dict]:
    """The plain loop: backward, ``clipper.step``, ``optimizer.step``."""
    net = _net()
    optimizer = OPTIMIZERS[opt](net.parameters())
    clipper = GradientClipper(**MODES[mode])
    scaler = torch.amp.GradScaler("cpu") if precision == "16" else None
    batches = _batches(accumulate)
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            x, y = next(batches)
            with _autocast(precision):
                loss = _loss(net, x, y) / accumulate
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        clipper.step(optimizer, nonfinite_handled=scaler is not None)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    return [p.detach().clone() for p in net.parameters()], clipper.latest()


_NAMESPACES: dict[str, tuple[Any, Any]] = {}


def _namespace(name: str) -> tuple[Any, Any]:
    """(Lightning's ``pytorch`` package, the callback class) of ``pytorch_lightning`` or ``lightning.pytorch``."""
    if name not in _NAMESPACES:
        if name == "pl":
            import pytorch_lightning as pl

            from lightning_l0l1.pytorch_lightning import L0L1Clipping
        else:
            import lightning.pytorch as pl  # type: ignore[no-redef]

            from lightning_l0l1.lightning import L0L1Clipping  # type: ignore[assignment]
        _NAMESPACES[name] = (pl, L0L1Clipping)
    return _NAMESPACES[name]


def _module(pl: Any, net: nn.Module, opt: str, manual: bool) -> Any:
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.automatic_optimization = not manual

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = _loss(self.net, x, y)
            self.log("train/loss", loss)
            if not manual:
                return loss
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return None

        def configure_optimizers(self) -> Any:
            return OPTIMIZERS[opt](self.net.parameters())

    return Module()


def lightning_run(
    mode: str, opt: str, namespace: str = "pl", manual: bool = False, accumulate: int = 1, precision: str = "32",
    log_dir: Optional[Path] = None,
) -> tuple[list[torch.Tensor], dict, Any]:
    """The callback in a ``Trainer``: the same model, optimizer and batches as :func:`reference`."""
    pl, L0L1Clipping = _namespace(namespace)
    net = _net()
    callback = L0L1Clipping(**MODES[mode], log_every_n_steps=4)
    kwargs: dict[str, Any] = {}
    if precision == "bf16":
        kwargs["precision"] = "bf16-mixed"
    elif precision == "16":
        kwargs["plugins"] = [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]
    logger = pl.loggers.CSVLogger(str(log_dir), name="", version="") if log_dir is not None else False
    trainer = pl.Trainer(
        max_steps=STEPS, accumulate_grad_batches=accumulate, callbacks=[callback], logger=logger,
        log_every_n_steps=4, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, **kwargs,
    )
    loader = DataLoader(_data(STEPS * accumulate * BATCH), batch_size=BATCH, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_module(pl, net, opt, manual), loader)
    assert trainer.global_step == STEPS
    return [p.detach().clone() for p in net.parameters()], callback.latest(), trainer


def fabric_run(mode: str, opt: str) -> tuple[list[torch.Tensor], dict]:
    """A Fabric loop: ``fabric.backward``, ``clipper.step`` on Fabric's wrapped optimizer, its ``step()``."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    net = _net()
    model, optimizer = fabric.setup(net, OPTIMIZERS[opt](net.parameters()))
    clipper = GradientClipper(**MODES[mode])
    batches = _batches(1)
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        x, y = next(batches)
        fabric.backward(_loss(model, x, y))
        clipper.step(optimizer)
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()], clipper.latest()


def _assert_same(got: tuple[list[torch.Tensor], dict], want: tuple[list[torch.Tensor], dict], path: str) -> None:
    params, stats = got
    ref_params, ref_stats = want
    worst = max(float((a.double() - b.double()).abs().max()) for a, b in zip(params, ref_params))
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params)), (
        f"{path}: parameters differ from the plain loop's by up to {worst:.3g}"
    )
    assert stats.keys() == ref_stats.keys(), f"{path}: statistics {sorted(stats)} vs {sorted(ref_stats)}"
    differ = {k: (stats[k], ref_stats[k]) for k in stats if stats[k] != ref_stats[k]
              and not (stats[k] != stats[k] and ref_stats[k] != ref_stats[k])}  # NaN == NaN here
    assert not differ, f"{path}: statistics differ from the plain loop's: {differ}"


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, str, int, str], tuple[list[torch.Tensor], dict]]:
    return {}


def _reference(cache: dict, mode: str, opt: str, accumulate: int = 1, precision: str = "32") -> Any:
    key = (mode, opt, accumulate, precision)
    if key not in cache:
        cache[key] = reference(mode, opt, accumulate, precision)
    return cache[key]


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_path_gives_the_plain_loops_updates(mode, opt, references, one_thread):
    """4 modes x 7 optimizers x 5 paths, 12 steps each: parameters and ``latest()`` exactly the plain loop's."""
    want = _reference(references, mode, opt)
    assert any(not torch.equal(p, q) for p, q in zip(want[0], _net().parameters())), "the reference did not train"
    for namespace in ("pl", "lightning"):
        _assert_same(lightning_run(mode, opt, namespace)[:2], want, f"automatic optimization ({namespace})")
    _assert_same(lightning_run(mode, opt, manual=True)[:2], want, "manual optimization")
    _assert_same(fabric_run(mode, opt), want, "Fabric")
    _assert_same(lightning_run(mode, opt, accumulate=2)[:2], _reference(references, mode, opt, accumulate=2),
                 "accumulate_grad_batches=2")


@pytest.mark.parametrize("precision", ["bf16", "16"])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adamw", "adamw_fused"])
@pytest.mark.parametrize("mode", ["auto", "clip"])
def test_mixed_precision_gives_the_plain_loops_updates(mode, opt, precision, references, one_thread):
    """bf16 autocast (the clipper inside the closure) and an fp16 GradScaler (before ``scaler.step``)."""
    want = _reference(references, mode, opt, precision=precision)
    _assert_same(lightning_run(mode, opt, precision=precision)[:2], want, f"precision {precision}")


def _logged(log_dir: Path) -> dict[tuple[int, str], float]:
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    return {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if k.startswith("l0l1/") and v != ""}


@pytest.mark.parametrize("opt", ["momentum", "adamw"])
def test_logged_statistics_are_the_same_on_every_path(opt, tmp_path, one_thread):
    """What the callback logs (CSV) is the same whether Lightning stepped in automatic or manual optimization,
    and its last interval holds the statistics the plain loop's clipper reports for its last step."""
    runs = {}
    for name, manual in (("automatic", False), ("manual", True)):
        lightning_run("auto", opt, manual=manual, log_dir=tmp_path / name)
        runs[name] = _logged(tmp_path / name)
    assert runs["automatic"], "nothing was logged"
    assert runs["automatic"] == runs["manual"]
    _, ref_stats = reference("auto", opt)
    last_step = max(step for step, _ in runs["automatic"])
    last = {k: v for (step, k), v in runs["automatic"].items() if step == last_step}
    for key in ("l0l1/smoothness", "l0l1/L0", "l0l1/L1"):  # the estimates at the last step
        assert last[key] == pytest.approx(ref_stats[key], rel=1e-6), key


def test_learning_rate_is_the_users_outside_the_step(one_thread):
    """``auto`` under Adam scales the learning rate for each step only: after every step (and so for
    schedulers and ``LearningRateMonitor``) the param groups hold the user's learning rate."""
    pl, L0L1Clipping = _namespace("lightning")
    seen: list[Any] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    net = _net()
    trainer = pl.Trainer(max_steps=5, callbacks=[L0L1Clipping(), Watch()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_module(pl, net, "adam", manual=False), DataLoader(_data(5 * BATCH), batch_size=BATCH))
    assert seen == [3e-2] * 5 and all(type(lr) is float for lr in seen)


def test_auto_bounds_the_first_adam_step_through_lightning(one_thread):
    """The first ``auto`` step under Adam moves the parameters by at most ``initial_step * max(||theta||, 1)``
    (``INITIAL_STEP_ADAPTIVE`` for Adam-type optimizers) through the callback, as in the plain loop."""
    pl, L0L1Clipping = _namespace("lightning")

    class One(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1000))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return (self.p * torch.randn(1000)).sum()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.1)

    model = One()
    trainer = pl.Trainer(max_steps=1, callbacks=[L0L1Clipping()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(torch.zeros(8, 1)))
    # unclipped Adam moves every coordinate by lr: a norm of 0.1 * sqrt(1000) = 3.16; theta starts at 0
    assert float(model.p.detach().norm()) == pytest.approx(INITIAL_STEP_ADAPTIVE * 1.0, rel=1e-4)
    assert INITIAL_STEP_ADAPTIVE < 0.1 * 1000**0.5


def _two_clipper_run(opt: str, first: dict, second: Optional[dict], inside: bool) -> list[torch.Tensor]:
    """A plain loop with one or two clippers on one optimizer; ``inside``: they run from ``step(closure)``."""
    net = _net()
    optimizer = OPTIMIZERS[opt](net.parameters())
    clippers = [GradientClipper(**first)] + ([GradientClipper(**second)] if second is not None else [])
    batches = _batches(1)
    for _ in range(STEPS):
        x, y = next(batches)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(net, x, y)
            loss.backward()
            for c in clippers:
                c.step(optimizer)
            return loss

        if inside:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("inside", [False, True], ids=["before-step", "in-closure"])
@pytest.mark.parametrize("opt", ["adamw", "adamw_fused"])
def test_two_clippers_on_one_optimizer_compose(opt, inside, one_thread):
    """Two clippers on one optimizer apply one after the other: ``auto`` then a clip that never binds is
    ``auto`` alone (its learning-rate factor is kept), and clip 0.1 then clip 1.0 is clip 0.1 alone (the
    second measures the gradients the first left, even where the first handed its scale to a fused kernel)."""
    auto_alone = _two_clipper_run(opt, {}, None, inside)
    auto_then_noop = _two_clipper_run(opt, {}, {"mode": "clip", "max_norm": 1e30}, inside)
    assert all(torch.equal(a, b) for a, b in zip(auto_then_noop, auto_alone))
    tight = _two_clipper_run(opt, {"mode": "clip", "max_norm": 0.1}, None, inside)
    tight_then_loose = _two_clipper_run(opt, {"mode": "clip", "max_norm": 0.1}, {"mode": "clip", "max_norm": 1.0},
                                        inside)
    loose = _two_clipper_run(opt, {"mode": "clip", "max_norm": 1.0}, None, inside)
    for a, b in zip(tight_then_loose, tight):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(tight, loose)), "the two thresholds should differ"


def test_a_step_that_never_runs_leaves_nothing_behind(one_thread):
    """A clipper's plan for a step that never ran (a GradScaler skipping an overflow) is undone at its next
    step: neither the learning-rate factor nor a fused hand-off is applied twice or to the wrong step."""
    net = _net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-2, fused=True)
    clipper = GradientClipper()
    x, y = next(_batches(1))
    _loss(net, x, y).backward()
    clipper.step(optimizer)  # the step that never runs
    assert optimizer.param_groups[0]["lr"] == 3e-2 and hasattr(optimizer, "grad_scale")
    twin = _net()
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=3e-2, fused=True)
    twin_clipper = GradientClipper()
    twin_clipper.load_state_dict(clipper.state_dict())
    optimizer.zero_grad(set_to_none=True)
    _loss(net, x, y).backward()
    _loss(twin, x, y).backward()
    clipper.step(optimizer)
    twin_clipper.step(twin_opt)
    optimizer.step()
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert optimizer.param_groups[0]["lr"] == 3e-2 and not hasattr(optimizer, "grad_scale")
