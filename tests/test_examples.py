"""Smoke tests for every script in ``examples/``: tiny settings, finite summaries, valid PNGs, ``--help``.

The scripts are loaded from their files and their ``main(argv) -> dict`` is called in this
process with the smallest sizes their parsers accept (read from their ``--help``), except
``ddp.py``: ``strategy="ddp"`` re-runs the command line for rank 1, so it runs as a
subprocess. The quickstart keeps its default W&B logger (offline): the test finds the run's
files. Every script is also run with ``--help`` as a user runs it.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _procs import clean_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["quickstart", "figure1", "figure2", "cli", "ddp", "plain_pytorch", "fabric"]

# The smallest sizes, for whichever of these flags a script's parser has.
TINY = {
    "--steps": "5",
    "--epochs": "1",
    "--hidden": "8",
    "--seq": "8",
    "--seq-len": "8",
    "--seqs": "8",
    "--batch-size": "4",
    "--batch": "4",
    "--seeds": "1",
    "--n-seeds": "1",
    "--layers": "1",
}
FLAGS = ["--no-wandb", "--no-progress"]
# Per script: enough steps for what its summary must report (the quickstart's L0/L1 estimates).
TINY_FOR = {"quickstart": {"--seqs": "48"}}


def _path(name: str) -> Path:
    path = EXAMPLES / f"{name}.py"
    assert path.exists(), f"examples/{name}.py is missing"
    return path


def _load(name: str) -> ModuleType:
    key = f"_example_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if str(EXAMPLES) not in sys.path:  # the scripts import their shared helpers from `_shared`
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(key, _path(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"examples/{name}.py has no main(argv)"
    return module


def _help_text(module: ModuleType, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


def _tiny_argv(help_text: str, out: Path, name: str = "") -> list[str]:
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    argv: list[str] = []
    for flag, value in {**TINY, **TINY_FOR.get(name, {})}.items():
        if flag in flags:
            argv += [flag, value]
    argv += [f for f in FLAGS if f in flags]
    if "--out" in flags:
        argv += ["--out", str(out)]
    return argv


def _numbers(obj: Any, key: str = "") -> list[tuple[str, float]]:
    """Every number in a (nested) summary, with its key path; booleans and strings are not numbers."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [(key, float(obj))]
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _numbers(v, f"{key}.{k}" if key else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in _numbers(v, f"{key}[{i}]")]
    return []


# Runs that are meant to diverge (an unclipped baseline) may report NaN/inf under these keys.
_MAY_DIVERGE = re.compile(r"unclipped|no_?clip|diverg|none|baseline", re.IGNORECASE)


def _check_summary(summary: Any, name: str) -> None:
    assert isinstance(summary, dict), f"{name}: main() returned {type(summary).__name__}, not a dict"
    numbers = _numbers(summary)
    assert numbers, f"{name}: no number in the summary {summary!r}"
    bad = [(k, v) for k, v in numbers if not math.isfinite(v) and not _MAY_DIVERGE.search(k)]
    assert not bad, f"{name}: non-finite summary numbers {bad}"


def _check_pngs(root: Path, name: str) -> list[Path]:
    import matplotlib.image as mpimg

    pngs = sorted(root.rglob("*.png"))
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{name}: {png} is not a PNG"
        assert len(data) > 2000, f"{name}: {png} is only {len(data)} bytes"
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50, f"{name}: {png} has shape {img.shape}"
        assert float(img.std()) > 0, f"{name}: {png} is blank"
    return pngs


