"""The estimator's sampled snapshot against exact references.

* the estimate of a difference's norm equals a reference built independently from the sampled
  positions (index arithmetic on a float64 copy, not the snapshot's views), for every tensor size
  class: whole (small), blocks only, blocks and a tail;
* over all offsets the estimate of ``||x||_p^p`` averages to the exact value (closed form);
* small tensors are kept whole: the sampled and full snapshots give the same run (to float32 rounding);
* on a large random difference the estimate is within a few percent of the exact norm, and the
  buffers hold about ``2 / SAMPLE_STRIDE`` of the gradient bytes;
* determinism (same seed, same trajectory) and exact resume with sampling active, and what happens
  to a checkpoint of the other kind;
* the settings: validation, defaults, and the probe/offload combinations.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_l0l1 import snapshots
from lightning_l0l1.clipper import GradientClipper
from lightning_l0l1.snapshots import (
    SAMPLE_BLOCK,
    SAMPLE_MIN_BLOCKS,
    SAMPLE_STRIDE,
    FullSnapshot,
    SampledSnapshot,
    sample_offset,
)


def stride_of(numel: int) -> int:
    """The documented per-tensor stride: ``min(SAMPLE_STRIDE, nb // SAMPLE_MIN_BLOCKS)`` (<= 1: whole)."""
    return max(1, min(SAMPLE_STRIDE, numel // SAMPLE_BLOCK // SAMPLE_MIN_BLOCKS))


def reference_estimate(prev: list[torch.Tensor], cur: list[torch.Tensor], seed: int, step: int, p: float) -> float:
    """The estimate of ||prev - cur||_p from the sampled positions, by index arithmetic in float64."""
    total = 0.0
    biggest = 0.0
    for i, (a, b) in enumerate(zip(prev, cur)):
        d = (a.double() - b.double()).reshape(-1)
        n = d.numel()
        if n == 0:
            continue
        nb, r = n // SAMPLE_BLOCK, stride_of(n)
        if r == 1:
            idx, w = torch.arange(n), torch.ones(n, dtype=torch.float64)
        else:
            starts = torch.arange(sample_offset(seed, step, i, r), nb, r) * SAMPLE_BLOCK
            blocks = (starts[:, None] + torch.arange(SAMPLE_BLOCK)[None, :]).reshape(-1)
            tail = torch.arange(nb * SAMPLE_BLOCK, n)
            idx = torch.cat([blocks, tail])
            w = torch.cat([torch.full((blocks.numel(),), nb / starts.numel(), dtype=torch.float64),
                           torch.ones(tail.numel(), dtype=torch.float64)])
        if math.isinf(p):
            biggest = max(biggest, float(d[idx].abs().max()))
        else:
            total += float((w * d[idx].abs().pow(p)).sum())
    return biggest if math.isinf(p) else total ** (1.0 / p)


# whole; a reduced stride; a reduced stride and a tail; a reduced stride and a tail; the full stride
SHAPES = [(7, 9), (300, 256), (100, 333), (64 * 64 * 64 + 1,), (1024, 2048)]


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_estimate_matches_an_index_arithmetic_reference(p):
    g = torch.Generator().manual_seed(0)
    prev_g = [torch.randn(s, generator=g) for s in SHAPES]
    prev_p = [torch.randn(s, generator=g) for s in SHAPES]
    cur_g = [t + torch.randn(t.shape, generator=g) * 0.1 for t in prev_g]
    cur_p = [t + torch.randn(t.shape, generator=g) * 0.01 for t in prev_p]
    snap = SampledSnapshot(seed=3)
    snap.take(prev_g, prev_p, torch.tensor(1.0), step=11)
    assert [stride_of(math.prod(s)) for s in SHAPES] == [1, 18, 8, 64, SAMPLE_STRIDE]
    dg, dp = snap.differences(cur_g, cur_p, p)
    got_g = float(torch.linalg.vector_norm(torch.cat(dg).double(), p))
    got_p = float(torch.linalg.vector_norm(torch.cat(dp).double(), p))
    assert got_g == pytest.approx(reference_estimate(prev_g, cur_g, 3, 11, p), rel=1e-5)
    assert got_p == pytest.approx(reference_estimate(prev_p, cur_p, 3, 11, p), rel=1e-5)
    # the totals the estimator takes for whole gradients, from a second snapshot of the same step
    again = SampledSnapshot(seed=3)
    again.take(prev_g, prev_p, torch.tensor(1.0), step=11)
    tg, tp = again.difference_norms(cur_g, cur_p, p)
    assert float(tg) == pytest.approx(reference_estimate(prev_g, cur_g, 3, 11, p), rel=1e-5)
    assert float(tp) == pytest.approx(reference_estimate(prev_p, cur_p, 3, 11, p), rel=1e-5)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_average_over_every_offset_is_exact(p, monkeypatch):
    """With a whole number of strides of blocks, every block is sampled by exactly one offset: the mean
    of the estimated ||x||_p^p over the offsets is ||x||_p^p."""
    n = SAMPLE_STRIDE * SAMPLE_MIN_BLOCKS * SAMPLE_BLOCK + SAMPLE_BLOCK // 2  # whole strides of blocks, a tail
    x = torch.randn(n, dtype=torch.float64)
    exact = float(x.abs().pow(p).sum())
    powers = []
    for o in range(SAMPLE_STRIDE):
        monkeypatch.setattr(snapshots, "sample_offset", lambda seed, step, index, stride, o=o: o)
        snap = SampledSnapshot()
        snap.take([x], [x], torch.tensor(1.0), step=0)
        dg, _ = snap.differences([torch.zeros_like(x)], [torch.zeros_like(x)], p)
        powers.append(float(torch.linalg.vector_norm(dg[0], p)) ** p)
    assert sum(powers) / len(powers) == pytest.approx(exact, rel=1e-12)
    assert len({round(v, 6) for v in powers}) > 1  # the offsets did sample different blocks


def test_large_difference_is_estimated_within_a_few_percent_and_buffers_are_small():
    g = torch.Generator().manual_seed(1)
    shapes = [(768, 768), (3072, 768), (768, 3072), (768,), (2304, 768)]
    prev = [torch.randn(s, generator=g) for s in shapes]
    # a difference whose scale varies by tensor and within tensors (rows), as real gradients' do
    rows = [torch.rand(t.shape[0], generator=g).reshape(-1, *([1] * (t.dim() - 1))) for t in prev]
    cur = [t + torch.randn(t.shape, generator=g) * (i + 1) * r for i, (t, r) in enumerate(zip(prev, rows))]
    snap = SampledSnapshot()
    snap.take(prev, prev, torch.tensor(1.0), step=0)
    dg, _ = snap.differences(cur, cur, 2.0)
    exact = float(torch.linalg.vector_norm(torch.cat([(a - b).reshape(-1) for a, b in zip(prev, cur)]).double()))
    est = float(torch.linalg.vector_norm(torch.cat(dg).double()))
    assert est == pytest.approx(exact, rel=0.03)
    grad_bytes = sum(t.numel() * t.element_size() for t in prev)
    # two buffers (the snapshot and the current sample), their whole-block padding and the blocks' order
    assert snap.nbytes <= grad_bytes * (4 / SAMPLE_STRIDE) * 1.05
    assert snap.nbytes >= 2 * sum(t.numel() * t.element_size() for t in snap.grads + snap.params)


def _mlp(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(40, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 1))
    return net, torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)


def _run(clipper: GradientClipper, steps: int, net=None, opt=None, start: int = 0):
    if net is None:
        net, opt = _mlp()
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(16, 40, generator=gen) for _ in range(start + steps)]
    for x in xs[start:]:
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        clipper.step(opt)
        opt.step()
    return net, opt


def test_small_tensors_are_kept_whole_and_match_the_full_snapshot(monkeypatch):
    """Two layers of the 40-300-300-1 MLP are sampled by default: with so many blocks required that every
    tensor is whole, the sampled run follows the full one (the same differences, whose norms are summed
    block by block instead of tensor by tensor: equal to float32 rounding)."""
    a = GradientClipper(snapshot="full", nonfinite="propagate")
    net_a, _ = _run(a, 12)
    monkeypatch.setattr(snapshots, "SAMPLE_MIN_BLOCKS", 10**6)
    b = GradientClipper(snapshot="sampled", nonfinite="propagate")
    net_b, _ = _run(b, 12)
    assert b._states[0].estimator.snapshot.grads[2].numel() == 300 * 300
    la, lb = a.latest(), b.latest()
    assert la.keys() == lb.keys()
    for k in la:
        assert lb[k] == pytest.approx(la[k], rel=1e-5), k
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_sampling_is_deterministic_and_resumes_bitwise(tmp_path):
    first = GradientClipper(nonfinite="propagate")
    net1, _ = _run(first, 15)
    second = GradientClipper(nonfinite="propagate")
    net2, _ = _run(second, 15)
    assert first.latest() == second.latest()
    assert all(torch.equal(p, q) for p, q in zip(net1.parameters(), net2.parameters()))
    assert first._states[0].estimator.snapshot.kind == "sampled"
    # the two large layers are sampled: their buffers hold a fraction of them
    snap = first._states[0].estimator.snapshot
    assert snap.grads[2].numel() < 300 * 300 / 10

    # resume at step 6 from a state dict saved through a file
    a = GradientClipper(nonfinite="propagate")
    net, opt = _run(a, 6)
    torch.save({"clip": a.state_dict(), "net": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    _run(a, 9, net, opt, start=6)
    net_r, opt_r = _mlp()
    net_r.load_state_dict(ck["net"])
    opt_r.load_state_dict(ck["opt"])
    b = GradientClipper(nonfinite="propagate")
    b.load_state_dict(ck["clip"])
    _run(b, 9, net_r, opt_r, start=6)
    assert b.latest() == a.latest() == first.latest()
    for p, q in zip(net_r.parameters(), net1.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("saved", "loaded"), [("full", "sampled"), ("sampled", "full")])
def test_a_snapshot_of_the_other_kind_is_dropped(saved, loaded):
    a = GradientClipper(snapshot=saved, nonfinite="propagate")
    net, opt = _run(a, 5)
    pairs = a.latest()["l0l1/smoothness_pairs"]
    b = GradientClipper(snapshot=loaded, nonfinite="propagate")
    b.load_state_dict(a.state_dict())
    assert not b._states[0].estimator.snapshot.valid
    _run(b, 1, net, opt, start=5)  # no pair: nothing to difference against
    assert b.latest()["l0l1/smoothness_pairs"] == pairs
    _run(b, 1, net, opt, start=6)
    assert b.latest()["l0l1/smoothness_pairs"] == pairs + 1


def test_snapshot_setting_defaults_and_errors():
    assert GradientClipper().snapshot == "sampled"
    assert GradientClipper(probe=True).snapshot == "full"
    assert GradientClipper(snapshot_device="cpu").snapshot == "full"
    assert GradientClipper(snapshot="full").settings()["snapshot"] == "full"
    assert isinstance(GradientClipper(snapshot="full").estimator.new_snapshot(), FullSnapshot)
    with pytest.raises(ValueError, match=r"`snapshot` must be one of 'sampled', 'full', got 'exact'"):
        GradientClipper(snapshot="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`probe=True`.*got `snapshot='sampled'`"):
        GradientClipper(probe=True, snapshot="sampled")
    with pytest.raises(ValueError, match=r"`snapshot_device='cpu'`.*got `snapshot='sampled'`"):
        GradientClipper(snapshot_device="cpu", snapshot="sampled")


def test_offsets_spread_over_the_stride():
    seen = {sample_offset(0, t, i, SAMPLE_STRIDE) for t in range(50) for i in range(20)}
    assert seen == set(range(SAMPLE_STRIDE))
    assert sample_offset(0, 5, 2, 64) == sample_offset(0, 5, 2, 64)
    assert [sample_offset(1, 5, i, 64) for i in range(8)] != [sample_offset(0, 5, i, 64) for i in range(8)]


def sampled_positions(numel: int, seed: int, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled blocks' element positions and the tail's of a sampled tensor, by index arithmetic."""
    nb, r = numel // SAMPLE_BLOCK, stride_of(numel)
    starts = torch.arange(sample_offset(seed, step, index, r), nb, r) * SAMPLE_BLOCK
    blocks = (starts[:, None] + torch.arange(SAMPLE_BLOCK)[None, :]).reshape(-1)
    return blocks, torch.arange(nb * SAMPLE_BLOCK, numel)


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_tensors_of_several_dtypes_are_estimated_together(p):
    """Float32, float64 and bfloat16 tensors (one buffer each) add up to the reference estimate."""
    g = torch.Generator().manual_seed(4)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    prev = [torch.randn(s, generator=g).to(d) for s, d in zip(SHAPES, dtypes)]
    cur = [(t.double() + torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.1).to(t.dtype) for t in prev]
    snap = SampledSnapshot(seed=5)
    snap.take(prev, prev, torch.tensor(1.0), step=2)
    assert len(snap._groups) == 3
    # the reference differences the bfloat16 values as stored, in float64; the snapshot in bfloat16
    ref = reference_estimate(prev, cur, 5, 2, p)
    dg, dp = snap.difference_norms(cur, cur, p)
    assert dg.dtype == torch.float64
    assert float(dg) == pytest.approx(ref, rel=2e-3)
    assert float(dp) == float(dg)
    again = SampledSnapshot(seed=5)
    again.take(prev, prev, torch.tensor(1.0), step=2)
    per_g, _ = again.differences(cur, cur, p)
    assert float(torch.linalg.vector_norm(torch.cat([t.double() for t in per_g]), p)) == pytest.approx(ref, rel=2e-3)


def test_checkpoint_layout_per_tensor():
    """A checkpoint holds, per sampled tensor, its kept blocks then its tail (the layout every version
    reads); a whole tensor in its shape."""
    g = torch.Generator().manual_seed(6)
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    params = [torch.randn(s, generator=g) for s in SHAPES]
    snap = SampledSnapshot(seed=9)
    snap.take(grads, params, torch.tensor(2.0), step=4)
    sd = snap.state_dict()
    assert sd["kind"] == "sampled" and sd["seed"] == 9 and sd["layout"] == [list(s) for s in SHAPES]
    for i, (gr, pa) in enumerate(zip(grads, params)):
        for saved, t in ((sd["grads"][i], gr), (sd["params"][i], pa)):
            if stride_of(t.numel()) == 1:
                assert torch.equal(saved, t)
                continue
            blocks, tail = sampled_positions(t.numel(), 9, 4, i)
            flat = t.reshape(-1)
            kmax = -(-(t.numel() // SAMPLE_BLOCK) // stride_of(t.numel()))
            assert saved.shape == (kmax * SAMPLE_BLOCK + tail.numel(),)
            assert torch.equal(saved[: blocks.numel()], flat[blocks])
            assert torch.equal(saved[blocks.numel() : blocks.numel() + tail.numel()], flat[tail])
    # and it loads into a fresh snapshot that estimates the same
    cur = [t + 1.0 for t in grads]
    other = SampledSnapshot(seed=9)
    other.load(sd, torch.device("cpu"), step=4)
    assert torch.equal(other.difference_norms(cur, params, 2.0), snap.difference_norms(cur, params, 2.0))


def test_a_stale_non_finite_block_out_of_use_is_ignored():
    """A tensor whose blocks are not a whole number of strides keeps one block fewer at some offsets: the
    block then out of use may still hold a non-finite value of an earlier snapshot, which must not
    reach the estimate."""
    shape = (521 * SAMPLE_BLOCK + 20,)  # 521 blocks, stride 8: 66 blocks at offset 0, 65 at offsets 1 to 7
    assert stride_of(shape[0]) == 8
    steps = {sample_offset(0, t, 0, 8) == 0: t for t in range(64)}
    full_step, short_step = steps[True], steps[False]
    x = torch.randn(shape)
    snap = SampledSnapshot()
    snap.take([torch.full(shape, math.nan)], [x], torch.tensor(1.0), step=full_step)
    snap.take([x], [x], torch.tensor(1.0), step=short_step)
    cur = x + 0.5
    dg, _ = snap.difference_norms([cur], [cur], 2.0)
    assert math.isfinite(float(dg))
    assert float(dg) == pytest.approx(reference_estimate([x], [cur], 0, short_step, 2.0), rel=1e-5)
    # while a non-finite value in use does reach it
    snap.take([x], [x], torch.tensor(1.0), step=short_step)
    bad = cur.clone()
    blocks, _ = sampled_positions(bad.numel(), 0, short_step, 0)
    bad.view(-1)[blocks[3]] = math.inf
    assert not math.isfinite(float(snap.difference_norms([bad], [cur], 2.0)[0]))


def test_low_precision_gradients_of_float32_parameters():
    """FSDP1 can keep bfloat16 gradients of float32 parameters: each side is estimated in a dtype that
    holds it exactly, and a checkpoint keeps each side in its own dtype."""
    g = torch.Generator().manual_seed(8)
    shapes = [(1024, 256), (300,)]
    grads = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    before = [torch.randn(s, generator=g) for s in shapes]
    after = [t - 1e-4 * torch.randn(t.shape, generator=g) for t in before]  # a step far below bfloat16's resolution
    snap = SampledSnapshot(seed=2)
    snap.take(grads, before, torch.tensor(1.0), step=3)
    new_grads = [(t.float() + 0.5).to(torch.bfloat16) for t in grads]
    sd = snap.state_dict()
    assert [t.dtype for t in sd["grads"]] == [torch.bfloat16] * 2
    assert [t.dtype for t in sd["params"]] == [torch.float32] * 2
    dg, dp = snap.difference_norms(new_grads, after, 2.0)
    assert float(dp) == pytest.approx(reference_estimate(before, after, 2, 3, 2.0), rel=1e-5)
    assert float(dg) == pytest.approx(reference_estimate(grads, new_grads, 2, 3, 2.0), rel=1e-5)
    # restored from the checkpoint: the same layout (no re-allocation at the next step) and estimate
    again = SampledSnapshot(seed=2)
    again.load(sd, torch.device("cpu"), step=3)
    assert again._signature == tuple((torch.bfloat16, torch.float32, torch.device("cpu")) for _ in shapes)
    assert torch.equal(again.difference_norms(new_grads, after, 2.0), torch.stack([dg, dp]))


def test_checkpoint_of_a_tensor_keeping_fewer_blocks_than_its_most():
    """A tensor with a tail, at a step where it keeps one block fewer than at offset 0: the tail follows
    the blocks kept (the layout every version reads)."""
    n = 521 * SAMPLE_BLOCK + 20  # stride 8: 66 blocks at offset 0, 65 at offsets 1 to 7
    step = next(t for t in range(64) if sample_offset(0, t, 0, 8) != 0)
    x = torch.randn(n)
    snap = SampledSnapshot()
    snap.take([x], [x * 2], torch.tensor(1.0), step=step)
    saved = snap.state_dict()["grads"][0]
    blocks, tail = sampled_positions(n, 0, step, 0)
    assert blocks.numel() == 65 * SAMPLE_BLOCK and saved.numel() == 66 * SAMPLE_BLOCK + 20
    assert torch.equal(saved[: blocks.numel()], x[blocks])
    assert torch.equal(saved[blocks.numel() : blocks.numel() + 20], x[tail])


def test_a_checkpoint_sampled_with_other_settings_is_dropped():
    x = torch.randn(300, 256)
    snap = SampledSnapshot(seed=1)
    snap.take([x], [x], torch.tensor(1.0), step=0)
    sd = snap.state_dict()
    assert (sd["block"], sd["stride"], sd["min_blocks"]) == (SAMPLE_BLOCK, SAMPLE_STRIDE, SAMPLE_MIN_BLOCKS)
    other = SampledSnapshot(seed=1, stride=SAMPLE_STRIDE // 2)
    other.load(sd, torch.device("cpu"), step=0)
    assert not other.valid
    # a checkpoint without the settings (as older versions wrote it) was sampled with the defaults
    legacy = {k: v for k, v in sd.items() if k not in ("block", "stride", "min_blocks")}
    same = SampledSnapshot(seed=1)
    same.load(legacy, torch.device("cpu"), step=0)
    assert same.valid and torch.equal(same.difference_norms([x], [x], 2.0), torch.zeros(2))


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_empty_tensors(p):
    """An empty tensor (an empty shard) adds nothing; alone in its dtype it still gives norms of 0."""
    g = torch.Generator().manual_seed(9)
    prev = [torch.zeros(0), torch.randn((300, 256), generator=g), torch.zeros(0, dtype=torch.float64)]
    cur = [prev[0], prev[1] + torch.randn((300, 256), generator=g), prev[2]]
    ref = reference_estimate(prev, cur, 0, 0, p)
    snap = SampledSnapshot()
    snap.take(prev, prev, torch.tensor(1.0), step=0)
    dg, _ = snap.differences(cur, cur, p)
    assert [float(t) for t in dg] == [0.0, pytest.approx(ref, rel=1e-5), 0.0]
    again = SampledSnapshot()
    again.take(prev, prev, torch.tensor(1.0), step=0)
    tg, _ = again.difference_norms(cur, cur, p)
    assert float(tg) == pytest.approx(ref, rel=1e-5)


def canonical_difference_norms(prev, cur, seed: int, step: int, p: float) -> torch.Tensor:
    """The estimate reduced in the canonical block order, tensor by tensor: per tensor its ``k`` sampled
    blocks, a zero block where it keeps fewer than ``kmax``, then its tail padded to a block (a whole tensor:
    its elements padded to whole blocks); each block's p-norm times its weight, then one p-norm over all of
    them. Float32 throughout, as the snapshot computes it."""
    blocks, weights = [], []
    for i, (a, b) in enumerate(zip(prev, cur)):
        d = (a - b).reshape(-1)
        n = d.numel()
        nb, r = n // SAMPLE_BLOCK, stride_of(n)
        if r == 1:
            padded = torch.zeros(-(-n // SAMPLE_BLOCK) * SAMPLE_BLOCK, dtype=d.dtype)
            padded[:n] = d
            blocks.append(padded.view(-1, SAMPLE_BLOCK))
            weights += [1.0] * (padded.numel() // SAMPLE_BLOCK)
            continue
        o, kmax = sample_offset(seed, step, i, r), -(-nb // r)
        kept = d[: nb * SAMPLE_BLOCK].view(nb, SAMPLE_BLOCK)[o::r]
        w = 1.0 if math.isinf(p) else (nb / kept.shape[0]) ** (1.0 / p)
        blocks += [kept, torch.zeros(kmax - kept.shape[0], SAMPLE_BLOCK, dtype=d.dtype)]
        weights += [w] * kept.shape[0] + [0.0] * (kmax - kept.shape[0])
        if n > nb * SAMPLE_BLOCK:
            tail = torch.zeros(SAMPLE_BLOCK, dtype=d.dtype)
            tail[: n - nb * SAMPLE_BLOCK] = d[nb * SAMPLE_BLOCK :]
            blocks.append(tail.view(1, -1))
            weights.append(1.0)
    norms = torch.linalg.vector_norm(torch.cat(blocks), p, dim=1) * torch.tensor(weights)
    return torch.linalg.vector_norm(norms, p)


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_the_estimate_is_reduced_in_the_canonical_order_bit_for_bit(p):
    """However the buffers are laid out for the gather (the runs of every tensor first), the blocks' norms are
    reduced in the canonical order: the estimate equals, bit for bit, the one reduced tensor by tensor."""
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 9), (300, 256), (521 * SAMPLE_BLOCK + 20,), (100, 333), (1024, 2048), (5,)]
    seen_short = False
    for step in range(6):
        prev = [torch.randn(s, generator=g) for s in shapes]
        cur = [torch.randn(s, generator=g) for s in shapes]
        snap = SampledSnapshot(seed=4)
        snap.take(prev, prev, torch.tensor(1.0), step=step)
        got = snap.difference_norms(cur, cur, p)[0]
        assert torch.equal(got, canonical_difference_norms(prev, cur, 4, step, p))
        seen_short |= sample_offset(4, step, 2, stride_of(shapes[2][0])) > 0  # a tensor keeping one block fewer
    assert seen_short
