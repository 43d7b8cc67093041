"""Both Lightning namespaces: ``pytorch_lightning`` and the unified package's ``lightning.pytorch``.

Each installed namespace runs, in a fresh process that imports only it, a fit with CSV logging, a
checkpoint resume compared bitwise with an uninterrupted run, LightningCLI from YAML with
``lightning_l0l1.L0L1Clipping`` and with the namespace's explicit class path, and a ``WandbLogger``
(offline) run. The rest checks, in this process, how the class is chosen and what importing costs.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _procs import clean_env

import lightning_l0l1
from lightning_l0l1.clipper import GradientClipper

SCRIPT = Path(__file__).parent / "namespace_scripts" / "namespace_run.py"
NAMESPACES = ["lightning", "pytorch_lightning"]


def _installed(ns: str) -> bool:
    return importlib.util.find_spec(ns) is not None


@pytest.mark.slow
@pytest.mark.parametrize("ns", NAMESPACES)
def test_fit_resume_cli_and_loggers_under_each_namespace(ns, tmp_path):
    if not _installed(ns):
        pytest.skip(f"{ns} is not installed")
    out = subprocess.run([sys.executable, str(SCRIPT), ns, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=clean_env(WANDB_MODE="offline", WANDB_SILENT="true"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    module = f"lightning_l0l1.{ns}"
    assert r["namespace"] == ns and not r["other_imported"]  # nothing pulled in the other namespace
    fit = r["fit"]
    assert fit["class_module"] == module and fit["is_callback"]
    assert fit["steps"] == 24 and fit["resume_bitwise"] and fit["csv_has_l0l1"]
    # a state under its earlier key resumes, without Lightning's "callbacks are missing" warning
    assert r["legacy"]["resumed"] == 2 * r["legacy"]["first"] and not r["legacy"]["missing_warning"]
    # EarlyStopping and ModelCheckpoint found their l0l1/* keys: the values of the rows logged at each
    # epoch's last batch (6 batches an epoch, rows every 2: steps 5, 11, 17, 23)
    rows = list(csv.DictReader(fit["csv"]))
    at_epoch_end = [r for r in rows if r["l0l1/grad_norm"] and int(r["step"]) % 6 == 5]
    assert len(at_epoch_end) == 4
    assert fit["stop_score"] == pytest.approx(max(float(r["l0l1/clip_rate"]) for r in at_epoch_end), rel=1e-6)
    assert fit["ckpt_score"] == pytest.approx(min(float(r["l0l1/grad_norm"]) for r in at_epoch_end), rel=1e-6)
    for key in ("cli_auto", "cli_explicit"):  # both class paths resolve to this namespace's Callback subclass
        assert r[key] == {"max_norm": 0.5, "steps": 4.0, "class_module": module}, key
    assert r["wandb"] == {"steps": 4.0, "sinks_found_wandb": True}


@pytest.mark.slow
@pytest.mark.skipif(not all(map(_installed, NAMESPACES)), reason="needs both Lightning packages")
def test_the_class_used_before_lightning_pytorch_is_imported_runs_as_lightning_pytorchs(tmp_path):
    """The other import order (the one above imports the namespace first): ``lightning_l0l1.L0L1Clipping``
    resolved before ``import lightning.pytorch`` is ``pytorch_lightning``'s; attached to a ``lightning.pytorch``
    Trainer it becomes that namespace's class at ``setup``, says so once, and its keys reach the monitors."""
    script = SCRIPT.parent / "import_order.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=clean_env())
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["first_class"] == "lightning_l0l1.pytorch_lightning.L0L1Clipping"
    assert r["class_after_fit"] == "lightning_l0l1.lightning.L0L1Clipping" and r["is_lightning_callback"]
    (warning,) = r["warnings"]
    assert "`from lightning_l0l1.lightning import L0L1Clipping`" in warning
    assert r["steps"] == 12 and {"l0l1/grad_norm", "l0l1/clip_rate"} <= set(r["callback_metrics"])
    norms = r["raw_norms"]
    # rows every 3 steps; the epoch-end checks read the intervals of steps 4-6 and 10-12
    means = [sum(norms[i : i + 3]) / 3 for i in (3, 9)]
    assert r["ckpt_best"] == pytest.approx(min(means), rel=1e-5)
    assert r["grad_norm"] == pytest.approx(means[1], rel=1e-5)
    assert r["stop_best"] == max(sum(n > 0.5 for n in norms[i : i + 3]) / 3 for i in (3, 9))


def test_a_mismatched_subclass_is_refused_at_setup():
    from lightning_l0l1.pytorch_lightning import L0L1Clipping as ForPL

    class Mine(ForPL):
        pass

    fake_trainer = type("Trainer", (), {"__module__": "lightning.pytorch.trainer.trainer"})()
    with pytest.raises(RuntimeError, match=r"`Mine` is a `pytorch_lightning` callback, but the Trainer is a "
                                           r"`lightning.pytorch` Trainer.*from lightning_l0l1.lightning import"):
        Mine(mode="clip", max_norm=1.0).setup(fake_trainer, None, "fit")


