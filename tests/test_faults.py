"""Fault injection over whole fits: NaN steps, a failing logger, W&B unavailable.

References are independent of the callback: parameters snapshotted around each optimizer step,
a plain-torch loop (``reference_loop``) with the NaN steps skipped by hand and the gradients clipped
by ``torch.nn.utils.clip_grad_norm_``, an uninterrupted run for the resumed one, and the per-step
raw norms recorded in float64 before the callback for the logged interval rows.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from _models import Recorder, Regressor, loader, make_data, make_net, params_of, reference_loop, trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger

from lightning_l0l1 import L0L1Clipping

P = "l0l1/"
MAX_NORM = 45.0  # the tiny model's norms are ~30..90: some steps clipped, some not
STEPS = 12  # 2 epochs x 6 batches (48 samples, batch 8)
NAN_KEYS = {"window", "amp_window", "intended"}  # where the state may legitimately hold NaN


class ParamSnap(pl.Callback):
    """The parameters (and SGD momentum buffers) before and after every training batch, by global step."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}
        self.mom_before: dict[int, list[Optional[torch.Tensor]]] = {}
        self.mom_after: dict[int, list[Optional[torch.Tensor]]] = {}
        self.losses: dict[int, float] = {}

    def _mom(self, trainer: pl.Trainer) -> list[Optional[torch.Tensor]]:
        opt = trainer.optimizers[0]
        out = []
        for g in opt.param_groups:
            for p in g["params"]:
                buf = opt.state.get(p, {}).get("momentum_buffer")
                out.append(None if buf is None else buf.detach().clone())
        return out

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        s = trainer.global_step
        self.before[s] = params_of(pl_module)
        self.mom_before[s] = self._mom(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        s = trainer.global_step - 1  # the step this batch took
        self.after[s] = params_of(pl_module)
        self.mom_after[s] = self._mom(trainer)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[s] = float(loss)


def _same(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return False
        if x is not None and not torch.equal(x, y):
            return False
    return True


def _nonfinite_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "L0L1Clipping" in str(w.message) and "not finite" in str(w.message)]


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "L0L1Clipping" in str(w.message)]


def _all_finite(d: dict[str, float]) -> bool:
    """Every figure finite, except ``lr_suggested``: 1/L0, documented ``inf`` while L0 == 0 (checked here)."""
    for k, v in d.items():
        if k == P + "lr_suggested":
            l0 = d[P + "L0"]
            if not (v == math.inf if l0 == 0 else math.isclose(v, 1 / l0, rel_tol=1e-9)):
                return False
        elif not math.isfinite(v):
            return False
    return True


def _clip_reference(opt: torch.optim.Optimizer) -> None:
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)


def read_csv_rows(save_dir: os.PathLike) -> list[dict[str, float]]:
    (path,) = glob.glob(os.path.join(save_dir, "**", "metrics.csv"), recursive=True)
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


# ---------------------------------------------------------------------------- one NaN step


@pytest.mark.parametrize("bad", [0, 1])
def test_a_single_nan_step_in_auto_is_skipped(bad: int, one_thread: None) -> None:
    cb = L0L1Clipping()  # mode="auto", nonfinite="skip"
    snap, after = ParamSnap(), Recorder(cb)
    tr = trainer(callbacks=[snap, cb, after])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Regressor(make_net(), nan_at=[bad]), loader(make_data()))
    assert tr.global_step == STEPS
    # the NaN step moved neither the parameters nor the momentum buffers (bitwise); every other step did
    assert _same(snap.before[bad], snap.after[bad])
    assert _same(snap.mom_before[bad], snap.mom_after[bad])
    moved = [s for s in range(STEPS) if not _same(snap.before[s], snap.after[s])]
    assert moved == [s for s in range(STEPS) if s != bad]
    assert all(math.isfinite(v) for s, v in snap.losses.items() if s != bad) and math.isnan(snap.losses[bad])
    for p in tr.lightning_module.parameters():
        assert torch.isfinite(p).all()
    latest = cb.latest()
    assert latest[P + "nonfinite_steps"] == 1
    assert _all_finite(latest), {k: v for k, v in latest.items() if not math.isfinite(v)}
    # the estimator's figures, once formed after the NaN step, stay finite
    est = [k for k in (P + "smoothness", P + "L0", P + "L1") if k in latest]
    assert est, sorted(latest)
    for lat in after.latest[bad + 1:]:
        assert all(math.isfinite(lat[k]) for k in est if k in lat), lat
    msgs = _nonfinite_warnings(caught)
    assert len(msgs) == 1, msgs
    assert f"step {bad}" in msgs[0]


