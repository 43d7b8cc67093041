"""Device operations per step do not grow with the number of gradient tensors.

The counter is ``benchmarks/bench_launches.py``'s: non-view aten operations, a ``_foreach`` call over a
tensor that is not dense counted once per tensor (torch's multi-tensor kernels fall back to one launch per
tensor there). It is checked first against calls whose cost is known, then applied to ``auto``'s step,
through :class:`GradientClipper` and through the callback's hook.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from lightning_l0l1 import GradientClipper
from lightning_l0l1.snapshots import SampledSnapshot

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_launches")
    finally:
        sys.path.remove(str(BENCH))


def test_the_counter_counts_a_strided_foreach_per_tensor_and_a_dense_one_once(bench):
    xs = [torch.randn(64, 64) for _ in range(5)]
    dst = [torch.empty(32, 64) for _ in range(5)]
    ops, _ = bench.count(lambda: torch._foreach_copy_(dst, [x[::2] for x in xs]))  # strided rows
    assert ops.ops == 5 and ops.launches == 5
    ops, _ = bench.count(lambda: torch._foreach_copy_(dst, [x[:32] for x in xs]))  # contiguous rows
    assert ops.ops == 1 and ops.launches == 1
    a, b = [torch.empty(4) for _ in range(130)], [torch.ones(4) for _ in range(130)]
    ops, _ = bench.count(lambda: torch._foreach_copy_(a, b))
    assert (ops.ops, ops.launches) == (1, 3)  # 64 tensors per launch for two lists
    strided = [x[::2] for x in xs] * 30
    ops, _ = bench.count(lambda: torch.cat(strided))
    assert (ops.ops, ops.launches) == (1, 3)  # 150 strided inputs: 64 per launch
    ops, _ = bench.count(lambda: torch.empty(3).add_(1).view(3, 1).mul(2))  # the view and `empty` are free
    assert ops.ops == 2


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_auto_issues_as_many_operations_for_100_tensors_as_for_10(bench, monkeypatch, optimizer):
    """At a step that forms a secant pair (the most expensive kind), with every tensor sampled."""

    def ops_at(n: int) -> int:
        _, opt, fill = bench.setup(n, 128, optimizer)  # 16384 elements: sampled, stride 4
        clipper = GradientClipper(mode="auto", nonfinite="propagate")
        for _ in range(4):
            fill()
            clipper.step(opt)
            opt.step()
        fill()
        snap = clipper._states[0].estimator.snapshot
        assert isinstance(snap, SampledSnapshot) and all(s.stride > 1 for s in snap._slots)
        ops, reads = bench.count(lambda: clipper.step(opt))
        assert reads.n == 0
        return ops.ops

    few, many = ops_at(10), ops_at(100)
    assert many <= few  # nothing per tensor
    assert many <= 200


def test_the_sample_is_gathered_by_one_cat_per_side(bench):
    """The runs of every sampled tensor go through one ``cat`` per side and buffer, the rest through one
    dense multi-tensor copy: no operation per tensor."""
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 128), (128,), (521 * 64 + 20,), (256, 256)] * 10
    grads = [torch.randn(s, generator=g) for s in shapes]
    params = [torch.randn(s, generator=g) for s in shapes]
    snap = SampledSnapshot()
    snap.take(grads, params, torch.tensor(1.0), step=0)
    ops, _ = bench.count(lambda: snap.take(grads, params, torch.tensor(1.0), step=1))
    assert ops.by_name.get("cat") == 2 and ops.by_name.get("_foreach_copy_") == 1
    ops, _ = bench.count(lambda: snap.difference_norms(grads, params, 2.0))
    assert ops.by_name.get("cat") == 2 and ops.by_name.get("_foreach_copy_") == 1
    assert ops.ops <= 16  # the gather, the difference, the norms, and the weights when the blocks kept change


def test_through_the_callback_the_count_does_not_grow(bench):
    few = bench._through_callback(10, 128, 4)[0].ops
    many = bench._through_callback(60, 128, 4)[0].ops
    assert many <= few <= 200


@pytest.mark.parametrize(
    ("name", "propagate", "skip"),
    [
        ("SGD (foreach)", 0, 1),
        ("SGD momentum 0.9 (foreach)", 0, 1),
        # torch's foreach path takes the learning rate only as a Python float: auto's factor is read
        ("AdamW (foreach, CUDA's default)", 1, 2),
        # the scale and the skip verdict go to the fused kernel
        ("AdamW (fused=True)", 0, 0),
    ],
)
def test_host_reads_per_step_by_optimizer(bench, name, propagate, skip):
    make = bench.SYNC_OPTIMIZERS[name]
    assert bench.host_reads(make, "propagate", n=3, size=96, steps=3) == propagate
    assert bench.host_reads(make, "skip", n=3, size=96, steps=3) == skip
