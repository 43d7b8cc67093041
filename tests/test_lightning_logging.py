"""Statistics through Lightning's own logging, per-layer gradient norms, and the W&B summary.

* ``trainer.callback_metrics``, ``EarlyStopping`` and ``ModelCheckpoint`` find the ``l0l1/*`` keys,
  with the values of a plain-torch reference (the interval means of the norms measured before the
  callback);
* the rows share the module's own ``self.log`` rows and ``LearningRateMonitor``'s in the CSV file;
* per-layer norms against a float64 reference computed here from the raw gradients, with 0 host
  reads per step, and the warnings that name layers;
* the W&B summary keeps no metric that is undefined at the end.

The other namespace (``lightning.pytorch``) runs the EarlyStopping / ModelCheckpoint check in
``namespace_scripts/namespace_run.py``.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from _models import Regressor, loader, make_data, make_net, trainer
from _sync import HookReads
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_l0l1 import L0L1Clipping
from lightning_l0l1.publish import Publisher, WandbSink


@pytest.fixture(autouse=True)
def _no_active_wandb_run(monkeypatch: pytest.MonkeyPatch) -> None:
    if "wandb" in sys.modules:
        monkeypatch.setattr(sys.modules["wandb"], "run", None, raising=False)


class RawGrads(pl.Callback):
    """Placed before L0L1Clipping: each step's raw gradients in float64, by parameter name."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append({n: p.grad.detach().double().clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})

    def norms(self) -> list[float]:
        return [float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in s.values()]))) for s in self.steps]

    def layer_norms(self, by: str, p: float = 2.0) -> list[dict[str, float]]:
        out = []
        for s in self.steps:
            layers: dict[str, list[torch.Tensor]] = {}
            for name, g in s.items():
                layers.setdefault(name.rsplit(".", 1)[0] if by == "module" else name, []).append(g.reshape(-1))
            out.append({k: float(torch.linalg.vector_norm(torch.cat(v), p)) for k, v in layers.items()})
        return out


class LoggingRegressor(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


def read_csv(save_dir: Path) -> list[dict[str, str]]:
    (f,) = list(save_dir.rglob("metrics.csv"))
    with open(f, newline="") as fh:
        return list(csv.DictReader(fh))


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


# ---------------------------------------------------------------------------- callback_metrics and monitors


def test_early_stopping_and_model_checkpoint_monitor_l0l1_keys(tmp_path: Path) -> None:
    raw = RawGrads()
    cb = L0L1Clipping(mode="clip", max_norm=30.0)
    stop = EarlyStopping(monitor="l0l1/clip_rate", mode="max", patience=0, check_on_train_epoch_end=True,
                         stopping_threshold=2.0)  # never met: it only has to find the key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="l0l1/grad_norm", mode="min", save_top_k=1)
    tr = trainer(callbacks=[raw, cb, stop, ckpt], enable_checkpointing=True, log_every_n_steps=3, max_epochs=2)
    tr.fit(LoggingRegressor(make_net()), loader(make_data()))
    norms = raw.norms()
    assert len(norms) == 12
    last = norms[9:12]  # the last interval of 3 steps
    metrics = tr.callback_metrics
    assert float(metrics["l0l1/grad_norm"]) == pytest.approx(_mean(last), rel=1e-6)
    assert float(metrics["l0l1/grad_norm_max"]) == pytest.approx(max(last), rel=1e-6)
    assert float(metrics["l0l1/clip_rate"]) == pytest.approx(sum(n > 30.0 for n in last) / 3)
    # the epoch-end checks read the interval that ended the epoch: steps 4-6 and 10-12
    assert float(stop.best_score) == pytest.approx(
        max(sum(n > 30.0 for n in norms[i : i + 3]) / 3 for i in (3, 9)))
    assert float(ckpt.best_model_score) == pytest.approx(min(_mean(norms[3:6]), _mean(last)), rel=1e-6)
    assert Path(ckpt.best_model_path).exists()


def test_rows_share_the_modules_step_and_row_in_csv(tmp_path: Path) -> None:
    cb = L0L1Clipping(mode="clip", max_norm=30.0)
    tr = trainer(callbacks=[cb, LearningRateMonitor(logging_interval="step")],
                 logger=CSVLogger(tmp_path, name="csv", version=0), log_every_n_steps=4, max_epochs=2)
    tr.fit(LoggingRegressor(make_net()), loader(make_data()))
    rows = read_csv(tmp_path)
    with_l0l1 = [r for r in rows if r["l0l1/grad_norm"]]
    with_loss = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in with_loss] == [3, 7, 11]  # Lightning's own rows
    assert with_l0l1 == with_loss  # the same rows: same step, one row each
    # LearningRateMonitor writes rows of its own (as it does beside the module's), at the same steps
    assert [int(r["step"]) for r in rows if r["lr-SGD"]] == [3, 7, 11]


