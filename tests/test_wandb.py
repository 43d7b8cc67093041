"""The W&B streaming of the statistics, read back from the offline run's transaction log.

wandb 0.31 writes no ``wandb-summary.json`` offline: everything lands in
``WANDB_DIR/wandb/offline-run-*/run-<id>.wandb``, a LevelDB-style log that :func:`read_wandb_run`
parses here without any wandb reader: a 7-byte header (``:W&B``, ``0xBEE1``, version 0), then
32 KiB blocks of chunks ``crc32(4) | length(2) | type(1) | payload`` (full=1, first=2, middle=3,
last=4; the CRC is zlib's crc32 of the type byte and the payload), every record a
``wandb_internal_pb2.Record``. Tables are JSON files under the run's ``files/media/table/``.

The references are independent of W&B: the rows the callback writes through a ``CSVLogger`` in
the same run, and per-step values recorded by small callbacks around ``L0L1Clipping`` (the raw
global norm computed here in float64 before the callback scales the gradients, the scaled norm
after it, and ``cb.latest()``).

wandb reads the ``WANDB_*`` variables once per process, so every run sets them, and finishes
and tears wandb down at the end. One training run is shared by the history, axis, config,
summary, table and histogram tests (module-scoped fixture).
"""

from __future__ import annotations

import builtins
import csv
import glob
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from _models import Recorder, Regressor, loader, make_data, make_net, trainer
from pytorch_lightning.loggers import CSVLogger

from lightning_l0l1 import L0L1Clipping

wandb = pytest.importorskip("wandb")
from pytorch_lightning.loggers import WandbLogger  # noqa: E402
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "wandb_scripts"
STEP_KEY = "trainer/global_step"
P = "l0l1/"
MAX_NORM = 45.0  # the tiny model's norms are ~30..90: some steps are clipped, some not
LR = 0.05
INTERVAL = 4
EPOCHS = 3
STEPS_PER_EPOCH = 6  # 48 samples, batch 8
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
STAT_KEYS = (
    "grad_norm",
    "grad_norm_max",
    "grad_norm_min",
    "grad_norm_scaled",
    "scale",
    "clip_rate",
    "max_norm",
    "lr_effective",
    "nonfinite_steps",
)
EST_KEYS = ("smoothness", "L0", "L1")
BLOB = "".join(f"{i:06d}" for i in range(12_000))  # 72 kB

# ---------------------------------------------------------------------------- the .wandb reader

_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes, chunk_types: Optional[list[int]] = None) -> Iterator[bytes]:
    """The records of a LevelDB-style log; a torn tail (a crash mid-write) ends the iteration."""
    if data[:4] != b":W&B":
        raise ValueError(f"not a W&B transaction log (starts with {data[:8]!r})")
    magic, version = struct.unpack("<HB", data[4:7])
    if (magic, version) != (0xBEE1, 0):
        raise ValueError(f"unknown W&B log header: magic {magic:#x}, version {version}")
    pos, parts = 7, None
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # the block's trailer is zero padding
            pos += left
            continue
        if pos + _CHUNK_HEADER > len(data):
            return
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if kind == 0 and length == 0 and crc == 0:  # zero padding (preallocated or end of block)
            if not any(data[pos : pos + left]):
                pos += left
                continue
        payload = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        if len(payload) < length:
            return  # torn write at the end of the file
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"CRC mismatch in the chunk at offset {pos}")
        pos += _CHUNK_HEADER + length
        if chunk_types is not None:
            chunk_types.append(kind)
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            parts = [payload]
        elif kind == _MIDDLE and parts is not None:
            parts.append(payload)
        elif kind == _LAST and parts is not None:
            parts.append(payload)
            yield b"".join(parts)
            parts = None
        else:
            raise ValueError(f"bad chunk type {kind} at offset {pos}")


