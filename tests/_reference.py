"""Torch-only references shared by the tests (no Lightning import: the plain-torch tests stay light).

* the float64 reference norm and the tolerance of a norm of each dtype against it;
* cosh, a function with known (L0, L1) smoothness constants, and full-batch gradient descent with a
  clipper between backward and step;
* a tiny MLP under momentum SGD, its minibatches and its backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_l0l1.clipper import GradientClipper

F64 = torch.float64
BIG_LR = 1e3  # so large that the rule, not the learning rate, sets every step
TOL = 1e-6  # "near-stationary": |grad| <= TOL

GradFn = Callable[[Tensor], Tensor]

# ---------------------------------------------------------------------------- norms and tolerances

# bfloat16 per-tensor norms are rounded to bfloat16 on the CPU (see norms._norm_dtype): unit roundoff 2**-8.
BF16_RTOL = 2**-8 + 1e-5


def ref_norm(tensors: Sequence[Tensor], p: float) -> float:
    """The p-norm of all entries of ``tensors`` taken as one float64 vector (0 for none)."""
    if not tensors:
        return 0.0
    flat = torch.cat([t.detach().to(F64).reshape(-1) for t in tensors])
    if math.isinf(p):
        return flat.abs().max().item()
    return flat.abs().pow(p).sum().pow(1.0 / p).item()


def norm_rtol(dtype: torch.dtype, float32: float = 2e-6) -> float:
    """Relative tolerance of a norm of ``dtype`` gradients against the float64 reference.

    ``float32`` is the tolerance of the float32 and float16 dtypes (both accumulate in float32); a test
    that compares quantities derived from the norm (a scale times a learning rate) passes a larger one.
    """
    if dtype == torch.float64:
        return 1e-12
    return BF16_RTOL if dtype == torch.bfloat16 else float32


# ---------------------------------------------------------------------------- cosh and gradient descent


def cosh_fn(l0: float, l1: float) -> tuple[GradFn, Callable[[Tensor], float]]:
    """f(x) = (L0/L1^2) sum_i cosh(L1 x_i): grad (L0/L1) sinh(L1 x), Hessian diag(L0 cosh(L1 x_i)).

    ||H|| = L0 max_i cosh(L1 x_i) <= L0 (1 + max_i |sinh(L1 x_i)|) <= L0 + L1 ||g||: equality at x = 0
    (L0 tight) and, asymptotically, along one coordinate axis (L1 tight). With all coordinates equal the
    trajectory only sees (L0, L1/sqrt(d)), so the multi-dimensional runs start with one coordinate large.
    """
    return (lambda x: (l0 / l1) * torch.sinh(l1 * x)), (lambda x: float(l0 * torch.cosh(l1 * x).max()))


def descend(
    grad_fn: GradFn, x0: Sequence[float], clipper: GradientClipper, lr: float = BIG_LR, steps: int = 200,
    tol: float | None = TOL,
) -> tuple[list[Tensor], list[Tensor]]:
    """Full-batch gradient descent on one float64 parameter with ``clipper`` between backward and step.

    Records every iterate and its raw gradient. The clipper sees every recorded gradient (also the last
    one, without a step after it), so its secant pairs are exactly those of consecutive recorded iterates.
    Stops after the first gradient with norm <= ``tol``.
    """
    x = nn.Parameter(torch.tensor(x0, dtype=F64))
    opt = torch.optim.SGD([x], lr=lr)
    xs, gs = [], []
    for _ in range(steps):
        g = grad_fn(x.detach())
        xs.append(x.detach().clone())
        gs.append(g.clone())
        x.grad = g.clone()
        clipper.step(opt)
        if tol is not None and float(g.norm()) <= tol:
            break
        opt.step()
    return xs, gs


# ---------------------------------------------------------------------------- a tiny MLP on minibatches


def mlp_opt(dtype: torch.dtype = torch.float32, lr: float = 0.05, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)
    return net, torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)


def batches(n: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 5, generator=g, dtype=F64)
        out.append((x.to(dtype), ((x**2).sum(1, keepdim=True) * 3).to(dtype)))
    return out


def backward(net: nn.Module, x: Tensor, y: Tensor) -> None:
    for p in net.parameters():
        p.grad = None
    nn.functional.mse_loss(net(x), y).backward()