# ---------------------------------------------------------------------------- a long NaN run

NAN_RUN = range(2, 10)
CKPT_STEP = 6  # inside the NaN run, at an epoch end


def _walk_nan(obj: Any, path: str = "") -> list[str]:
    """Paths of NaN values outside the keys where the state may legitimately hold them.

    Only NaN: ``inf`` is a documented value (auto's ``max_norm`` before its first pair, summed into the
    open interval's aggregate and left out of the row)."""
    bad: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in NAN_KEYS:
                continue
            bad += _walk_nan(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += _walk_nan(v, f"{path}[{i}]")
    elif isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and torch.isnan(obj).any():
            bad.append(path)
    elif isinstance(obj, float) and math.isnan(obj):
        bad.append(path)
    return bad


def _make_cb(mode: str) -> L0L1Clipping:
    return L0L1Clipping(mode=mode, max_norm=MAX_NORM) if mode == "clip" else L0L1Clipping(mode=mode)


@pytest.mark.parametrize("mode", ["auto", "clip"])
def test_a_long_nan_run_freezes_the_parameters_and_resumes(mode: str, tmp_path: Path, one_thread: None) -> None:
    cb, snap = _make_cb(mode), ParamSnap()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=CKPT_STEP, save_top_k=-1,
                           filename="{step}", save_on_train_epoch_end=False)
    tr = trainer(callbacks=[snap, cb, ckpt], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Regressor(make_net(), nan_at=NAN_RUN), loader(make_data()))
    assert tr.global_step == STEPS
    final = params_of(tr.lightning_module)
    for s in NAN_RUN:
        assert _same(snap.before[s], snap.after[s]), s
        assert _same(snap.mom_before[s], snap.mom_after[s]), s
        assert math.isnan(snap.losses[s])
    for s in [*range(NAN_RUN.start), *range(NAN_RUN.stop, STEPS)]:
        assert not _same(snap.before[s], snap.after[s]), s
        assert math.isfinite(snap.losses[s]), (s, snap.losses[s])
    assert all(torch.isfinite(p).all() for p in final)
    latest = cb.latest()
    assert latest[P + "nonfinite_steps"] == len(NAN_RUN)
    assert _all_finite(latest), latest
    assert len(_nonfinite_warnings(caught)) == 1

    if mode == "clip":  # plain torch: the NaN steps skipped by hand, the others clipped by torch
        ref = reference_loop(make_net(), make_data(), _clip_reference, skip_steps=NAN_RUN)
        for a, b in zip(final, ref.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)

    # the checkpoint saved inside the NaN run: no NaN outside the window keys
    path = tmp_path / f"step={CKPT_STEP}.ckpt"
    assert path.exists(), sorted(os.listdir(tmp_path))
    state = torch.load(path, map_location="cpu", weights_only=False)
    ours = {k: v for k, v in state["callbacks"].items() if "L0L1Clipping" in k}
    assert len(ours) == 1, list(state["callbacks"])
    (cb_state,) = ours.values()
    assert not _walk_nan(cb_state), _walk_nan(cb_state)
    assert not _walk_nan(state["state_dict"]) and not _walk_nan(state["optimizer_states"])

    # resumed from it, the run ends on the same parameters as the uninterrupted one (bitwise)
    cb2, snap2 = _make_cb(mode), ParamSnap()
    tr2 = trainer(callbacks=[snap2, cb2])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        tr2.fit(Regressor(make_net(seed=1), nan_at=NAN_RUN), loader(make_data()), ckpt_path=str(path))
    assert tr2.global_step == STEPS and sorted(snap2.after) == list(range(CKPT_STEP, STEPS))
    resumed = params_of(tr2.lightning_module)
    assert _same(resumed, final), [float((a - b).abs().max()) for a, b in zip(resumed, final)]
    assert cb2.latest() == latest