def test_importing_the_package_imports_no_lightning_namespace():
    code = (
        "import sys, lightning_l0l1, lightning_l0l1.functional\n"
        "from lightning_l0l1 import GradientClipper\n"
        "print([m for m in ('pytorch_lightning', 'lightning', 'lightning.pytorch', 'wandb') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("imported", "installed", "want"),
    [
        ({"lightning.pytorch"}, {"lightning", "pytorch_lightning"}, "lightning"),
        ({"pytorch_lightning"}, {"lightning", "pytorch_lightning"}, "pytorch_lightning"),
        (set(), {"lightning", "pytorch_lightning"}, "pytorch_lightning"),
        ({"lightning.pytorch", "pytorch_lightning"}, {"lightning", "pytorch_lightning"}, "pytorch_lightning"),
        (set(), {"lightning"}, "lightning"),
        (set(), {"pytorch_lightning"}, "pytorch_lightning"),
    ],
)
def test_the_namespace_in_use_is_chosen(monkeypatch, imported, installed, want):
    modules = {k: v for k, v in sys.modules.items() if k not in ("lightning.pytorch", "pytorch_lightning")}
    modules.update({name: sys.modules.get(name, object()) for name in imported})  # type: ignore[misc]
    monkeypatch.setattr(sys, "modules", modules)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else None)
    assert lightning_l0l1.namespace() == want


def test_without_lightning_the_error_says_what_to_install(monkeypatch):
    modules = {k: v for k, v in sys.modules.items() if k not in ("lightning.pytorch", "pytorch_lightning")}
    monkeypatch.setattr(sys, "modules", modules)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install lightning") as info:
        lightning_l0l1.L0L1Clipping  # noqa: B018
    assert "pip install pytorch-lightning" in str(info.value) and "functional" in str(info.value)


@pytest.mark.skipif(not all(map(_installed, NAMESPACES)), reason="needs both Lightning packages")
def test_both_classes_share_the_implementation_and_the_checkpoint_key():
    from lightning.pytorch.callbacks import Callback as LightningCallback
    from pytorch_lightning.callbacks import Callback as PLCallback

    from lightning_l0l1.lightning import L0L1Clipping as ForLightning
    from lightning_l0l1.pytorch_lightning import L0L1Clipping as ForPL

    assert issubclass(ForLightning, LightningCallback) and not issubclass(ForLightning, PLCallback)
    assert issubclass(ForPL, PLCallback) and not issubclass(ForPL, LightningCallback)
    for kw in ({}, {"mode": "clip", "max_norm": 2.0}):  # a checkpoint of one loads into the other
        assert ForLightning(**kw).state_key == ForPL(**kw).state_key
    a, b = ForLightning(mode="clip", max_norm=2.0), ForPL(mode="clip", max_norm=2.0)
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("setting", ["max_norm", "l0", "l1", "initial_step"])
@pytest.mark.parametrize(
    "convert", [np.float64, np.float32, lambda v: torch.tensor(v), lambda v: torch.tensor(v, dtype=torch.float64),
                np.array],
    ids=["np.float64", "np.float32", "tensor", "tensor64", "np.array0d"],
)
def test_numbers_as_torch_accepts_them(setting, convert):
    """Like torch's clip_grad_norm_, a numpy number or a 0-d tensor is a number (read once, at construction)."""
    mode = "l0l1" if setting in ("l0", "l1") else "clip" if setting == "max_norm" else "auto"
    kw = {"max_norm": 0.5} if mode == "clip" else {"l0": 0.5, "l1": 0.25} if mode == "l0l1" else {}
    value = {"max_norm": 0.5, "l0": 0.5, "l1": 0.25, "initial_step": 0.5}[setting]
    clipper = GradientClipper(mode, **{**kw, setting: convert(value)})  # type: ignore[arg-type]
    got = getattr(clipper, setting)
    assert type(got) is float and got == float(np.float32(value) if convert is np.float32 else value)


def test_counts_and_devices_as_torch_accepts_them():
    c = GradientClipper(estimate_every=np.int64(3), snapshot_device=torch.device("cpu"))  # type: ignore[arg-type]
    assert c.estimate_every == 3 and type(c.estimate_every) is int and c.snapshot_device == "cpu"
    with pytest.raises(ValueError, match="`snapshot_device` must be None or 'cpu', got device"):
        GradientClipper(snapshot_device=torch.device("meta"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_norm` must be a number, got tensor"):
        GradientClipper("clip", max_norm=torch.tensor([1.0, 2.0]))  # type: ignore[arg-type]
