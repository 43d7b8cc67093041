"""Statistics: :class:`StepStatistics` and what ``L0L1Clipping`` publishes to the loggers.

Every expected number is computed here from per-step values recorded by probe callbacks placed
around ``L0L1Clipping`` (plain-torch gradient norms before and after it, the optimizer's learning
rates, ``latest()`` for the estimator), aggregated in plain Python over the logging intervals the
docstring specifies (every ``log_every_n_steps`` optimizer steps, a last partial interval at the
end of training), never from the library's own aggregates.

The DDP case runs in a subprocess script (``dist_scripts/stats_ddp.py``): inside pytest, Lightning's
``ddp`` launcher would re-execute pytest itself.
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from _models import Recorder, Regressor, TwoOptimizers, loader, make_data, make_net, trainer
from _procs import clean_env
from _sync import HookReads, HostReads
from pytorch_lightning.loggers import CSVLogger

from lightning_l0l1 import L0L1Clipping
from lightning_l0l1.publish import StepStatistics
from lightning_l0l1.stats import stat_names

NAN = float("nan")
REL = 1e-6


@pytest.fixture(autouse=True)
def _no_active_wandb_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback also publishes to an active ``wandb.run``: keep one left by another test out."""
    if "wandb" in sys.modules:
        monkeypatch.setattr(sys.modules["wandb"], "run", None, raising=False)


# ---------------------------------------------------------------------------- host-read counter


# ---------------------------------------------------------------------------- StepStatistics unit tests