def _path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _put(d: dict[str, Any], path: list[str], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    return None


@dataclass
class WandbRunLog:
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary_updates: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # the updates replayed in order
    metrics: list[dict[str, Any]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    run_dir: Optional[Path] = None

    def rows(self, key: str) -> list[dict[str, Any]]:
        return [r for r in self.history if key in r]


def read_wandb_run(run_dir: os.PathLike) -> WandbRunLog:
    """Parse ``run_dir/run-*.wandb``: history rows, config, summary updates, ``define_metric`` records."""
    from google.protobuf.json_format import MessageToDict

    files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    assert len(files) == 1, f"expected one run-*.wandb in {run_dir}, found {files}"
    out = WandbRunLog(run_dir=Path(run_dir))
    for payload in _payloads(Path(files[0]).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        out.kinds.append(kind or "")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(row, _path(item), _item_value(item))
            out.history.append(row)
        elif kind == "config":
            for item in rec.config.update:
                _put(out.config, _path(item), _item_value(item))
        elif kind == "summary":
            upd: dict[str, Any] = {}
            for item in rec.summary.update:
                _put(upd, _path(item), _item_value(item))
                _put(out.summary, _path(item), _item_value(item))
            out.summary_updates.append(upd)
        elif kind == "metric":
            out.metrics.append(MessageToDict(rec.metric, preserving_proto_field_name=True))
    return out


def find_run_dir(root: os.PathLike) -> Path:
    dirs = glob.glob(os.path.join(root, "wandb", "offline-run-*"))
    assert len(dirs) == 1, f"expected one offline run under {root}, found {dirs}"
    return Path(dirs[0])


def read_csv_rows(save_dir: os.PathLike) -> list[dict[str, float]]:
    (path,) = glob.glob(os.path.join(save_dir, "**", "metrics.csv"), recursive=True)
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


# ---------------------------------------------------------------------------- W&B isolation


def _set_wandb_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    wandb.finish()
    wandb.teardown()  # forget the settings of any earlier run: the next one re-reads WANDB_*
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", "1")
    mp.delenv("WANDB_RUN_ID", raising=False)
    mp.delenv("WANDB_RESUME", raising=False)


def _close_wandb() -> None:
    wandb.finish()
    wandb.teardown()  # finish() can return before the transaction log is complete


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    _set_wandb_env(monkeypatch, tmp_path)
    try:
        yield tmp_path
    finally:
        _close_wandb()


# ---------------------------------------------------------------------------- per-step references


def _interval_reference(raw: Recorder, after: Recorder, ends: list[int]) -> dict[int, dict[str, float]]:
    """What the row logged at each step of ``ends`` must hold, from the per-step records alone."""
    out: dict[int, dict[str, float]] = {}
    start = 0
    for end in ends:
        idx = [i for i, s in enumerate(raw.global_steps) if start <= s < end]
        assert idx, (start, end)
        norms = [raw.norms[i] for i in idx]
        scaled = [after.norms[i] for i in idx]
        scales = [min(1.0, MAX_NORM / n) for n in norms]
        last = after.latest[idx[-1]]
        out[end] = {
            "grad_norm": sum(norms) / len(norms),
            "grad_norm_max": max(norms),
            "grad_norm_min": min(norms),
            "grad_norm_scaled": sum(scaled) / len(scaled),
            "scale": sum(scales) / len(scales),
            "clip_rate": sum(n > MAX_NORM for n in norms) / len(norms),
            "max_norm": MAX_NORM,
            "lr_effective": LR * sum(scales) / len(scales),
            "nonfinite_steps": 0.0,
            "smoothness": last[P + "smoothness"],
            "L0": last[P + "L0"],
            "L1": last[P + "L1"],
        }
        start = end
    return out


# ---------------------------------------------------------------------------- the shared run


@dataclass
class SharedRun:
    log: WandbRunLog
    csv_rows: list[dict[str, float]]
    cb: L0L1Clipping
    raw: Recorder
    after: Recorder
    final_latest: dict[str, float]
    caught: list[warnings.WarningMessage]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRun]:
    root = tmp_path_factory.mktemp("wandb_shared")
    with pytest.MonkeyPatch.context() as mp:
        _set_wandb_env(mp, root)
        try:
            torch.manual_seed(0)
            cb = L0L1Clipping(
                mode="clip", max_norm=MAX_NORM, estimate=True, log_every_n_steps=INTERVAL, wandb_table_every=1
            )
            raw, after = Recorder(), Recorder(cb)
            loggers = [WandbLogger(project="l0l1-test", save_dir=str(root)), CSVLogger(str(root / "csv"))]
            tr = trainer(logger=loggers, callbacks=[raw, cb, after], max_epochs=EPOCHS)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tr.fit(Regressor(make_net(), lr=LR), loader(make_data()))
            final_latest = cb.latest()
            loggers[0].experiment.log({"blob": BLOB})  # one record over two 32 KiB blocks
        finally:
            _close_wandb()
        yield SharedRun(
            log=read_wandb_run(find_run_dir(root)),
            csv_rows=read_csv_rows(root / "csv"),
            cb=cb,
            raw=raw,
            after=after,
            final_latest=final_latest,
            caught=list(caught),
        )


def _close(a: float, b: float, rel: float = 1e-6, abs_: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _l0l1_rows(log: WandbRunLog) -> list[dict[str, Any]]:
    """The interval rows (not the table / histogram rows)."""
    return [r for r in log.history if P + "grad_norm" in r]


EXPECTED_ENDS = [*range(INTERVAL, TOTAL_STEPS + 1, INTERVAL), TOTAL_STEPS]  # the rest is flushed at the end
if EXPECTED_ENDS[-1] == EXPECTED_ENDS[-2]:
    EXPECTED_ENDS.pop()
#: the steps the rows are logged at: Lightning's step axis, where the batch that completes optimizer
#: step e logs at e - 1 (the module's own ``self.log`` rows are there too)
EXPECTED_LABELS = [e - 1 for e in EXPECTED_ENDS]


# ---------------------------------------------------------------------------- reader self-checks


def test_reader_rejects_a_corrupted_chunk(shared: SharedRun, tmp_path: Path) -> None:
    (src,) = glob.glob(str(shared.log.run_dir / "run-*.wandb"))
    data = bytearray(Path(src).read_bytes())
    assert len(list(_payloads(bytes(data)))) == len(shared.log.kinds) > 10
    data[7 + _CHUNK_HEADER + 3] ^= 0xFF  # inside the first record's payload
    (tmp_path / "run-x.wandb").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_wandb_run(tmp_path)


def test_reader_reassembles_records_split_across_blocks(shared: SharedRun) -> None:
    (src,) = glob.glob(str(shared.log.run_dir / "run-*.wandb"))
    kinds: list[int] = []
    n = len(list(_payloads(Path(src).read_bytes(), kinds)))
    assert n == len(shared.log.kinds)
    assert kinds.count(_FIRST) >= 1 and kinds.count(_MIDDLE) >= 1 and kinds.count(_LAST) == kinds.count(_FIRST)
    (blob,) = shared.log.rows("blob")
    assert blob["blob"] == BLOB
    # every record was decoded, the run is complete
    assert "" not in shared.log.kinds
    assert shared.log.kinds[0] == "header" and "exit" in shared.log.kinds


# ---------------------------------------------------------------------------- history


def test_history_rows_at_the_interval_with_every_key(shared: SharedRun) -> None:
    rows = _l0l1_rows(shared.log)
    assert [r[STEP_KEY] for r in rows] == EXPECTED_LABELS
    for r in rows:
        missing = [k for k in (*STAT_KEYS, *EST_KEYS) if P + k not in r]
        assert not missing, (r[STEP_KEY], missing)
        assert all(isinstance(r[P + k], (int, float)) and math.isfinite(r[P + k]) for k in (*STAT_KEYS, *EST_KEYS))


def test_history_equals_the_csv_rows_of_the_same_run(shared: SharedRun) -> None:
    rows = _l0l1_rows(shared.log)
    csv_rows = shared.csv_rows
    assert [int(r["step"]) for r in csv_rows] == [r[STEP_KEY] for r in rows] == EXPECTED_LABELS
    for w, c in zip(rows, csv_rows):
        csv_keys = {k for k in c if k.startswith(P)}
        wb_keys = {k for k in w if k.startswith(P)}
        assert csv_keys == wb_keys, (w[STEP_KEY], csv_keys ^ wb_keys)
        for k in csv_keys:
            assert _close(w[k], c[k]), (w[STEP_KEY], k, w[k], c[k])


def test_history_equals_the_per_step_reference(shared: SharedRun) -> None:
    rows = _l0l1_rows(shared.log)
    raw, after = shared.raw, shared.after
    assert raw.global_steps == list(range(TOTAL_STEPS))
    # the recorders sit on both sides of the callback (the order Lightning calls them in)
    for n, lat in zip(raw.norms, after.latest):
        assert _close(lat[P + "grad_norm"], n, rel=1e-5)
    clipped = [n > MAX_NORM for n in raw.norms]
    assert any(clipped) and not all(clipped), "the test needs clipped and unclipped steps"
    ref = _interval_reference(raw, after, EXPECTED_ENDS)
    for r in rows:
        exp = ref[r[STEP_KEY] + 1]
        for k, v in exp.items():
            assert _close(r[P + k], v, rel=1e-5, abs_=1e-9), (r[STEP_KEY], k, r[P + k], v)
    # the interval extremes are not the mean: the test can tell them apart
    assert any(r[P + "grad_norm_max"] > r[P + "grad_norm"] * (1 + 1e-3) for r in rows)


# ---------------------------------------------------------------------------- axes, config, summary


def test_define_metric_uses_the_trainer_step_as_the_x_axis(shared: SharedRun) -> None:
    metrics = shared.log.metrics
    assert any(m.get("name") == STEP_KEY for m in metrics)
    ours = [m for m in metrics if m.get("glob_name") == P + "*"]
    assert ours, metrics
    assert all(m.get("step_metric") == STEP_KEY for m in ours)


def test_config_holds_the_callback_settings(shared: SharedRun) -> None:
    cfg = shared.log.config.get("l0l1")
    assert isinstance(cfg, dict), shared.log.config.keys()
    cb = shared.cb
    assert cfg["mode"] == "clip" and cfg["max_norm"] == MAX_NORM
    assert cfg["estimate"] is True and cfg["log_every_n_steps"] == INTERVAL
    assert cfg["l0"] is None and cfg["l1"] is None and cfg["nonfinite"] == cb.nonfinite
    assert cfg["norm_type"] == cb.norm_type and cfg["estimate_every"] == cb.estimate_every


def test_summary_holds_the_final_statistics(shared: SharedRun) -> None:
    summary, latest = shared.log.summary, shared.final_latest
    assert latest[P + "steps"] == TOTAL_STEPS
    # the run-level clip rate differs from the last interval's: the summary must hold the run's
    ref_clip = sum(n > MAX_NORM for n in shared.raw.norms) / TOTAL_STEPS
    assert _close(latest[P + "clip_rate"], ref_clip)
    for k in ("L0", "L1", "max_norm", "clip_rate", "nonfinite_steps", "steps"):
        assert P + k in summary, (k, sorted(summary))
        assert _close(float(summary[P + k]), latest[P + k], rel=1e-6), (k, summary[P + k], latest[P + k])
    # ...written by the callback at the end, not left over from the last history row: `steps` is in no
    # row, and the last interval's clip rate is not the run's
    assert not any(P + "steps" in r for r in shared.log.history)
    last_row = _l0l1_rows(shared.log)[-1]
    assert not _close(last_row[P + "clip_rate"], latest[P + "clip_rate"])
    last_update = max(i for i, u in enumerate(shared.log.summary_updates) if P + "clip_rate" in u)
    assert _close(shared.log.summary_updates[last_update][P + "clip_rate"], latest[P + "clip_rate"])


# ---------------------------------------------------------------------------- Figure 1


def _table_file(log: WandbRunLog, ref: dict[str, Any]) -> dict[str, Any]:
    assert ref.get("_type") == "table-file", ref
    path = log.run_dir / "files" / ref["path"]
    assert path.is_file(), path
    return json.loads(path.read_text())


def test_figure1_table_is_consistent_with_the_history(shared: SharedRun) -> None:
    log = shared.log
    table_rows = log.rows(P + "smoothness_table")
    assert len(table_rows) >= 2  # the first interval (table_every=1) and the final refresh
    final = _table_file(log, log.summary[P + "smoothness_table"])
    assert final["columns"] == ["step", "grad_norm", "smoothness", "log10_grad_norm", "log10_smoothness"]
    data = final["data"]
    by_step = {r[STEP_KEY]: r for r in _l0l1_rows(log)}
    steps = [row[0] for row in data]
    norm_at = dict(zip(shared.raw.global_steps, shared.raw.norms))
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert [int(s) for s in steps] == EXPECTED_LABELS  # every interval has a finite, positive smoothness
    for step, g, sm, lg, lsm in data:
        assert _close(lg, math.log10(g), rel=1e-12) and _close(lsm, math.log10(sm), rel=1e-12)
        # the paper's pairs: the last secant of the interval with the norm it belongs to, the
        # logarithmic mean of the raw norms at its two ends (the last two optimizer steps of the interval,
        # whose last is logged at ``step``)
        a, b = norm_at[int(step) - 1], norm_at[int(step)]
        ref = a if a == b else (a - b) / (math.log(a) - math.log(b))
        assert _close(g, ref, rel=1e-5), step
        assert _close(sm, by_step[int(step)][P + "smoothness"]), step
    # every table the history refers to exists and is a prefix of the final one
    for r in table_rows:
        t = _table_file(log, r[P + "smoothness_table"])
        assert t["columns"] == final["columns"] and t["data"] == data[: len(t["data"])]
        assert t["data"] and int(t["data"][-1][0]) == r[STEP_KEY]


def test_figure1_scatter_plot_is_logged(shared: SharedRun) -> None:
    log = shared.log
    rows = log.rows(P + "figure1_table")
    assert rows and all(r[P + "figure1_table"].get("_type") == "table-file" for r in rows)
    panel = log.config["_wandb"]["visualize"][P + "figure1"]
    panel = json.loads(panel) if isinstance(panel, str) else panel
    cfg = panel["panel_config"]
    assert cfg["panelDefId"] == "wandb/scatter/v0"
    assert cfg["fieldSettings"] == {"x": "log10_grad_norm", "y": "log10_smoothness"}
    # the scatter's own table holds the same data as the smoothness table of the same row
    for r in rows:
        assert _table_file(log, r[P + "figure1_table"])["data"] == _table_file(log, r[P + "smoothness_table"])["data"]


# ---------------------------------------------------------------------------- histogram


def test_one_histogram_per_epoch(shared: SharedRun) -> None:
    rows = shared.log.rows(P + "grad_norm_hist")
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert [r[STEP_KEY] for r in rows] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    for r in rows:
        h = r[P + "grad_norm_hist"]
        assert h["_type"] == "histogram"
        norms = [n for e, n in zip(shared.raw.epochs, shared.raw.norms) if e == r["epoch"]]
        assert sum(h["values"]) == len(norms) == STEPS_PER_EPOCH
        assert _close(h["bins"][0], min(norms), rel=1e-5) and _close(h["bins"][-1], max(norms), rel=1e-5)


def test_no_warning_in_the_shared_run(shared: SharedRun) -> None:
    ours = [w for w in shared.caught if "L0L1Clipping" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]


# ---------------------------------------------------------------------------- resilience


def _fit(cb: L0L1Clipping, loggers: list[Any], epochs: int = 2) -> tuple[pl.Trainer, list[warnings.WarningMessage]]:
    tr = trainer(logger=loggers, callbacks=[cb], max_epochs=epochs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Regressor(make_net(), lr=LR), loader(make_data()))
    return tr, [w for w in caught if issubclass(w.category, RuntimeWarning) and "L0L1Clipping" in str(w.message)]


def _csv_steps(root: Path) -> list[int]:
    return [int(r["step"]) for r in read_csv_rows(root) if P + "grad_norm" in r]


def test_wandb_log_raising_warns_once_and_training_goes_on(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wl = WandbLogger(project="l0l1-test", save_dir=str(wandb_env))
    run = wl.experiment
    calls = []

    def broken_log(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise ConnectionError("W&B is down")

    monkeypatch.setattr(run, "log", broken_log)
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, estimate=True, log_every_n_steps=2, wandb_table_every=1)
    tr, ours = _fit(cb, [wl, CSVLogger(str(wandb_env / "csv"))])
    assert tr.global_step == 2 * STEPS_PER_EPOCH and calls
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "W&B is down" in str(ours[0].message) and "ConnectionError" in str(ours[0].message)
    assert _csv_steps(wandb_env / "csv") == list(range(1, 2 * STEPS_PER_EPOCH, 2))


def test_wandb_not_importable_without_a_wandb_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError):
        import wandb as _  # noqa: F401
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=3)
    tr, ours = _fit(cb, [CSVLogger(str(tmp_path))])
    assert tr.global_step == 2 * STEPS_PER_EPOCH and not ours
    assert cb.publisher.sinks(tr.loggers)[1] is None
    assert _csv_steps(tmp_path) == [2, 5, 8, 11]


def test_wandb_import_failing_in_the_sink_warns_once(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__
    refused = []

    def no_wandb_in_publish(name: str, globals: Any = None, *args: Any, **kwargs: Any) -> Any:
        if name == "wandb" and (globals or {}).get("__name__") == "lightning_l0l1.publish":
            refused.append(name)
            raise ImportError("No module named 'wandb' (simulated)")
        return real_import(name, globals, *args, **kwargs)

    wl = WandbLogger(project="l0l1-test", save_dir=str(wandb_env))
    monkeypatch.setattr(builtins, "__import__", no_wandb_in_publish)
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=3)
    tr, ours = _fit(cb, [wl, CSVLogger(str(wandb_env / "csv"))])
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert tr.global_step == 2 * STEPS_PER_EPOCH and refused
    assert len(ours) == 1 and "ImportError" in str(ours[0].message), [str(w.message) for w in ours]
    assert _csv_steps(wandb_env / "csv") == [2, 5, 8, 11]
    _close_wandb()
    log = read_wandb_run(find_run_dir(wandb_env))
    # the WandbLogger still carries the rows; what only the sink adds is missing
    assert [r[STEP_KEY] for r in _l0l1_rows(log)] == [2, 5, 8, 11]
    assert not log.rows(P + "grad_norm_hist") and "l0l1" not in log.config


def test_active_wandb_run_without_a_wandb_logger(wandb_env: Path) -> None:
    run = wandb.init(project="l0l1-test", mode="offline", dir=str(wandb_env))
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, estimate=True, log_every_n_steps=3, wandb_table_every=1)
    tr, ours = _fit(cb, [CSVLogger(str(wandb_env / "csv"))])
    assert not ours, [str(w.message) for w in ours]
    assert wandb.run is run and tr.global_step == 2 * STEPS_PER_EPOCH
    final_latest = cb.latest()
    _close_wandb()
    log = read_wandb_run(find_run_dir(wandb_env))
    rows = _l0l1_rows(log)
    csv_rows = [r for r in read_csv_rows(wandb_env / "csv") if P + "grad_norm" in r]
    assert [r[STEP_KEY] for r in rows] == [int(r["step"]) for r in csv_rows] == [2, 5, 8, 11]
    for w, c in zip(rows, csv_rows):
        assert {k for k in w if k.startswith(P)} == {k for k in c if k.startswith(P)}
        assert all(_close(w[k], c[k]) for k in c if k.startswith(P))
    assert any(m.get("glob_name") == P + "*" and m.get("step_metric") == STEP_KEY for m in log.metrics)
    assert log.config["l0l1"]["mode"] == "clip"
    assert [r["epoch"] for r in log.rows(P + "grad_norm_hist")] == [0, 1]
    assert log.rows(P + "smoothness_table")
    assert _close(float(log.summary[P + "L1"]), final_latest[P + "L1"])
    assert _close(float(log.summary[P + "clip_rate"]), final_latest[P + "clip_rate"])


def test_a_wandb_logger_subclass_is_recognised(wandb_env: Path) -> None:
    """A subclass is a WandbLogger too: the sink must not log every row a second time to its run."""

    class MyWandbLogger(WandbLogger):
        pass

    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=3)
    _, ours = _fit(cb, [MyWandbLogger(project="l0l1-test", save_dir=str(wandb_env))], epochs=1)
    assert not ours
    _close_wandb()
    log = read_wandb_run(find_run_dir(wandb_env))
    assert [r[STEP_KEY] for r in _l0l1_rows(log)] == [2, 5]
    assert log.config["l0l1"]["mode"] == "clip" and log.rows(P + "grad_norm_hist")


