"""Smoke tests: every benchmark script runs in its quick mode and prints its table (no timing asserted)."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _rows(report: str) -> list[list[str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("bench_step", ["torch clip_grad_norm_", "L0L1 clip", "L0L1 adaptive", "L0L1 l0l1",
                        "L0L1 auto (sampled snapshot)", "L0L1 auto, full snapshot"]),
        ("bench_e2e", ["no clipping", "L0L1 clip"]),
        ("bench_memory", ["torch clip_grad_norm_", "L0L1 clip"]),
        ("bench_cosh", ["L0=1, L1=1"]),
        ("bench_lstm", ["unclipped", "clip=0.5", "auto"]),
        ("bench_stats", ["log_stats=False", "log_stats=True, every step", "log_stats=True, every 50 steps"]),
        ("bench_launches", ["torch clip_grad_norm_", "auto", "auto, through L0L1Clipping", "AdamW (fused=True)"]),
        ("bench_gpu", ["torch clip_grad_norm_", "L0L1 clip", "L0L1 auto"]),
        ("bench_layer_norms", ["clip", "clip, layer_norms='module'", "clip, layer_norms='parameter'",
                               "clip + Lightning grad_norm() every step"]),
    ],
)
def test_benchmark_quick_mode_prints_its_table(name, expect, capsys):
    report = _load(name).main(["--quick"])
    assert report.strip() and report in capsys.readouterr().out
    rows = _rows(report)
    labels = [r[0] for r in rows]
    for label in expect:
        assert label in labels, f"{label!r} missing from {name}'s table"
    # every data row has as many cells as its table's header and some finite number in it
    lines = report.splitlines()
    headers = {i - 1 for i, ln in enumerate(lines) if ln.startswith("|---")}  # the line above a separator
    header: list[str] = []
    for i, ln in enumerate(lines):
        if not ln.startswith("|") or ln.startswith("|---"):
            continue
        r = [c.strip() for c in ln.strip("|").split("|")]
        if i in headers:
            header = r
            continue
        assert len(r) == len(header)
        numbers = [float(x.replace(",", "")) for x in r[1:] if re.fullmatch(r"-?[\d.,]+(e[-+]?\d+)?", x)]
        assert any(math.isfinite(v) for v in numbers), r


def test_step_benchmark_counts_host_syncs():
    report = _load("bench_step").main(["--quick"])
    rows = {r[0]: r for r in _rows(report) if len(r) >= 5}
    syncs = {name: r[4] for name, r in rows.items()}
    assert syncs["L0L1 clip"] == "0"
    assert syncs["L0L1 auto (sampled snapshot)"] == "0" == syncs["L0L1 auto, full snapshot"]
    assert syncs["L0L1 clip, nonfinite=skip"] == "1"
    # a host read is what the tests count (tests/_sync.py): a scalar read, a transfer, a CUDA-syncing kernel
    with _load("_common").OpCounter() as counter:
        torch.ones(()).item()
        torch.ones(3).tolist()
        torch.ones(3).nonzero()
    assert (counter.syncs, counter.scalar, counter.transfers, counter.kernel_syncs) == (3, 1, 1, 1)


def test_lstm_learning_rate_sweep_prints_one_row_per_learning_rate(capsys):
    report = _load("bench_lstm").main(["--quick", "--lrs", "5,20"])
    rows = _rows(report)
    summary = [r for r in rows if r[0] in ("5", "20") and len(r) == 7]
    every = [r for r in rows if r[0] in ("5", "20") and len(r) == 3]  # lr, the quick grid's one threshold, auto
    assert [r[0] for r in summary] == ["5", "20"] and [r[0] for r in every] == ["5", "20"]
    for s, e in zip(summary, every):
        # the best threshold's loss is the starred cell of the full table, and auto / best is their ratio
        assert e[1].endswith("*") and float(e[1].rstrip(" *")) == float(s[3])
        assert float(s[5]) == pytest.approx(float(s[4]) / float(s[3]), abs=5e-4)
    with pytest.raises(SystemExit):
        _load("bench_lstm").main(["--quick", "--lrs", "5,-1"])
    assert "positive learning rates" in capsys.readouterr().err


def test_gpt_benchmark_prints_one_row_per_learning_rate_and_reuses_its_cache(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "gpt.json"
    report = _load("bench_gpt").main(["--quick", "--lrs", "1e-3,1e-2", "--json", str(cache)])
    rows = _rows(report)
    summary = [r for r in rows if r[0] in ("0.001", "0.01") and len(r) == 11]
    every = [r for r in rows if r[0] in ("0.001", "0.01") and len(r) == 4]  # lr, unclipped, clip=0.5, auto
    assert [r[0] for r in summary] == ["0.001", "0.01"] and [r[0] for r in every] == ["0.001", "0.01", "0.001", "0.01"]
    for s, e in zip(summary, every[:2]):
        # the best threshold's loss is the starred cell of the full table, and auto / best is their ratio
        assert e[2].endswith("*") and float(e[2].rstrip(" *")) == float(s[3])
        assert float(s[5]) == pytest.approx(float(s[4]) / float(s[3]), abs=5e-4)
        assert s[8:] == ["-", "-", "-"]  # the peers are not part of the quick run
    data = json.loads(cache.read_text())
    assert data["torch"] == torch.__version__ and len(data["runs"]) == 6
    assert all(len(r["first10"]) == 10 and r["seconds"] >= 0 for r in data["runs"])
    capsys.readouterr()
    # --reuse runs only auto again (the one configuration that depends on this package), with the same result
    again = _load("bench_gpt").main(["--quick", "--lrs", "1e-3,1e-2", "--json", str(cache), "--reuse"])
    out = capsys.readouterr().out
    assert out.count("(cached)") == 4 and again.splitlines()[3:] == report.splitlines()[3:]
    ran = [ln for ln in out.splitlines() if ln.startswith("lr ") and "(cached)" not in ln]
    assert len(ran) == 2 and all(ln.split()[4] == "auto:" for ln in ran)
    # a cache from another torch is refused
    cache.write_text(json.dumps({**data, "torch": "0.0"}))
    with pytest.raises(SystemExit, match=r"torch 0\.0"):
        _load("bench_gpt").main(["--quick", "--json", str(cache), "--reuse"])
    # a peer that is not installed gives "not installed" cells, not an error
    for name in ("zclip", "smartclip"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    report = _load("bench_gpt").main(["--quick", "--configs", "unclipped,clip=0.5,zclip,autoclip,agc"])
    summary = [r for r in _rows(report) if r[0] == "0.003" and len(r) == 11]
    assert summary and summary[0][8:] == ["not installed"] * 3
    with pytest.raises(SystemExit):
        _load("bench_gpt").main(["--quick", "--configs", "auto,zclip"])  # no threshold to compare with
