"""On a CUDA device: host syncs by CUDA's own check, AMP (fp16 with GradScaler, bf16), fused optimizers,
and the sampled snapshot against the same computation on the CPU. Skipped without CUDA.

``benchmarks/gpu_check.sh`` runs this module with the GPU rows of the step benchmark.
"""

from __future__ import annotations

import pytest
import torch
from _reference import ref_norm
from torch import nn

from lightning_l0l1 import GradientClipper

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net(seed: int = 0, width: int = 300) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))


def _batches(n: int, device: str = "cuda"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 32, generator=g).to(device), torch.randn(64, 1, generator=g).to(device))
            for _ in range(n)]


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [
        ("sgd", dict()),
        ("sgd", dict(snapshot="full")),
        ("sgd", dict(snapshot="full", snapshot_device="cpu")),
        ("adam-fused", dict()),
        ("adamw", dict(mode="clip", max_norm=0.5)),
    ],
)
def test_no_host_sync_in_the_step(optimizer, kwargs):
    """``set_sync_debug_mode("error")`` raises on any synchronizing CUDA call inside the step."""
    net = _net().cuda()
    if optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    elif optimizer == "adam-fused":
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    clipper = GradientClipper(nonfinite="propagate", **kwargs)
    for step, (x, y) in enumerate(_batches(8)):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(net(x), y).backward()
        if step >= 2:  # after the one-time allocations (pinned buffers, state)
            torch.cuda.set_sync_debug_mode("error")
        try:
            clipper.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.step()
    assert clipper.latest()["l0l1/steps"] == 8


def test_sampled_snapshot_on_cuda_equals_the_cpu_run():
    """The same offsets on both devices: the estimates agree to float32 rounding."""
    results = []
    for device in ("cpu", "cuda"):
        net = _net(width=512).to(device)  # 512 x 512 = 262144 elements: sampled
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        clipper = GradientClipper(nonfinite="propagate")
        for x, y in _batches(10, device):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(net(x), y).backward()
            clipper.step(opt)
            opt.step()
        assert clipper._states[0].estimator.snapshot.grads[2].numel() < 512 * 512 // 10
        results.append(clipper.latest())
    cpu, cuda = results
    assert cpu["l0l1/smoothness_pairs"] == cuda["l0l1/smoothness_pairs"] == 9
    for key in ("l0l1/smoothness", "l0l1/L0", "l0l1/L1", "l0l1/grad_norm"):
        assert cuda[key] == pytest.approx(cpu[key], rel=1e-3), key


def test_sampled_snapshot_resumes_on_cuda_as_uninterrupted():
    """A checkpoint (CPU tensors) loaded into a new clipper whose gradients are on the GPU: the restored
    snapshot moves there and forms the next pair, bitwise as the uninterrupted run does."""

    def run(clipper, net, opt, batches):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(net(x), y).backward()
            clipper.step(opt)
            opt.step()

    batches = _batches(10)
    net = _net(width=512).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    a = GradientClipper(nonfinite="propagate")
    run(a, net, opt, batches[:5])
    ck = {"clip": a.state_dict(), "net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
    run(a, net, opt, batches[5:])
    net_b = _net(width=512).cuda()
    net_b.load_state_dict(ck["net"])
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.05)
    b = GradientClipper(nonfinite="propagate")
    b.load_state_dict(ck["clip"])
    run(b, net_b, opt_b, batches[5:])
    assert b.latest() == a.latest()
    assert b.latest()["l0l1/smoothness_pairs"] == 9  # the first step after loading formed its pair


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_gradscaler_norm_is_the_unscaled_norm(fused):
    """Under autocast fp16 with a GradScaler: after ``unscale_`` the clipper's norm is the reference norm
    of the unscaled gradients, the clipped gradients have norm ``max_norm``, and overflow steps are left to
    the scaler (``nonfinite_handled``)."""
    net = _net().cuda()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    clipper = GradientClipper(mode="clip", max_norm=0.1)
    for x, y in _batches(6):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.mse_loss(net(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads = [p.grad.detach().clone() for p in net.parameters()]
        out = clipper.step(opt, nonfinite_handled=True, allow_handoff=False)
        if torch.isfinite(out.norm):
            assert float(out.norm) == pytest.approx(ref_norm(grads, 2.0), rel=1e-5)
            after = ref_norm([p.grad for p in net.parameters()], 2.0)
            assert after == pytest.approx(min(0.1, ref_norm(grads, 2.0)), rel=1e-4)
        scaler.step(opt)
        scaler.update()


def test_bf16_autocast_auto_trains_and_norms_match():
    net = _net().cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    clipper = GradientClipper()
    for x, y in _batches(8):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(net(x).float(), y)
        loss.backward()
        grads = [p.grad.detach().clone() for p in net.parameters()]
        out = clipper.step(opt)
        assert float(out.norm) == pytest.approx(ref_norm(grads, 2.0), rel=1e-5)
        opt.step()
    assert clipper.latest()["l0l1/smoothness_pairs"] == 7


def test_fused_adam_handoff_equals_scaling_the_gradients():
    """The fused kernel's ``grad_scale`` hand-off and scaling the gradients first give the same parameters."""
    finals = []
    for handoff in (True, False):
        net = _net().cuda()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
        clipper = GradientClipper(mode="clip", max_norm=0.05, fused_handoff=handoff, nonfinite="propagate")
        for x, y in _batches(6):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(net(x), y).backward()
            clipper.step(opt)
            opt.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)