def test_a_wandb_logger_prefix_gets_the_trainer_step_axis_too(wandb_env: Path) -> None:
    """``WandbLogger(prefix="train")`` logs ``train-l0l1/...``: those keys need the step axis declared."""
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=3)
    _, ours = _fit(cb, [WandbLogger(project="l0l1-test", save_dir=str(wandb_env), prefix="train")], epochs=1)
    assert not ours
    _close_wandb()
    log = read_wandb_run(find_run_dir(wandb_env))
    outer = "train-" + P
    assert [r[STEP_KEY] for r in log.rows(outer + "grad_norm")] == [2, 5]
    axes = {m.get("glob_name"): m.get("step_metric") for m in log.metrics if m.get("glob_name")}
    assert axes.get(outer + "*") == STEP_KEY, axes
    assert axes.get(P + "*") == STEP_KEY, axes  # the sink's own rows (histogram, table) keep theirs
    assert log.rows(P + "grad_norm_hist")


def test_a_reused_callback_publishes_to_the_new_trainers_loggers(tmp_path: Path) -> None:
    """The sinks are found per fit: a second ``fit`` must not write to the first trainer's loggers."""
    cb = L0L1Clipping(mode="clip", max_norm=MAX_NORM, log_every_n_steps=3)
    for name in ("first", "second"):
        _, ours = _fit(cb, [CSVLogger(str(tmp_path), name=name)], epochs=1)
        assert not ours
        assert _csv_steps(tmp_path / name) == [2, 5], name
    assert _csv_steps(tmp_path / "first") == [2, 5]  # nothing more was appended to the first run


