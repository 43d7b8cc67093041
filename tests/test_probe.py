"""The paper's smoothness measurement (``probe``/``probe_loss``): the gradient of the step's own batch at
the step's midpoint, which removes the minibatch noise from the secant.

References are closed forms: on ``f_B(w) = 1/2 w^T A w + xi_B . w`` the midpoint secant is
``||A d|| / ||d||`` for the step ``d`` whatever the batch noise ``xi_B``, while the secant between two
batches is not.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from _procs import fork_env
from _sync import HostReads
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_l0l1 import L0L1Clipping
from lightning_l0l1.clipper import GradientClipper

F64 = torch.float64
DIM = 6
A = torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], dtype=F64)  # the Hessian's diagonal
LR = 0.1


def noisy_quadratic(w: Tensor, xi: Tensor) -> Tensor:
    return 0.5 * (A * w * w).sum() + (xi * w).sum()


def noises(n: int, scale: float = 3.0, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(DIM, generator=g, dtype=F64) for _ in range(n)]


def run_plain(clipper: GradientClipper, steps: int, probe: bool, fail_at: int = -1) -> dict:
    """SGD on the noisy quadratic; returns the closed-form midpoint secant of every step."""
    w = nn.Parameter(torch.linspace(-2.0, 3.0, DIM, dtype=F64))
    opt = torch.optim.SGD([w], lr=LR)
    expected, formed, restored = [], [], []
    for t, xi in enumerate(noises(steps)):
        w.grad = None
        noisy_quadratic(w, xi).backward()
        if t == fail_at:
            w.grad[0] = math.nan
        before = w.detach().clone()
        clipper.step(opt)
        opt.step()
        d = w.detach() - before
        expected.append(float((A * d).norm() / d.norm()) if float(d.norm()) > 0 else math.nan)
        if probe:
            after = w.detach().clone()
            formed.append(clipper.probe(0, lambda ps, xi=xi: torch.autograd.grad(noisy_quadratic(ps[0], xi), ps)))
            restored.append(torch.equal(w.detach(), after))
            expected[-1] = (expected[-1], clipper.latest()["l0l1/smoothness"])
    return {"expected": expected, "formed": formed, "restored": restored, "latest": clipper.latest()}


def test_the_probe_is_the_closed_form_midpoint_secant_and_restores_the_parameters():
    out = run_plain(GradientClipper("clip", max_norm=2.0, estimate=True, probe=True), 12, probe=True)
    assert all(out["formed"]) and all(out["restored"])  # the parameters are put back bit for bit
    for want, got in out["expected"]:
        assert got == pytest.approx(want, rel=1e-12)
    assert out["latest"]["l0l1/smoothness_pairs"] == 12
    measured = [got for _, got in out["expected"]]  # a curvature along the step: within the Hessian's range
    assert float(A.min()) <= min(measured) and max(measured) <= float(A.max())


def test_without_the_probe_the_noise_biases_the_secant_upwards():
    """The secant between two batches carries ||xi_t+1 - xi_t|| / ||d||: far above the curvature here."""
    out = run_plain(GradientClipper("clip", max_norm=2.0, estimate=True), 12, probe=False)
    assert out["latest"]["l0l1/smoothness"] > 2 * float(A.max())  # biased beyond any true curvature


def test_a_skipped_step_or_a_nonfinite_probe_never_enters_the_estimate():
    clipper = GradientClipper("clip", max_norm=2.0, estimate=True, probe=True, nonfinite="skip")
    out = run_plain(clipper, 6, probe=True, fail_at=3)
    assert out["latest"]["l0l1/smoothness_pairs"] == 5  # the skipped step moved nothing: no pair
    assert all(math.isfinite(v) for v in out["latest"].values())
    # a probe gradient that is NaN adds nothing either
    w = nn.Parameter(torch.ones(DIM, dtype=F64))
    opt = torch.optim.SGD([w], lr=LR)
    clipper = GradientClipper("clip", max_norm=2.0, estimate=True, probe=True)
    noisy_quadratic(w, torch.zeros(DIM, dtype=F64)).backward()
    clipper.step(opt)
    opt.step()
    assert clipper.probe(0, lambda ps: [torch.full_like(ps[0], math.nan)])
    assert clipper.latest()["l0l1/smoothness_pairs"] == 0


def test_probe_follows_estimate_every_and_needs_a_step():
    clipper = GradientClipper("clip", max_norm=2.0, estimate=True, probe=True, estimate_every=3)
    out = run_plain(clipper, 9, probe=True)
    assert out["formed"] == [True, False, True, False, False, True, False, False, True]  # step 0, then every 3rd
    assert out["latest"]["l0l1/smoothness_pairs"] == 4
    assert not clipper.probe(0, lambda ps: [torch.zeros_like(ps[0])])  # no step since the last probe


def test_probe_reads_nothing_on_the_host():
    clipper = GradientClipper("auto", nonfinite="propagate", probe=True)
    w = nn.Parameter(torch.linspace(-2.0, 3.0, DIM, dtype=F64))
    opt = torch.optim.SGD([w], lr=LR)
    counter = HostReads()
    for xi in noises(8):
        w.grad = None
        noisy_quadratic(w, xi).backward()
        with counter:
            clipper.step(opt)
        opt.step()
        with counter:
            clipper.probe(0, lambda ps, xi=xi: torch.autograd.grad(noisy_quadratic(ps[0], xi), ps))
    assert counter.n == 0
    assert clipper.latest()["l0l1/smoothness_pairs"] == 8


def test_probe_arguments():
    with pytest.raises(ValueError, match="`probe`"):
        GradientClipper("clip", max_norm=1.0, probe="yes")
    with pytest.raises(ValueError, match="estimate=False"):
        GradientClipper("clip", max_norm=1.0, estimate=False, probe=True)
    with pytest.raises(RuntimeError, match="probe=True"):
        GradientClipper("clip", max_norm=1.0).probe(0, lambda ps: ps)
    with pytest.raises(ValueError, match="`probe_loss` must be a callable"):
        L0L1Clipping(probe_loss="loss")
    with pytest.raises(ValueError, match="estimate=False"):
        L0L1Clipping(probe_loss=lambda m, b: m.loss(b), estimate=False)
    assert L0L1Clipping(probe_loss=lambda m, b: m.loss(b)).estimate is True  # implied


# ---------------------------------------------------------------------------------------- in Lightning
class NoisyQuadratic(pl.LightningModule):
    """The noisy quadratic as a LightningModule: each batch is one noise vector xi."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-2.0, 3.0, DIM, dtype=F64))
        self.frozen = nn.Parameter(torch.ones(2, dtype=F64), requires_grad=False)
        self.automatic_optimization = not manual

    def loss(self, batch) -> Tensor:
        return noisy_quadratic(self.w, batch[0].mean(0))

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def noise_loader(n: int = 10) -> DataLoader:
    return DataLoader(TensorDataset(torch.stack(noises(n))), batch_size=1)


