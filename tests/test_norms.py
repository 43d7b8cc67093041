"""lightning_l0l1.norms against float64 references (single process; the collectives are in test_distributed)."""

from __future__ import annotations

import math

import pytest
import torch
from _reference import BF16_RTOL, norm_rtol, ref_norm

from lightning_l0l1.norms import GradGroup, group_norms, scale_grads_, total_norm, validate_norm_type

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FOREACH = [True, False, None]
SHAPES = [[(7, 5), (5,)], [(3, 4, 2)], [(11,), (2, 3), (1,)]]  # three parameter groups


def make_groups(dtype: torch.dtype, scale: float = 1.0) -> list[list[torch.Tensor]]:
    return [[(torch.randn(s) * scale).to(dtype) for s in shapes] for shapes in SHAPES]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_group_norms_and_total_norm_match_float64_reference(norm_type, dtype, foreach):
    grads = make_groups(dtype, scale=3.0)
    norms = group_norms([GradGroup(g) for g in grads], norm_type, foreach=foreach)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert norms.dtype == acc
    assert norms.shape == (len(grads),)
    expected = torch.tensor([ref_norm(g, norm_type) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(norms.double(), expected, rtol=norm_rtol(dtype), atol=0)

    total = total_norm(norms, norm_type)
    assert total.dim() == 0 and total.dtype == acc
    flat = [t for g in grads for t in g]
    assert total.item() == pytest.approx(ref_norm(flat, norm_type), rel=norm_rtol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_total_norm_matches_torch_get_total_norm(norm_type, dtype):
    grads = make_groups(dtype)
    flat = [t for g in grads for t in g]
    ours = total_norm(group_norms([GradGroup(g) for g in grads], norm_type), norm_type)
    theirs = torch.nn.utils.get_total_norm(flat, norm_type)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=norm_rtol(dtype), atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize(("norm_type", "value"), [(1.0, 300.0), (2.0, 300.0), (3.0, 3000.0)])
def test_fp16_norm_that_overflows_in_torch_is_finite_and_right(norm_type, value, foreach):
    g = torch.full((100_000,), value, dtype=torch.float16)
    small = torch.full((10,), 1.0, dtype=torch.float16)
    expected = ref_norm([g, small], norm_type)
    assert 65504 < expected < 1e30  # above the float16 range, well inside float32
    # torch keeps the per-tensor norm in float16: the premise of the test.
    assert torch.isinf(torch.nn.utils.get_total_norm([g, small], norm_type))
    norms = group_norms([GradGroup([g, small])], norm_type, foreach=foreach)
    assert norms.dtype == torch.float32
    assert torch.isfinite(norms).all()
    # float32 accumulation over 1e5 equal terms: a few 1e-5 relative error (torch's own float32 norm too).
    assert norms.item() == pytest.approx(expected, rel=2e-4)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_mixed_dtypes_accumulate_in_float32_or_float64(norm_type, foreach):
    half = [torch.randn(50).half() * 10, torch.randn(3, 3).bfloat16(), torch.randn(4)]
    norms = group_norms([GradGroup(half)], norm_type, foreach=foreach)
    assert norms.dtype == torch.float32
    assert norms.item() == pytest.approx(ref_norm(half, norm_type), rel=BF16_RTOL)

    with64 = [*half, torch.randn(6, dtype=torch.float64)]
    groups = [GradGroup(half), GradGroup(with64[3:])]
    norms = group_norms(groups, norm_type, foreach=foreach)
    assert norms.dtype == torch.float64
    expected = torch.tensor([ref_norm(half, norm_type), ref_norm(with64[3:], norm_type)], dtype=torch.float64)
    torch.testing.assert_close(norms, expected, rtol=BF16_RTOL, atol=0)
    assert total_norm(norms, norm_type).item() == pytest.approx(ref_norm(with64, norm_type), rel=BF16_RTOL)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_empty_groups_have_norm_zero(norm_type, foreach):
    a, b = torch.randn(5), torch.randn(2, 2)
    norms = group_norms([GradGroup(), GradGroup([a, b]), GradGroup()], norm_type, foreach=foreach)
    assert norms.shape == (3,)
    assert norms[0].item() == 0.0 and norms[2].item() == 0.0
    assert norms[1].item() == pytest.approx(ref_norm([a, b], norm_type), rel=2e-6)
    assert total_norm(norms, norm_type).item() == pytest.approx(ref_norm([a, b], norm_type), rel=2e-6)


@pytest.mark.parametrize("n_groups", [0, 1, 3])
def test_no_gradient_at_all_gives_zeros(n_groups):
    norms = group_norms([GradGroup() for _ in range(n_groups)], 2.0)
    assert norms.shape == (n_groups,)
    assert not norms.any()
    assert total_norm(norms).item() == 0.0


def test_zero_gradients_give_zero_norm():
    norms = group_norms([GradGroup([torch.zeros(3), torch.zeros(2, dtype=torch.float16)])], 2.0)
    assert norms.tolist() == [0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_values_propagate_into_the_norm(bad):
    g = torch.randn(6)
    g[2] = bad
    norm = total_norm(group_norms([GradGroup([torch.randn(3)]), GradGroup([g])], 2.0))
    assert not torch.isfinite(norm)
    assert math.isnan(norm.item()) == math.isnan(bad)


def test_grad_group_from_tensors():
    ts = [torch.randn(2), torch.randn(3, dtype=torch.float16), torch.randn(1)]
    group = GradGroup.from_tensors(iter(ts))
    assert len(group) == 3
    assert group.replicated == ts and group.sharded == [] and group.dtensors == []
    assert group.first() is ts[0]
    assert all(a is b for a, b in zip(group.local_tensors(), ts))

    shards = GradGroup.from_tensors(ts, shards=True)
    assert shards.sharded == ts and shards.replicated == [] and len(shards) == 3
    assert shards.first() is ts[0]

    empty = GradGroup.from_tensors([])
    assert len(empty) == 0 and empty.local_tensors() == []


def test_grad_group_copies_its_inputs():
    ts = [torch.randn(2)]
    group = GradGroup(ts)
    ts.append(torch.randn(3))
    assert len(group) == 1


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
def test_scale_grads_scales_every_dtype(scale_dtype, foreach):
    grads = [torch.randn(4, 3).to(d) for d in DTYPES] + [torch.randn(5).to(d) for d in DTYPES]
    before = [g.clone() for g in grads]
    scale = torch.tensor(0.25, dtype=scale_dtype)  # a power of 2: exact in every dtype
    scale_grads_(grads, scale, foreach=foreach)
    for g, b in zip(grads, before):
        assert g.dtype == b.dtype
        torch.testing.assert_close(g.double(), b.double() * 0.25, rtol=0, atol=0)
    assert scale.item() == 0.25  # the scale itself is untouched


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grads_with_inexact_scale(dtype, foreach):
    grads = [torch.randn(64).to(dtype), torch.randn(3, 3).to(dtype)]
    before = [g.clone() for g in grads]
    s = 1.0 / 3.0
    scale_grads_(grads, torch.tensor(s), foreach=foreach)
    for g, b in zip(grads, before):
        torch.testing.assert_close(g, (b.double() * s).to(dtype))


@pytest.mark.parametrize("foreach", FOREACH)
def test_scale_grads_by_zero_and_one(foreach):
    g = torch.randn(10)
    keep = g.clone()
    scale_grads_([g], torch.tensor(1.0), foreach=foreach)
    assert torch.equal(g, keep)
    scale_grads_([g], torch.tensor(0.0), foreach=foreach)
    assert not g.any()
    scale_grads_([], torch.tensor(0.5), foreach=foreach)  # nothing to do, no error


@pytest.mark.parametrize("value", [0, 0.0, -1, -2.5, float("nan"), -float("inf"), "two", "", True, False, None, [2]])
def test_validate_norm_type_rejects(value):
    with pytest.raises(ValueError) as info:
        validate_norm_type(value)
    msg = str(info.value)
    assert "`norm_type`" in msg
    assert repr(value) in msg


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (2, 2.0), (2.0, 2.0), (3, 3.0), (0.5, 0.5), ("inf", math.inf), (float("inf"), math.inf), ("2", 2.0)],
)
def test_validate_norm_type_accepts(value, expected):
    out = validate_norm_type(value)
    assert isinstance(out, float)
    assert out == expected


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("foreach", [True, False])
def test_per_tensor_norms_are_kept_and_the_group_norms_unchanged(norm_type, foreach):
    """``per_tensor``: each gradient's norm (float64 reference), in one vector per segment; the group
    norms the same bits as without it (they are formed from the same values)."""
    groups = make_groups(torch.float32)
    plain = group_norms([GradGroup(g) for g in groups], norm_type, foreach=foreach)
    kept: list = []
    with_kept = group_norms([GradGroup(g) for g in groups], norm_type, foreach=foreach, per_tensor=kept)
    assert torch.equal(plain, with_kept)
    flat = [t for g in groups for t in g]
    ((ids, vec),) = kept
    assert ids == [id(t) for t in flat] and vec.shape == (len(flat),)
    want = torch.tensor([torch.linalg.vector_norm(t.double(), norm_type).item() for t in flat], dtype=torch.float64)
    torch.testing.assert_close(vec.double(), want, rtol=1e-6, atol=0)