# ---------------------------------------------------------------------------- crash


def test_rows_logged_before_a_crash_are_in_the_transaction_log(tmp_path: Path) -> None:
    """The rows are streamed while training, not kept for the end: a process that dies mid-run
    (``os._exit(1)`` from a callback, after the transaction log's flush) leaves them on disk."""
    crash_at = 5
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path),
        WANDB_SILENT="true",
        WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, str(SCRIPTS / "crash_train.py"), str(tmp_path), str(crash_at)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 1, text[-3000:]
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert [s["global_step"] for s in steps] == list(range(1, crash_at + 1)), text[-3000:]

    run_dir = find_run_dir(tmp_path)
    deadline = time.monotonic() + 30  # wandb-core may still be writing after its parent died
    while True:
        try:
            log = read_wandb_run(run_dir)
        except ValueError:  # not even the header written yet
            if time.monotonic() > deadline:
                raise
        else:
            rows = _l0l1_rows(log)
            if len(rows) >= crash_at or time.monotonic() > deadline:
                break
        time.sleep(0.5)
    try:  # the service process lives in the session we started: end it if it lingers
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    assert "exit" not in log.kinds, "the run must not have been finished"
    assert [r[STEP_KEY] for r in rows] == list(range(crash_at)), [r.get(STEP_KEY) for r in log.history]
    for r, s in zip(rows, steps):  # one step per interval: the row is that step's batch
        assert r[STEP_KEY] == s["global_step"] - 1
        for k in ("grad_norm", "grad_norm_scaled", "scale", "lr_effective", "max_norm"):
            assert _close(r[P + k], s[P + k], rel=1e-6), (s["global_step"], k)
        assert r[P + "grad_norm_max"] == r[P + "grad_norm_min"] == r[P + "grad_norm"]
        assert r[P + "clip_rate"] == float(s[P + "grad_norm"] > 45.0)