class Record(pl.Callback):
    """After the clipping callback: the step's closed-form midpoint secant and the callback's value."""

    def __init__(self, clip: L0L1Clipping) -> None:
        self.clip, self.rows, self._before = clip, [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._before = pl_module.w.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        d = pl_module.w.detach() - self._before
        self.rows.append((float((A * d).norm() / d.norm()), self.clip.latest()["l0l1/smoothness"]))


def fit(clip: L0L1Clipping, **trainer_kwargs) -> tuple[pl.Trainer, Record]:
    rec = Record(clip)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[clip, rec], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    trainer.fit(NoisyQuadratic(), noise_loader())
    return trainer, rec


def test_callback_probe_measures_the_curvature_and_leaves_training_unchanged():
    probed = L0L1Clipping(mode="clip", max_norm=2.0, probe_loss=lambda m, b: m.loss(b), log_stats=False)
    trainer, rec = fit(probed)
    assert len(rec.rows) == 10
    for want, got in rec.rows:
        assert got == pytest.approx(want, rel=1e-12)
    w_probed = trainer.lightning_module.w.detach().clone()
    # the same run without the probe: identical parameters (the probe restores them exactly), biased secants
    plain = L0L1Clipping(mode="clip", max_norm=2.0, estimate=True, log_stats=False)
    trainer, rec = fit(plain)
    assert torch.equal(trainer.lightning_module.w.detach(), w_probed)
    assert max(got for _, got in rec.rows[1:]) > 2 * float(A.max())


def test_callback_probe_refuses_what_it_cannot_measure():
    clip = L0L1Clipping(mode="clip", max_norm=2.0, probe_loss=lambda m, b: m.loss(b))
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=1"):
        fit(clip, accumulate_grad_batches=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[clip], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="automatic optimization"):
        trainer.fit(NoisyQuadratic(manual=True), noise_loader())
    bad = L0L1Clipping(mode="clip", max_norm=2.0, probe_loss=lambda m, b: [m.loss(b)])
    with pytest.raises(TypeError, match="one-element tensor"):
        fit(bad)
    vector = L0L1Clipping(mode="clip", max_norm=2.0, probe_loss=lambda m, b: m.loss(b) * torch.ones(3))
    with pytest.raises(TypeError, match=r"one-element tensor, got a tensor of shape \(3,\)"):
        fit(vector)


# ---------------------------------------------------------------------------------------- DDP
class _Dump(Record):
    def __init__(self, clip: L0L1Clipping, out: str) -> None:
        super().__init__(clip)
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        path = os.path.join(self.out, f"rank{trainer.global_rank}.pt")
        torch.save({"rows": self.rows, "latest": self.clip.latest()}, path)


@pytest.mark.slow
def test_probe_under_ddp_averages_the_probe_gradient_over_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each rank has its own noise; without averaging the probe gradient the secant would not be exact."""
    fork_env(monkeypatch)
    clip = L0L1Clipping(mode="clip", max_norm=2.0, probe_loss=lambda m, b: m.loss(b), log_stats=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, logger=False,
        callbacks=[clip, _Dump(clip, str(tmp_path))], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(NoisyQuadratic(), noise_loader(8))
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert len(outs[0]["rows"]) == 4
    for out in outs:
        for want, got in out["rows"]:
            assert got == pytest.approx(want, rel=1e-10)
    assert outs[0]["latest"] == outs[1]["latest"]  # the same estimate on every rank