def _steps(n: int, n_values: int, seed: int, nonfinite: set[int], dtype=torch.float32) -> list[tuple]:
    """Random per-step vectors (entry 0 a positive norm); the steps in ``nonfinite`` carry NaN/inf."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v = torch.rand(n_values, generator=g, dtype=torch.float64) * 10
        finite = i not in nonfinite
        if not finite:
            v[0] = [math.nan, math.inf, -math.inf][i % 3]
            v[1 + i % (n_values - 1)] = math.nan if i % 2 else math.inf
        clipped = rng.random() < 0.5 or not finite  # a non-finite step flagged clipped must not count
        out.append((v.to(dtype), finite, clipped))
    return out


def _reference(steps: list[tuple], n_values: int) -> list[float]:
    """Plain Python: means over finite steps, extremes of entry 0, clip rate, counts."""
    fin = [([float(x) for x in v.double()], c) for v, f, c in steps if f]
    k = len(fin)
    if k == 0:
        return [NAN] * n_values + [NAN, NAN, NAN, 0.0, float(len(steps))]
    means = [math.fsum(v[j] for v, _ in fin) / k for j in range(n_values)]
    norms = [v[0] for v, _ in fin]
    clip_rate = sum(1 for _, c in fin if c) / k
    return [*means, max(norms), min(norms), clip_rate, float(k), float(len(steps))]


def _update(agg: StepStatistics, steps: list[tuple]) -> None:
    for v, f, c in steps:
        agg.update(v, torch.tensor(f), torch.tensor(c))


def _assert_vec(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float64 and actual.shape == (len(expected),)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_statistics_matches_python_reference_and_keeps_nan_out(dtype):
    n_values = 6  # grad_norm, grad_norm_scaled, scale, max_norm, lr_effective, lr_effective_pg1
    steps = _steps(40, n_values, seed=1, nonfinite={0, 3, 7, 8, 21, 39}, dtype=dtype)
    agg = StepStatistics(n_values)
    _update(agg, steps)
    # Nothing non-finite reaches a state (the steps carried NaN, +inf and -inf).
    for name in ("sums", "norm_max", "norm_min", "finite", "steps", "clipped"):
        assert torch.isfinite(getattr(agg, name)).all(), name
    out = agg.compute()
    _assert_vec(out, _reference(steps, n_values))
    assert len(stat_names(2)) == out.numel()  # names line up with the entries
    ref = _reference(steps, n_values)
    assert ref[-2:] == [34.0, 40.0] and 0 < ref[n_values + 2] < 1  # the data exercise every branch


def test_step_statistics_interval_without_a_finite_step_is_nan_with_counts():
    steps = _steps(5, 5, seed=2, nonfinite=set(range(5)))
    agg = StepStatistics(5)
    _update(agg, steps)
    out = agg.compute()
    assert torch.isnan(out[:8]).all()  # 5 means, max, min, clip_rate
    assert out[8:].tolist() == [0.0, 5.0]


def test_step_statistics_reset_starts_a_new_interval():
    agg = StepStatistics(5)
    first = _steps(7, 5, seed=3, nonfinite={2})
    second = _steps(9, 5, seed=4, nonfinite={0, 5})
    _update(agg, first)
    _assert_vec(agg.compute(), _reference(first, 5))
    agg.reset()
    assert agg.steps.item() == 0 and agg.finite.item() == 0 and agg.clipped.item() == 0
    assert agg.sums.abs().sum().item() == 0
    assert agg.norm_max.item() == -math.inf and agg.norm_min.item() == math.inf
    _update(agg, second)
    _assert_vec(agg.compute(), _reference(second, 5))


def test_step_statistics_update_reads_nothing_on_the_host():
    steps = _steps(20, 5, seed=5, nonfinite={4, 11})
    flags = [(v, torch.tensor(f), torch.tensor(c)) for v, f, c in steps]
    agg = StepStatistics(5)
    reads = HostReads()
    with reads:
        for v, f, c in flags:
            agg.update(v, f, c)
    assert (reads.scalar, reads.transfers) == (0, 0)
    # The counter can see reads: publishing an interval is one transfer.
    with reads:
        agg.compute().tolist()
    assert reads.transfers == 1


# ---------------------------------------------------------------------------- probes and references


class IntervalRecorder(Recorder):
    """Placed after L0L1Clipping, with a ``Recorder`` placed before it: per optimizer step (``steps``) the
    optimizer index, the pre- and post-scaling norms, the learning rates and ``latest()``; and the logging
    intervals as the docstring defines them: close one every ``every`` steps of optimizer 0 (at the end of
    that batch), and a partial one at the end of training."""

    def __init__(self, cb: L0L1Clipping, before: Recorder, every: int) -> None:
        super().__init__(cb)
        self.before, self.every = before, every
        self.steps: list[dict[str, Any]] = []
        self.intervals: list[tuple[int, list[dict[str, Any]]]] = []  # (step label at the close, steps)
        self._open: list[dict[str, Any]] = []
        self._count = 0
        self._batches = 0  # batches in which an optimizer stepped (Lightning's step axis of its rows)
        self._stepped = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        key = self.keys[-1]
        rec = dict(key=key, pre=self.before.norms[len(self.steps)], post=self.norms[-1], lrs=self.lrs[-1],
                   latest=self.latest[-1])
        self.steps.append(rec)
        self._open.append(rec)
        self._count += key == 0
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += self._stepped
        self._stepped = False
        if self._count >= self.every:
            self._close(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._count:
            self._close(trainer)

    def _close(self, trainer) -> None:
        # the step Lightning gives the rows a module logs in this batch: the stepped batches before it
        self.intervals.append((self._batches - 1, self._open))
        self._open, self._count = [], 0


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def expected_rows(
    after: IntervalRecorder, max_norm: float, prefix: str = "l0l1/", n_opts: int = 1, estimate: bool = False
) -> list[dict[str, float]]:
    """The rows the loggers must receive, from the recorded steps (``step`` included)."""
    rows = []
    nonfinite = [0] * n_opts
    for gstep, recs in after.intervals:
        row: dict[str, float] = {"step": float(gstep)}
        for key in range(n_opts):
            sfx = f"_opt{key}" if n_opts > 1 else ""
            mine = [r for r in recs if r["key"] == key]
            nonfinite[key] += sum(not math.isfinite(r["pre"]) for r in mine)
            fin = [r for r in mine if math.isfinite(r["pre"])]
            vals: dict[str, float] = {}
            if fin:
                scales = [r["post"] / r["pre"] for r in fin]
                vals["grad_norm"] = _mean([r["pre"] for r in fin])
                vals["grad_norm_scaled"] = _mean([r["post"] for r in fin])
                vals["scale"] = _mean(scales)
                vals["max_norm"] = max_norm
                for j in range(len(fin[0]["lrs"])):
                    name = "lr_effective" if j == 0 else f"lr_effective_pg{j}"
                    vals[name] = _mean([r["lrs"][j] * s for r, s in zip(fin, scales)])
                vals["grad_norm_max"] = max(r["pre"] for r in fin)
                vals["grad_norm_min"] = min(r["pre"] for r in fin)
                vals["clip_rate"] = sum(r["pre"] > max_norm for r in fin) / len(fin)
            vals["nonfinite_steps"] = float(nonfinite[key])  # a running count, since the start
            if estimate and mine:
                last = mine[-1]["latest"]
                for name in ("smoothness", "L0", "L1"):  # the estimator's latest values (one optimizer here)
                    vals[name] = last[f"{prefix}{name}"]
                if vals["L0"] > 0:
                    vals["lr_suggested"] = 1.0 / vals["L0"]
            row.update({f"{prefix}{k}{sfx}": v for k, v in vals.items()})
        rows.append(row)
    return rows


def read_csv(save_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    files = list(save_dir.rglob("metrics.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as fh:
        reader = csv.DictReader(fh)
        # "epoch": Lightning adds it to the rows it writes itself (those of the trainer's logging steps)
        rows = [{k: v for k, v in r.items() if k != "epoch"} for r in reader]
        return [f for f in reader.fieldnames or [] if f != "epoch"], rows


def assert_rows_match(got: list[dict[str, str]], want: list[dict[str, float]]) -> None:
    assert [int(r["step"]) for r in got] == [int(w["step"]) for w in want]
    for g, w in zip(got, want):
        present = {k: float(v) for k, v in g.items() if v != "" and k != "step"}
        expected = {k: v for k, v in w.items() if k != "step"}
        assert set(present) == set(expected), f"step {g['step']}: {sorted(set(present) ^ set(expected))}"
        for k, v in expected.items():
            assert math.isfinite(present[k]), (g["step"], k)
            assert present[k] == pytest.approx(v, rel=REL, abs=1e-9), f"step {g['step']}: {k}"


def fit(cb: L0L1Clipping, model: pl.LightningModule, tmp_path: Path, every: int, **trainer_kw: Any):
    """Fit with recorders around the callback and a CSVLogger in ``tmp_path``."""
    before = Recorder()
    after = IntervalRecorder(cb, before, every)
    kw: dict[str, Any] = dict(max_epochs=2)
    kw.update(trainer_kw)
    tr = trainer(callbacks=[before, cb, after], logger=CSVLogger(tmp_path, name="csv", version=0), **kw)
    tr.fit(model, loader(make_data()))
    return tr, after


CLIP_COLUMNS = {
    "grad_norm", "grad_norm_max", "grad_norm_min", "grad_norm_scaled", "scale", "clip_rate", "max_norm",
    "lr_effective", "nonfinite_steps",
}  # fmt: skip


# ---------------------------------------------------------------------------- CSVLogger: columns, intervals, values


@pytest.mark.parametrize(
    ("cb_every", "trainer_every", "steps"),
    [
        (3, 50, [2, 5, 8, 11]),  # Lightning's step axis: the 3rd batch's rows are at step 2
        (5, 50, [4, 9, 11]),  # the last, partial interval is published at the end of training
        (None, 4, [3, 7, 11]),  # None: the trainer's log_every_n_steps
    ],
)
def test_csv_rows_at_the_interval_with_reference_values(tmp_path, cb_every, trainer_every, steps):
    cb = L0L1Clipping(mode="clip", max_norm=30.0, log_every_n_steps=cb_every)
    tr, after = fit(cb, Regressor(make_net()), tmp_path, cb_every or trainer_every, log_every_n_steps=trainer_every)
    assert tr.global_step == 12
    header, rows = read_csv(tmp_path)
    assert set(header) == {f"l0l1/{c}" for c in CLIP_COLUMNS} | {"step"}
    assert [int(r["step"]) for r in rows] == steps
    want = expected_rows(after, max_norm=30.0)
    assert_rows_match(rows, want)
    # Clipping on some steps and not others: clip_rate, scale and the extremes are not trivial.
    rates = [w["l0l1/clip_rate"] for w in want]
    assert any(0 < r < 1 for r in rates), rates


def test_trainer_log_every_n_steps_0_turns_interval_logging_off(tmp_path):
    """`Trainer(log_every_n_steps=0)` turns the trainer's logging off: the callback (with no interval of its
    own) logs no interval either, not even the last partial one; with an interval of its own it logs."""
    cb = L0L1Clipping(mode="clip", max_norm=30.0)
    tr = trainer(callbacks=[cb], logger=CSVLogger(tmp_path, name="csv", version=0), max_epochs=2,
                 log_every_n_steps=0)
    tr.fit(Regressor(make_net()), loader(make_data()))
    assert tr.global_step == 12
    csv = tmp_path / "csv" / "version_0" / "metrics.csv"
    assert not csv.exists() or "l0l1/" not in csv.read_text()
    own = L0L1Clipping(mode="clip", max_norm=30.0, log_every_n_steps=4)
    trainer(callbacks=[own], logger=CSVLogger(tmp_path, name="own", version=0), max_epochs=2,
            log_every_n_steps=0).fit(Regressor(make_net()), loader(make_data()))
    rows = (tmp_path / "own" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "l0l1/grad_norm" in rows[0] and len(rows) == 4  # the header and steps 4, 8, 12


def test_csv_estimate_and_two_param_groups(tmp_path):
    cb = L0L1Clipping(mode="clip", max_norm=30.0, estimate=True, log_every_n_steps=3)
    _, after = fit(cb, Regressor(make_net(), two_groups=True), tmp_path, 3)
    header, rows = read_csv(tmp_path)
    extra = {"lr_effective_pg1", "smoothness", "L0", "L1", "lr_suggested"}
    assert set(header) == {f"l0l1/{c}" for c in CLIP_COLUMNS | extra} | {"step"}
    want = expected_rows(after, max_norm=30.0, estimate=True)
    assert_rows_match(rows, want)
    # lr_suggested only where L0 > 0; the second group runs at 3x the first's lr.
    for r in rows:
        assert (r["l0l1/lr_suggested"] != "") == (float(r["l0l1/L0"]) > 0)
        assert float(r["l0l1/lr_effective_pg1"]) == pytest.approx(3 * float(r["l0l1/lr_effective"]), rel=1e-6)
    assert any(float(r["l0l1/L0"]) > 0 for r in rows)


def test_csv_custom_prefix(tmp_path):
    cb = L0L1Clipping(mode="adaptive", max_norm=20.0, prefix="clipping/", log_every_n_steps=4)
    _, after = fit(cb, Regressor(make_net()), tmp_path, 4)
    header, rows = read_csv(tmp_path)
    assert set(header) == {f"clipping/{c}" for c in CLIP_COLUMNS} | {"step"}
    want = expected_rows(after, max_norm=20.0, prefix="clipping/")
    # adaptive: every step scales (s = g / (||g|| + g)), yet clip_rate counts the steps above max_norm
    for w in want:
        assert w["clipping/scale"] < 1
    assert_rows_match(rows, want)


def test_csv_interval_counts_optimizer_steps_under_accumulation(tmp_path):
    cb = L0L1Clipping(mode="clip", max_norm=30.0, log_every_n_steps=3)
    tr, after = fit(cb, Regressor(make_net()), tmp_path, 3, accumulate_grad_batches=2, max_epochs=4)
    assert tr.global_step == 12 and len(after.steps) == 12  # 24 batches
    _, rows = read_csv(tmp_path)
    assert [int(r["step"]) for r in rows] == [2, 5, 8, 11]
    assert_rows_match(rows, expected_rows(after, max_norm=30.0))


def test_csv_nonfinite_steps_are_left_out_of_the_means_and_counted(tmp_path):
    cb = L0L1Clipping(mode="clip", max_norm=30.0, log_every_n_steps=3)
    # step 4 is NaN (the interval 3-5 averages two steps); 6, 7, 8 too: that interval has no finite step
    model = Regressor(make_net(), nan_at=(4, 6, 7, 8))
    with pytest.warns(UserWarning, match="not finite"):
        _, after = fit(cb, model, tmp_path, 3)
    assert [math.isfinite(r["pre"]) for r in after.steps] == [i not in (4, 6, 7, 8) for i in range(12)]
    _, rows = read_csv(tmp_path)
    want = expected_rows(after, max_norm=30.0)
    assert_rows_match(rows, want)
    assert [float(r["l0l1/nonfinite_steps"]) for r in rows] == [0, 1, 4, 4]
    assert rows[2]["l0l1/grad_norm"] == "" and rows[2]["l0l1/clip_rate"] == ""  # no finite step: left out
    assert rows[1]["l0l1/grad_norm"] != "" and "nan" not in "".join(v.lower() for r in rows for v in r.values())
    # The mean over the interval with the NaN step is over its two finite steps.
    fin = [after.steps[i]["pre"] for i in (3, 5)]
    assert float(rows[1]["l0l1/grad_norm"]) == pytest.approx(sum(fin) / 2, rel=REL)


def test_csv_two_optimizers_get_suffixes(tmp_path):
    cb = L0L1Clipping(mode="clip", max_norm=8.0, log_every_n_steps=2)
    _, after = fit(cb, TwoOptimizers(make_net()), tmp_path, 2, max_epochs=1)
    assert [r["key"] for r in after.steps] == [0, 1] * 6
    header, rows = read_csv(tmp_path)
    cols = {f"l0l1/{c}_opt{k}" for c in CLIP_COLUMNS for k in (0, 1)}
    assert set(header) == cols | {"step"}
    # Lightning's step axis counts batches (global_step counts both optimizers' steps)
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    want = expected_rows(after, max_norm=8.0, n_opts=2)
    assert_rows_match(rows, want)
    assert want[0]["l0l1/grad_norm_opt0"] != pytest.approx(want[0]["l0l1/grad_norm_opt1"], rel=1e-2)


def test_a_second_fit_publishes_to_its_own_trainers_logger(tmp_path):
    cb = L0L1Clipping(mode="clip", max_norm=30.0, log_every_n_steps=3)
    for run in ("first", "second"):
        fit(cb, Regressor(make_net()), tmp_path / run, 3)
    for run in ("first", "second"):
        _, rows = read_csv(tmp_path / run)
        assert [int(r["step"]) for r in rows] == [2, 5, 8, 11], run


def test_resume_mid_interval_logs_what_an_uninterrupted_run_logs(tmp_path):
    """A checkpoint taken 2 steps into a 4-step interval: the resumed run must publish at 8 and 12 the
    rows an uninterrupted run publishes there (the interval's first 2 steps come from the checkpoint)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    kw = dict(mode="clip", max_norm=30.0, estimate=True, log_every_n_steps=4)
    ds = make_data()

    def run(name: str, epochs: int, callbacks: list, ckpt_path: Optional[Path] = None) -> list[dict[str, str]]:
        tr = trainer(callbacks=callbacks, max_epochs=epochs, enable_checkpointing=ckpt_path is None,
                     logger=CSVLogger(tmp_path / name, name="csv", version=0))
        tr.fit(Regressor(make_net()), loader(ds), ckpt_path=ckpt_path)
        return read_csv(tmp_path / name)[1]

    full = run("full", 2, [L0L1Clipping(**kw)])
    assert [int(r["step"]) for r in full] == [3, 7, 11]
    first = run("first", 1, [L0L1Clipping(**kw), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    assert [int(r["step"]) for r in first] == [3, 5]  # 5: the partial interval at the end of that fit
    resumed = run("resumed", 2, [L0L1Clipping(**kw)], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [int(r["step"]) for r in resumed] == [7, 11]
    for got_row, want_row in zip(resumed, full[1:]):
        # a column some other row of the file has is empty here ("" in the CSV)
        got = {k: float(v) for k, v in got_row.items() if v != ""}
        want = {k: float(v) for k, v in want_row.items() if v != ""}
        assert set(got) == set(want), set(got) ^ set(want)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), (want["step"], k)
    # the interval before the checkpoint is in the first row: its extremes cover steps 5-8, not 7-8
    assert float(resumed[0]["l0l1/grad_norm_max"]) == pytest.approx(float(full[1]["l0l1/grad_norm_max"]), rel=1e-12)


def test_checkpoint_without_the_interval_still_loads():
    """A checkpoint from before the interval was saved: a new interval starts, nothing raises."""
    cb = L0L1Clipping(mode="clip", max_norm=1.0)
    cb.load_state_dict({"clipper": {}, "warned_nonfinite": False})
    assert not cb.publisher.pending and cb.publisher.state_dict() == {"since_log": 0, "aggs": {}}


class LoggingRegressor(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("log_stats", [False, True])
def test_log_stats_false_publishes_nothing(tmp_path, log_stats):
    cb = L0L1Clipping(mode="clip", max_norm=30.0, log_stats=log_stats, log_every_n_steps=3)
    fit(cb, LoggingRegressor(make_net()), tmp_path, 3, log_every_n_steps=3)
    header, _ = read_csv(tmp_path)
    assert "train_loss" in header
    assert any(h.startswith("l0l1/") for h in header) is log_stats


# ---------------------------------------------------------------------------- host syncs over a whole fit


_HOOKS = sorted(n for n in dir(pl.Callback) if n.startswith("on_") or n in ("setup", "teardown"))


def _count_per_hook(cb: L0L1Clipping) -> dict[str, HookReads]:
    """Wrap every Lightning hook of ``cb`` (on the instance) with its own host-read counter."""
    return {name: HookReads(cb, name) for name in _HOOKS}


def _tally(hooks: dict[str, HookReads]) -> tuple[dict[str, HostReads], dict[str, int]]:
    """The host reads and the calls of each hook."""
    return {n: h.reads for n, h in hooks.items()}, {n: h.calls for n, h in hooks.items()}


@pytest.mark.parametrize(("max_steps", "final"), [(30, 0), (35, 1)])
def test_one_transfer_per_interval_and_none_per_step(tmp_path, max_steps, final):
    cb = L0L1Clipping(mode="clip", max_norm=30.0, nonfinite="propagate", log_every_n_steps=10)
    hooks = _count_per_hook(cb)
    tr = trainer(callbacks=[cb], logger=CSVLogger(tmp_path, name="csv", version=0), max_steps=max_steps, max_epochs=-1)
    tr.fit(Regressor(make_net()), loader(make_data()))
    counters, calls = _tally(hooks)
    assert calls["on_before_optimizer_step"] == max_steps and calls["on_train_batch_end"] == max_steps
    reads = {n: (c.scalar, c.transfers) for n, c in counters.items()}
    assert reads.pop("on_before_optimizer_step") == (0, 0)
    assert reads.pop("on_train_batch_end") == (0, 3)  # one per interval: steps 10, 20, 30
    assert reads.pop("on_train_end") == (0, final)  # the partial interval 31-35
    assert all(r == (0, 0) for r in reads.values()), reads
    _, rows = read_csv(tmp_path)
    assert [int(r["step"]) for r in rows] == [9, 19, 29] + ([34] if final else [])


def test_two_optimizers_one_transfer_per_interval(tmp_path):
    cb = L0L1Clipping(mode="clip", max_norm=8.0, nonfinite="propagate", log_every_n_steps=3)
    hooks = _count_per_hook(cb)
    trainer(callbacks=[cb], logger=False, max_epochs=1).fit(TwoOptimizers(make_net()), loader(make_data()))
    counters, calls = _tally(hooks)
    assert calls["on_before_optimizer_step"] == 12
    assert (counters["on_before_optimizer_step"].scalar, counters["on_before_optimizer_step"].transfers) == (0, 0)
    assert (counters["on_train_batch_end"].scalar, counters["on_train_batch_end"].transfers) == (0, 2)


# ---------------------------------------------------------------------------- progress bar


def _fit_one_epoch(cb: L0L1Clipping, model: pl.LightningModule) -> tuple[Recorder, dict[str, Any]]:
    """A recorder before ``cb``, one epoch: the recorded raw norms and the progress bar's metrics."""
    before = Recorder()
    tr = trainer(callbacks=[before, cb], max_epochs=1)
    tr.fit(model, loader(make_data()))
    return before, tr.progress_bar_metrics


def test_prog_bar_shows_grad_norm_and_scale_and_documents_the_sync():
    cb = L0L1Clipping(mode="clip", max_norm=30.0, prog_bar=True)
    before, pb = _fit_one_epoch(cb, Regressor(make_net()))
    assert pb["l0l1/grad_norm"] == pytest.approx(before.norms[-1], rel=REL)
    assert pb["l0l1/scale"] == pytest.approx(min(1.0, 30.0 / (before.norms[-1] + 1e-6)), rel=REL)
    doc = " ".join(L0L1Clipping.__doc__.split())
    prog_bar_doc = doc[doc.index("prog_bar:") :][:200]
    assert "sync" in prog_bar_doc and "every step" in prog_bar_doc

    cb = L0L1Clipping(mode="clip", max_norm=30.0)
    tr = trainer(callbacks=[cb], max_epochs=1)
    tr.fit(Regressor(make_net()), loader(make_data()))
    assert not any(k.startswith("l0l1/") for k in tr.progress_bar_metrics)


def test_prog_bar_two_optimizers_each_under_its_own_name():
    cb = L0L1Clipping(mode="clip", max_norm=8.0, prog_bar=True)
    before, pb = _fit_one_epoch(cb, TwoOptimizers(make_net()))
    assert pb["l0l1/grad_norm_opt0"] == pytest.approx(before.norms[-2], rel=REL)
    assert pb["l0l1/grad_norm_opt1"] == pytest.approx(before.norms[-1], rel=REL)
    assert "l0l1/grad_norm" not in pb


# ---------------------------------------------------------------------------- DDP (subprocess)

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
DDP_TIMEOUT_S = 240.0
def _run_script(args: list[str], cwd: Path) -> Optional[str]:
    """Run a script (and the rank Lightning launches from it) with a deadline; the log on failure."""
    env = clean_env()
    log = cwd / "log.txt"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=DDP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: Lightning's rank-1 child too
            proc.wait()
            code = None
    if code == 0:
        return None
    return f"exit code {code} (None: timed out after {DDP_TIMEOUT_S:.0f} s)\n{log.read_text(errors='replace')[-6000:]}"


@pytest.mark.slow
def test_ddp_publishes_global_norms_from_rank_zero_only(tmp_path):
    if not torch.distributed.is_available():  # pragma: no cover
        pytest.skip("torch.distributed is not available")
    sys.path.insert(0, str(SCRIPTS))
    try:
        import dist_common as C
    finally:
        sys.path.remove(str(SCRIPTS))
    failure = _run_script([str(SCRIPTS / "stats_ddp.py"), str(tmp_path)], tmp_path)
    assert failure is None, failure
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(C.WORLD)]
    assert [o["rank"] for o in outs] == [0, 1]

    # The norms each rank measured (plain torch, on the all-reduced gradient) are the global ones:
    # the same on both ranks and equal to a single-process reference over the same global batches.
    pre0, pre1 = outs[0]["pre"], outs[1]["pre"]
    assert len(pre0) == C.STEPS
    assert pre1 == pytest.approx(pre0, rel=1e-6)
    ref = C.reference_training(C.global_batches([o["seen"] for o in outs]), max_norm=outs[0]["max_norm"])
    assert pre0 == pytest.approx(ref["norms"], rel=1e-4)
    for o in outs:
        assert o["cb_norm"] == pytest.approx(o["pre"], rel=1e-6)

    # Rank 1 published nothing (its recording logger is not rank-zero-only); rank 0 every interval.
    assert outs[1]["published"] == []
    published = outs[0]["published"]
    every = outs[0]["every"]
    # one full interval, then the partial one, on Lightning's step axis (the batch's index)
    assert [s for s, _ in published] == [every - 1, C.STEPS - 1]
    # every rank reads the interval (no collective): EarlyStopping / ModelCheckpoint find the keys on each
    assert outs[1]["callback_metrics"] == outs[0]["callback_metrics"]
    assert outs[0]["callback_metrics"]["l0l1/grad_norm"] == pytest.approx(sum(pre0[:every]) / every, rel=1e-6)
    intervals = [pre0[:every], pre0[every:]]
    for (_, metrics), norms in zip(published, intervals):
        assert metrics["l0l1/grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)
        assert metrics["l0l1/grad_norm_max"] == pytest.approx(max(norms), rel=1e-6)
        assert metrics["l0l1/grad_norm_min"] == pytest.approx(min(norms), rel=1e-6)
        assert metrics["l0l1/nonfinite_steps"] == 0

    # The CSVLoggers shared one save_dir: one metrics.csv, rank zero's, with the same rows.
    _, rows = read_csv(tmp_path / "csv")
    assert [int(r["step"]) for r in rows] == [s for s, _ in published]
    for r, (_, metrics) in zip(rows, published):
        assert {k: float(v) for k, v in r.items() if k != "step"} == pytest.approx(metrics, rel=1e-12)


def test_probe_reference_can_fail(tmp_path):
    """The reference is independent of the library: a perturbed row is rejected."""
    cb = L0L1Clipping(mode="clip", max_norm=30.0, log_every_n_steps=3)
    _, after = fit(cb, Regressor(make_net()), tmp_path, 3)
    _, rows = read_csv(tmp_path)
    want = expected_rows(after, max_norm=30.0)
    assert_rows_match(rows, want)
    rows[1]["l0l1/grad_norm"] = str(float(rows[1]["l0l1/grad_norm"]) * (1 + 1e-5))
    with pytest.raises(AssertionError, match="grad_norm"):
        assert_rows_match(rows, want)