def test_an_interval_without_a_value_is_not_logged_again(tmp_path: Path) -> None:
    """A metric without a value in an interval (here every mean: no finite step) must not be written again
    with its last value by Lightning, which keeps a logged value until the epoch ends."""
    cb = L0L1Clipping(mode="clip", max_norm=30.0)
    tr = trainer(callbacks=[cb], logger=CSVLogger(tmp_path, name="csv", version=0), log_every_n_steps=2,
                 max_epochs=1)
    module = LoggingRegressor(make_net())
    # an interval of non-finite steps only (steps 2 and 3): none of its means exists
    module.nan_at = {2, 3}
    with pytest.warns(UserWarning, match="not finite"):
        tr.fit(module, loader(make_data()))
    rows = [r for r in read_csv(tmp_path) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    assert rows[0]["l0l1/grad_norm"] and rows[1]["l0l1/grad_norm"] == "" and rows[2]["l0l1/grad_norm"]
    assert rows[1]["l0l1/nonfinite_steps"] == "2.0"


# ---------------------------------------------------------------------------- per-layer norms


@pytest.mark.parametrize(("by", "p"), [("module", 2.0), ("parameter", 2.0), ("module", math.inf)])
def test_layer_norms_match_a_float64_reference(tmp_path: Path, by: str, p: float) -> None:
    raw = RawGrads()
    cb = L0L1Clipping(mode="clip", max_norm=30.0, layer_norms=by, norm_type=p, nonfinite="propagate")
    hooks = {name: HookReads(cb, name) for name in ("on_before_optimizer_step", "on_train_batch_end")}
    tr = trainer(callbacks=[raw, cb], logger=CSVLogger(tmp_path, name="csv", version=0), log_every_n_steps=4)
    tr.fit(Regressor(make_net()), loader(make_data()))
    assert hooks["on_before_optimizer_step"].calls == 12
    assert hooks["on_before_optimizer_step"].reads.n == 0  # no host read per step
    assert hooks["on_train_batch_end"].reads.n == 3  # one transfer per interval
    ref = raw.layer_norms(by, p)
    expected_layers = {"net.0", "net.2", "net.4"} if by == "module" else {
        f"net.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert set(ref[0]) == expected_layers
    rows = [r for r in read_csv(tmp_path) if r["l0l1/grad_norm"]]
    assert [int(r["step"]) for r in rows] == [3, 7, 11]
    for k, row in enumerate(rows):
        steps = ref[4 * k : 4 * k + 4]
        for layer in expected_layers:
            vals = [s[layer] for s in steps]
            assert float(row[f"l0l1/layer_grad_norm/{layer}"]) == pytest.approx(_mean(vals), rel=1e-5), layer
            assert float(row[f"l0l1/layer_grad_norm_max/{layer}"]) == pytest.approx(max(vals), rel=1e-5), layer
        # the layers make up the global norm
        total = [torch.linalg.vector_norm(torch.tensor(list(s.values())), p).item() for s in steps]
        assert float(row["l0l1/grad_norm"]) == pytest.approx(_mean(total), rel=1e-5)


def test_layer_norms_off_by_default_and_nothing_kept() -> None:
    cb = L0L1Clipping(mode="clip", max_norm=1.0)
    assert cb.layer_norms is None and not cb.clipper.keep_param_norms
    with pytest.raises(ValueError, match=r"`layer_norms` must be one of 'module', 'parameter', got 'layer'"):
        L0L1Clipping(mode="clip", max_norm=1.0, layer_norms="layer")  # type: ignore[arg-type]


class BigLastLayer(Regressor):
    """The last layer's gradient is 1000x the others': the scale is far below 0.1."""

    def on_after_backward(self) -> None:
        for p in self.net[4].parameters():
            p.grad.mul_(1000.0)


def test_a_hard_clipped_interval_names_the_largest_layers(tmp_path: Path) -> None:
    raw = RawGrads()
    cb = L0L1Clipping(mode="clip", max_norm=1.0, layer_norms="module")
    with pytest.warns(UserWarning, match=r"scaled by [0-9.e-]+ \(less than 0.1\) .* logged at step 3") as rec:
        trainer(callbacks=[raw, cb], log_every_n_steps=4, max_epochs=1).fit(
            BigLastLayer(make_net()), loader(make_data()))
    (msg,) = [str(w.message) for w in rec if "less than 0.1" in str(w.message)]
    ref = raw.layer_norms("module")
    # the most-scaled step of the first interval is the one with the largest global norm
    worst = max(ref[:4], key=lambda s: math.fsum(v * v for v in s.values()))
    order = sorted(worst, key=worst.get, reverse=True)
    listed = msg[msg.index("norms at that step:") :]
    assert listed.index(order[0]) < listed.index(order[1]) < listed.index(order[2])
    assert f"{worst[order[0]]:.4g}" in listed


def test_a_nonfinite_step_names_the_layers(tmp_path: Path) -> None:
    class NanFirstLayer(Regressor):
        def on_after_backward(self) -> None:
            if self.global_step == 2:
                self.net[0].weight.grad[0, 0] = math.nan

    cb = L0L1Clipping(mode="clip", max_norm=30.0, layer_norms="module")
    with pytest.warns(UserWarning, match=r"Layers with a non-finite gradient norm: net\.0\.") as rec:
        trainer(callbacks=[cb], max_epochs=1).fit(NanFirstLayer(make_net()), loader(make_data()))
    msg = next(str(w.message) for w in rec if "non-finite gradient norm" in str(w.message))
    assert "net.2" not in msg and "net.4" not in msg


# ---------------------------------------------------------------------------- W&B summary, W&B-only settings


class _Summary(dict):  # type: ignore[type-arg]
    pass


class _Run:
    def __init__(self) -> None:
        self.summary = _Summary()
        self.logged: list[dict[str, Any]] = []
        self.config = type("C", (), {"update": lambda *a, **k: None})()

    def define_metric(self, *a: Any, **k: Any) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        self.logged.append(row)
        self.summary.update({k: v for k, v in row.items() if isinstance(v, float)})  # W&B's own auto-summary


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_summary_drops_a_metric_that_became_undefined() -> None:
    run = _Run()
    pub = Publisher("l0l1/", 2, 10, {})
    pub._sinks = (pub.sinks([])[0], WandbSink(lambda: run, "l0l1/", {}, log_metrics=True))
    from lightning_l0l1.publish import Interval

    pub.publish(Interval({"l0l1/L0": 300.0, "l0l1/lr_suggested": 1 / 300.0}), 1, [], False, True)
    assert run.summary["l0l1/lr_suggested"] == pytest.approx(1 / 300.0)
    # at the end L0 = 0: lr_suggested is undefined (infinite), the summary must not keep 1/300
    pub.finish(3, [], lambda: {"l0l1/L0": 0.0, "l0l1/lr_suggested": math.inf, "l0l1/steps": 4.0},
               last={"l0l1/L0": 0.0})
    assert run.summary["l0l1/L0"] == 0.0 and run.summary["l0l1/steps"] == 4.0
    assert "l0l1/lr_suggested" not in run.summary


def test_wandb_only_setting_without_wandb_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.warns(UserWarning, match=r"`L0L1Clipping\(wandb_table_every=1\)` only affects W&B") as rec:
        L0L1Clipping(mode="clip", max_norm=1.0, wandb_table_every=1)
    assert len([w for w in rec if "only affects W&B" in str(w.message)]) == 1


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_gets_the_layers_histogram_and_table() -> None:
    import wandb

    from lightning_l0l1.publish import Interval

    run = _Run()
    pub = Publisher("l0l1/", 2, 1, {})
    pub._sinks = (pub.sinks([])[0], WandbSink(lambda: run, "l0l1/", {}, log_metrics=True, table_every=1))
    layers = {0: (["net.0", "net.2"], [1.5, math.nan], [2.0, math.nan], [2.0, 0.0], 0.5)}
    pub.publish(Interval({"l0l1/grad_norm": 1.0}, layers=layers), 7, [], False, False)
    rows = [r for r in run.logged if "l0l1/layer_grad_norm_hist" in r]
    assert len(rows) == 1 and rows[0]["trainer/global_step"] == 7
    assert isinstance(rows[0]["l0l1/layer_grad_norm_hist"], wandb.Histogram)
    table = rows[0]["l0l1/layer_grad_norm_table"]
    assert table.columns == ["layer", "grad_norm_mean", "grad_norm_max"]
    assert table.data == [["net.0", 1.5, 2.0]]  # a layer without a finite step is left out