# ---------------------------------------------------------------------------- a failing logger


class BrokenLogger(Logger):
    """A logger whose ``log_metrics`` always raises."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @property
    def name(self) -> str:
        return "broken"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.calls += 1
        raise OSError("disk quota exceeded (injected)")


INTERVAL = 3


@pytest.mark.parametrize("broken_first", [True, False], ids=["broken-first", "csv-first"])
def test_a_logger_that_raises_warns_once_and_the_others_get_every_row(
    broken_first: bool, tmp_path: Path, one_thread: None
) -> None:
    broken, csv_logger = BrokenLogger(), CSVLogger(str(tmp_path))
    loggers = [broken, csv_logger] if broken_first else [csv_logger, broken]
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=INTERVAL)
    raw = Recorder()
    tr = trainer(logger=loggers, callbacks=[raw, cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Regressor(make_net()), loader(make_data()))
    assert tr.global_step == STEPS and broken.calls >= 1
    msgs = _ours(caught)
    assert len(msgs) == 1, msgs
    assert "BrokenLogger" in msgs[0] and "OSError" in msgs[0] and "disk quota exceeded" in msgs[0]
    rows = [r for r in read_csv_rows(tmp_path) if P + "grad_norm" in r]
    ends = list(range(INTERVAL, STEPS + 1, INTERVAL))
    assert [int(r["step"]) for r in rows] == [e - 1 for e in ends]  # Lightning's step axis: the batch's index
    start = 0
    for r, end in zip(rows, ends):  # every row's values from the raw per-step norms alone
        norms = raw.norms[start:end]
        assert math.isclose(r[P + "grad_norm"], sum(norms) / len(norms), rel_tol=1e-5)
        assert math.isclose(r[P + "grad_norm_max"], max(norms), rel_tol=1e-5)
        assert r[P + "clip_rate"] == pytest.approx(sum(n > MAX_NORM for n in norms) / len(norms))
        start = end


# ---------------------------------------------------------------------------- W&B unavailable


class WandbLogger(CSVLogger):
    """Named like Lightning's: the callback takes it for a W&B logger and wants ``wandb`` for its extras."""


@pytest.mark.parametrize("situation", ["wandb-like-logger", "no-wandb-logger"])
def test_wandb_not_importable_with_wandb_only_options(
    situation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError):
        import wandb as _  # noqa: F401
    loggers: list[Any] = [CSVLogger(str(tmp_path / "csv"))]
    if situation == "wandb-like-logger":
        loggers.insert(0, WandbLogger(str(tmp_path / "wb")))
    # options that only matter to W&B: the table every interval, the estimator figures
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, estimate=True, log_every_n_steps=INTERVAL,
                      wandb_table_every=1)
    tr = trainer(logger=loggers, callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Regressor(make_net()), loader(make_data()))
    assert tr.global_step == STEPS
    ends = list(range(INTERVAL - 1, STEPS, INTERVAL))  # Lightning's step axis: the batches' indices
    for d in ([tmp_path / "csv", tmp_path / "wb"] if situation == "wandb-like-logger" else [tmp_path / "csv"]):
        rows = [r for r in read_csv_rows(d) if P + "grad_norm" in r]
        assert [int(r["step"]) for r in rows] == ends, d
        assert all(P + "smoothness" in r for r in rows[1:])
    msgs = _ours(caught)
    if situation == "wandb-like-logger":
        # the W&B extras (axes, config, table) fail on the import: one warning naming it, rows unaffected
        assert len(msgs) == 1 and "W&B" in msgs[0], msgs
        assert "ModuleNotFoundError" in msgs[0] or "ImportError" in msgs[0], msgs
    else:
        assert not msgs, msgs
