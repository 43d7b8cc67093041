"""Smoke tests: every benchmark script runs in its quick mode and prints its table (no timing asserted)."""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest

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
        ("bench_step", ["torch clip_grad_norm_", "L0L1 clip", "L0L1 adaptive", "L0L1 l0l1", "L0L1 auto"]),
        ("bench_e2e", ["no clipping", "L0L1 clip"]),
        ("bench_memory", ["torch clip_grad_norm_", "L0L1 clip"]),
        ("bench_cosh", ["L0=1, L1=1"]),
        ("bench_lstm", ["unclipped", "clip=0.5", "auto"]),
        ("bench_stats", ["log_stats=False", "log_stats=True, every step", "log_stats=True, every 50 steps"]),
    ],
)
def test_benchmark_quick_mode_prints_its_table(name, expect, capsys):
    report = _load(name).main(["--quick"])
    assert report.strip() and report in capsys.readouterr().out
    rows = _rows(report)
    labels = [r[0] for r in rows]
    for label in expect:
        assert label in labels, f"{label!r} missing from {name}'s table"
    # every data row has as many cells as the header and some finite number in it
    header = rows[0]
    for r in rows[1:]:
        if r[0] == header[0]:
            continue  # the next table's header
        assert len(r) == len(header)
        numbers = [float(x.replace(",", "")) for x in r[1:] if re.fullmatch(r"-?[\d.,]+(e[-+]?\d+)?", x)]
        assert any(math.isfinite(v) for v in numbers), r


def test_step_benchmark_counts_host_syncs():
    report = _load("bench_step").main(["--quick"])
    rows = {r[0]: r for r in _rows(report) if len(r) >= 5}
    syncs = {name: r[4] for name, r in rows.items()}
    assert syncs["L0L1 clip"] == "0" and syncs["L0L1 auto"] == "0"
    assert syncs["L0L1 clip, nonfinite=skip"] == "1"