# ---------------------------------------------------------------------------------------- --help, as a user runs it
@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.Popen]:
    """`python examples/NAME.py --help` for every script, started together (each imports torch)."""
    procs = {}
    for name in SCRIPTS:
        path = EXAMPLES / f"{name}.py"
        if path.exists():
            procs[name] = subprocess.Popen(
                [sys.executable, str(path), "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name: str, help_runs: dict[str, subprocess.Popen]) -> None:
    _path(name)
    proc = help_runs[name]
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"examples/{name}.py --help exited {proc.returncode}:\n{out[-3000:]}"
    assert "usage" in out.lower(), out[-3000:]


# ---------------------------------------------------------------------------------------- in-process runs
@pytest.mark.parametrize("name", ["quickstart", "figure1", "figure2", "plain_pytorch", "fabric"])
def test_runs_tiny(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    module = _load(name)
    monkeypatch.chdir(tmp_path)  # anything a script writes without --out lands here
    out = tmp_path / "out"
    argv = _tiny_argv(_help_text(module, capsys), out, name)
    with_wandb = name == "quickstart" and importlib.util.find_spec("wandb") is not None
    if with_wandb:  # the default: W&B offline, no account, no network
        argv.remove("--no-wandb")
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_SILENT", "true")
    else:
        monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = module.main(argv)
    _check_summary(summary, name)
    printed = capsys.readouterr().out
    if name == "quickstart":  # the summary has the lines the documentation shows, in its order
        shown = printed[printed.index("L0L1Clipping summary") :]
        assert _summary_labels(shown) == _summary_labels(QUICKSTART_OUTPUT.read_text())
    assert not re.search(r"\b(nan|inf)\b", printed, re.IGNORECASE), f"{name} printed a non-finite number:\n{printed}"
    pngs = _check_pngs(tmp_path, name)
    expected = {"quickstart": ["quickstart_loss.png", "quickstart_grad_norm.png"], "figure1": ["figure1.png"],
                "figure2": ["figure2.png"]}.get(name, [])
    assert sorted(p.name for p in pngs) == sorted(expected), f"{name}: PNGs {pngs} (argv {argv})"
    if with_wandb:
        runs = list((out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb")), f"no offline W&B run under {out}"


QUIET = ["--no-wandb", "--no-progress"]
#: the quickstart's summary as docs/getting-started.md shows it, written by a real run
#: (`python examples/quickstart.py --no-wandb --summary-out docs/quickstart_output.txt`)
QUICKSTART_OUTPUT = EXAMPLES.parent / "docs" / "quickstart_output.txt"


def _summary_labels(text: str) -> list[str]:
    """The label of every summary line (``mode``, ``base step``...), continuation lines left out."""
    return [ln[:23].strip() for ln in text.splitlines() if ln.startswith("  ") and not ln.startswith("   ")]


def test_the_documented_quickstart_summary_is_one_run_and_adds_up() -> None:
    """The stored output (what the docs include) tells a consistent story about auto's numbers."""
    text = QUICKSTART_OUTPUT.read_text()
    assert '--8<-- "docs/quickstart_output.txt"' in (EXAMPLES.parent / "docs" / "getting-started.md").read_text()
    values = {ln[:23].strip(): ln[23:] for ln in text.splitlines() if ln.startswith("  ") and not ln.startswith("   ")}

    def num(label: str, k: int = 0) -> float:
        return float(re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", values[label])[k])

    lr, base, threshold = num("learning rate set"), num("base step"), num("threshold in use")
    norm, scale, lr_eff = num("last step"), float(re.search(r"scale ([\d.]+)", values["last step"])[1]), \
        num("effective lr")
    assert values["mode"].strip() == "auto" and num("optimizer steps") == 256
    assert lr_eff == pytest.approx(lr * scale, rel=0.01)  # the effective lr is lr x scale
    below = norm < threshold
    assert ("below the threshold" in values["last step"]) is below
    if below:  # below the threshold the step is the base step alone: scale = base / lr
        assert scale == pytest.approx(base / lr, abs=0.006) and lr_eff == pytest.approx(base, rel=0.01)
    else:
        assert lr_eff == pytest.approx(base * threshold / norm, rel=0.01)
    assert f"scaled by {base / lr:.2f}" in text
    assert 0 <= num("clip rate (all run)") <= 1


@pytest.mark.parametrize("mode", ["clip", "adaptive", "l0l1"])
def test_plain_pytorch_modes(mode: str, tmp_path: Path, capsys) -> None:
    argv = ["--mode", mode, "--steps", "20", "--hidden", "8", "--lr", "0.5", "--out", str(tmp_path), *QUIET]
    summary = _load("plain_pytorch").main(argv)
    _check_summary(summary, f"plain_pytorch --mode {mode}")
    if mode == "clip":  # min(1, gamma/||g||): never above gamma, and these gradients start above it
        assert summary["max_grad_norm_after"] <= 0.5 * (1 + 1e-5)
        assert summary["max_grad_norm"] > 0.5
    elif mode == "adaptive":  # gamma/(||g|| + gamma): strictly below gamma
        assert summary["max_grad_norm_after"] < 0.5
    else:  # min(lr, 1/(L0 + L1 ||g||)) with L0 = L1 = 1, lr = 0.5: the lr caps it below ||g|| = 1
        assert 0 < summary["lr_effective"] <= 0.5
    assert "final_loss" in capsys.readouterr().out


def test_fabric_clips(tmp_path: Path, capsys) -> None:
    summary = _load("fabric").main(["--steps", "10", "--hidden", "8", "--max-norm", "0.1", "--out", str(tmp_path),
                                    *QUIET])
    _check_summary(summary, "fabric")
    assert summary["steps"] == 10
    assert summary["max_grad_norm_after"] <= 0.1 * (1 + 1e-5)


# ---------------------------------------------------------------------------------------- LightningCLI
CONFIG = EXAMPLES / "cli_config.yaml"
# main(argv) passes argv to LightningCLI(args=...), which warns that pytest's own sys.argv differs.
_cli_warning = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


@_cli_warning
def test_cli_config_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load("cli")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the YAML's WandbLogger, without files
    summary = module.main(
        ["fit", "--config", str(CONFIG), "--trainer.max_epochs=1", "--data.n=64", "--model.hidden=8"]
    )
    _check_summary(summary, "cli")
    assert summary["l0l1/max_norm"] == 0.5  # from the YAML's init_args
    assert summary["l0l1/steps"] == 2  # 64 samples, batch_size 32 (the YAML's), one epoch
    assert summary["l0l1/grad_norm_scaled"] <= 0.5 * (1 + 1e-5)


@_cli_warning
def test_cli_print_config(capsys) -> None:
    module = _load("cli")
    with pytest.raises(SystemExit) as exc:
        module.main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_l0l1.L0L1Clipping" in out
    assert "mode: clip" in out and "max_norm: 0.5" in out
    assert "class_path: pytorch_lightning.loggers.WandbLogger" in out and "offline: true" in out


@_cli_warning
@pytest.mark.parametrize(
    ("line", "value", "expected"),
    [("mode: clip ", "mode: clipp", "clipp"), ("max_norm: 0.5", "max_norm: abc", "max_norm")],
)
def test_cli_rejects_bad_value(line: str, value: str, expected: str, tmp_path: Path, capsys) -> None:
    text = CONFIG.read_text()
    assert line in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(line, value + " "))
    module = _load("cli")
    with pytest.raises(SystemExit) as exc:
        module.main(["fit", "--config", str(bad)])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error" in err.lower() and expected in err, err[-3000:]


# ---------------------------------------------------------------------------------------- DDP (a subprocess)
@pytest.mark.slow
def test_ddp(tmp_path: Path) -> None:
    import json

    path = _path("ddp")
    env = clean_env(WANDB_MODE="disabled")
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [sys.executable, str(path), "--out", str(out), "--steps", "4", "--accelerator", "cpu", "--no-wandb",
             "--no-progress"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:  # pragma: no cover
        pytest.fail(f"ddp.py timed out after 240 s:\n{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}")
    log = (f"ddp.py exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
           f"--- stderr ---\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, log
    summary = json.loads((out / "ddp_summary.json").read_text())
    table = summary.pop("table")
    _check_summary(summary, "ddp")
    assert summary["world_size"] == 2 and summary["steps"] == 4, log
    assert summary["max_norm_diff_between_ranks"] == 0, log  # the norm is global
    assert summary["max_local_loss_diff_between_ranks"] > 0, log  # the data are not
    assert len(table["norms"]) == 2 and all(len(n) == 4 for n in table["norms"]), (table, log)
    assert "the norm is global" in proc.stdout, log
    metrics = (out / "ddp_csv" / "version_0" / "metrics.csv").read_text()
    assert "l0l1/grad_norm" in metrics.splitlines()[0], (metrics, log)
    assert len([ln for ln in metrics.splitlines()[1:] if ln.strip()]) >= 2, (metrics, log)


# ---------------------------------------------------------------------------------------- Figure 1's line fit
def _nnls_reference(x: list[float], y: list[float]) -> tuple[float, float]:
    """Two-variable non-negative least squares by enumeration: the best feasible of the four active sets."""
    import torch

    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    candidates = [(0.0, 0.0)]
    full = torch.linalg.lstsq(torch.stack([torch.ones_like(xt), xt], 1), yt[:, None]).solution.flatten().tolist()
    candidates.append((full[0], full[1]))
    candidates.append((float(yt.mean()), 0.0))  # L1 = 0
    candidates.append((0.0, float((xt * yt).sum() / (xt * xt).sum())))  # L0 = 0
    feasible = [(a, b) for a, b in candidates if a >= 0 and b >= 0]
    return min(feasible, key=lambda ab: float(((ab[0] + ab[1] * xt - yt) ** 2).sum()))


@pytest.mark.parametrize(
    "line",
    [(0.3, 2.0), (0.0, 1.5), (-0.5, 3.0), (2.0, -0.4)],  # interior, on the L0 = 0 edge, clipped L0, clipped L1
)
def test_figure1_fit_line_is_nonnegative_least_squares(line: tuple[float, float]) -> None:
    import random

    fit_line = _load("figure1").fit_line
    rng = random.Random(0)
    x = [rng.uniform(0.5, 3.0) for _ in range(200)]
    y = [line[0] + line[1] * v + rng.gauss(0, 0.05) for v in x]
    got = fit_line(x, y)
    ref = _nnls_reference(x, y)
    assert got[0] >= 0 and got[1] >= 0
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    if line[0] > 0 and line[1] > 0:
        assert got == pytest.approx(line, abs=0.05)  # and it recovers an exact line through the noise


# ---------------------------------------------------------------------------------------- Figure 1's probe
def test_figure1_probe_measures_curvature_of_the_raw_gradient() -> None:
    """On f(w) = a/2 ||w||^2 the same-batch secant is exactly a, and the norm is the one before clipping."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_l0l1 import L0L1Clipping

    a, lr, gamma = 3.0, 0.1, 0.5

    class Quadratic(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
            self.frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)

        def loss(self, batch):
            return 0.5 * a * (self.w**2).sum() + 0 * batch[0].sum()

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    probe = _load("figure1").SmoothnessProbe()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=5, callbacks=[probe, L0L1Clipping(mode="clip", max_norm=gamma, log_stats=False)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Quadratic(), DataLoader(TensorDataset(torch.zeros(8, 1, dtype=torch.float64)), batch_size=1))
    assert [r["step"] for r in probe.rows] == [0, 1, 2, 3, 4]
    w = torch.full((4,), 2.0, dtype=torch.float64)
    for row in probe.rows:
        g = a * w
        assert row["smoothness"] == pytest.approx(a, rel=1e-9)
        assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-9)  # > gamma: before clipping
        w = w - lr * g * min(1.0, gamma / (float(g.norm()) + 1e-6))  # torch's clip_grad_norm_ rule, by hand
