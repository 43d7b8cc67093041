r"""Scale factors of the four rules: pure functions of a 0-d norm tensor.

Every rule returns the factor ``s`` the gradients are multiplied by, with
``0 <= s <= 1`` (``s`` is never above 1: no rule amplifies a gradient). All of
them are branch-free tensor expressions, so none reads a value on the host.
:mod:`lightning_l0l1.modes` wraps each in the class its ``mode`` names.

With :math:`g` the global gradient and :math:`\gamma` the threshold:

.. math::

    s_\text{clip} = \min\left(1, \frac{\gamma}{\lVert g\rVert + \epsilon}\right), \qquad
    s_\text{adaptive} = \frac{\gamma}{\lVert g\rVert + \gamma}, \qquad
    s_\text{l0l1} = \min\left(1, \frac{1}{\eta\,(L_0 + L_1\lVert g\rVert)}\right)

The last one makes the effective step :math:`\eta s = \min(\eta, 1/(L_0 + L_1\lVert g\rVert))`,
the step that minimises the descent-lemma bound of an :math:`(L_0, L_1)`-smooth
function. With :math:`\eta = 1/L_0` it is exactly ``adaptive`` with
:math:`\gamma = L_0/L_1`.

References:
    Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training: a
    theoretical justification for adaptivity", ICLR 2020. https://arxiv.org/abs/1905.11881
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "CLIP_EPS", "adaptive_scale", "auto_adaptive_scale", "auto_scale", "clip_scale", "l0l1_scale", "l0l1_threshold",
]

#: The constant ``torch.nn.utils.clip_grad_norm_`` adds to the norm; kept equal so
#: ``clip`` gives the same gradients as torch to float tolerance.
CLIP_EPS = 1e-6

Number = Union[float, Tensor]


def clip_scale(norm: Tensor, max_norm: Number, eps: float = CLIP_EPS) -> Tensor:
    r"""Hard clipping: :math:`s = \min(1, \gamma / (\lVert g\rVert + \epsilon))`.

    Args:
        norm: the global gradient norm, a 0-d tensor.
        max_norm: the threshold :math:`\gamma > 0`.
        eps: added to the norm, as torch does, so a zero norm gives ``s = 1``.

    Returns:
        A 0-d tensor like ``norm``; 0 for an infinite norm, NaN for a NaN norm.

    Example:
        >>> clip_scale(torch.tensor(4.0), 2.0)
        tensor(0.5000)
    """
    return torch.clamp(max_norm / (norm + eps), max=1.0)


def adaptive_scale(norm: Tensor, max_norm: Number) -> Tensor:
    r"""Smooth ("adaptive") clipping: :math:`s = \gamma / (\lVert g\rVert + \gamma)`.

    The scaled norm :math:`\gamma\lVert g\rVert / (\lVert g\rVert + \gamma)` is always
    below :math:`\gamma`, and within a factor 2 of hard clipping's.

    Example:
        >>> adaptive_scale(torch.tensor(3.0), 1.0)
        tensor(0.2500)
    """
    return max_norm / (norm + max_norm)


def l0l1_scale(norm: Tensor, lr: Number, l0: Number, l1: Number) -> Tensor:
    r"""The :math:`(L_0, L_1)` step: :math:`s = \min(1, 1 / (\eta (L_0 + L_1\lVert g\rVert)))`.

    Args:
        norm: the global gradient norm, a 0-d tensor.
        lr: the learning rate :math:`\eta` of the parameter group (float or tensor).
        l0: the smoothness constant :math:`L_0`, ``>= 0`` (``l0`` and ``l1`` not both 0).
        l1: the smoothness constant :math:`L_1`, ``>= 0``.

    Returns:
        ``s`` such that the effective step :math:`\eta s = \min(\eta, 1/(L_0 + L_1\lVert g\rVert))`.
        A zero learning rate or zero denominator gives ``s = 1``.

    Example:
        >>> l0l1_scale(torch.tensor(3.0), lr=1.0, l0=1.0, l1=1.0)
        tensor(0.2500)
    """
    if isinstance(lr, (int, float)) and lr == 0:
        return torch.ones_like(norm)
    # With L1 = 0 the norm drops out (and an infinite norm must not give 0 * inf = NaN).
    slope = l1 * norm if not (isinstance(l1, (int, float)) and l1 == 0) else torch.zeros_like(norm)
    return torch.clamp(torch.reciprocal((l0 + slope) * lr), max=1.0)


def l0l1_threshold(lr: float, l0: float, l1: float) -> float:
    r"""The gradient norm above which :func:`l0l1_scale` is below 1: :math:`(1/\eta - L_0)/L_1`.

    Clamped at 0 (every step is scaled when :math:`\eta L_0 > 1`); ``inf`` when
    :math:`L_1 = 0` and :math:`\eta L_0 \le 1` (no step is scaled), or when ``lr`` is 0.
    Host arithmetic on Python floats: no tensor is read.
    """
    if lr <= 0:
        return math.inf
    slack = 1.0 / lr - l0
    if slack < 0:
        return 0.0
    return slack / l1 if l1 > 0 else math.inf


def auto_scale(
    norm: Tensor, lr: Number, low: Tensor, ratio: Tensor, amp: Optional[Tensor] = None,
    base_amp: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    r"""``auto``'s rule: hard clipping, with a base step and a step length measured on the trajectory.

    .. math::

        \eta_b = \min\left(\eta, \frac{1}{\underline L}\right), \qquad
        \lambda = \frac{2}{\tilde r}, \qquad
        \eta_\text{eff} = \min\left(\eta_b, \frac{\lambda}{\lVert g\rVert}\right)
        \quad\Big(= \eta_b \min\big(1, \tfrac{\gamma}{\lVert g\rVert}\big),\ \gamma = \lambda/\eta_b\Big)

    with :math:`\underline L` the smallest smoothness measured so far and :math:`\tilde r` the median
    of :math:`\hat L_i / n_i` over the most recent pairs (:class:`~lightning_l0l1.estimator.EnvelopeState`).
    It is the clip shape of the :math:`(L_0, L_1)` step with :math:`L_0 = \underline L` and
    :math:`L_1 = \tilde r/2`: below :math:`\gamma` the descent-lemma step of the flattest curvature
    seen (the learning rate caps it), above it a step of length :math:`\lambda`. With a step
    amplification :math:`a` (SGD with momentum takes steps :math:`a` times longer than
    :math:`\eta s\lVert g\rVert`), both limits are on the step taken:
    :math:`\eta_\text{eff} = \min(\eta, 1/(a_b\underline L), \lambda/(a\lVert g\rVert))`, with
    :math:`a_b` the amplification the base step is divided by (:math:`a` unless given).
    ``docs/how-it-works.md`` gives the reasons for each choice and their measurements.

    Args:
        norm: the global gradient norm, a 0-d tensor.
        lr: the learning rate :math:`\eta`.
        low: the smallest smoothness seen (0-d; ``inf``: none yet, 0: the learning rate is used).
        ratio: the median ratio :math:`\tilde r \ge 0` (0-d; 0: none yet, nothing is clipped).
        amp: the step amplification :math:`a \ge 1` of the optimizer (0-d; ``None``: 1, plain SGD).
        base_amp: :math:`a_b`, the amplification for the base step (0-d; ``None``: ``amp``).

    Returns:
        ``(s, gamma)``: the factor with :math:`\eta s = \eta_\text{eff}` and the threshold in use
        (``inf`` while :math:`\tilde r = 0`: nothing is clipped, the base step alone bounds the step).

    Example:
        >>> s, gamma = auto_scale(torch.tensor(4.0), 10.0, torch.tensor(2.0), torch.tensor(1.0))
        >>> float(s * 10.0), float(gamma)  # eta_b = 1/2, lambda = 2: min(1/2, 2/4); gamma = 2/(1/2)
        (0.5, 4.0)
    """
    # A Python lr stays a Python scalar (a kernel argument): `torch.as_tensor(lr, device=cuda)` would be
    # a blocking host-to-device copy on every step.
    if isinstance(lr, Tensor):
        lr = lr.to(norm.device, norm.dtype)
    elif lr == 0:
        return torch.ones_like(norm), torch.full_like(norm, math.inf)
    low, ratio = low.to(norm.dtype), ratio.to(norm.dtype)
    if amp is not None:  # both limits are on the step taken, amp times the step set
        amp = amp.to(norm.dtype)
        low = low * (amp if base_amp is None else base_amp.to(norm.dtype))
        ratio = ratio * amp
    # 1/low: 0 while nothing is measured (low = inf) and inf for a flat pair (low = 0): the lr either way
    inv = torch.reciprocal(low)
    base = torch.where((inv > 0) & (inv < lr), inv, lr)
    # gamma = lambda / eta_b = 2 / (ratio * eta_b); ratio = 0 -> inf (no clipping)
    gamma = 2.0 / (ratio * base)
    # norm 0 -> gamma/0 = inf -> 1; norm inf -> 0; NaN stays NaN (the non-finite policy's business);
    # no ratio yet (gamma = inf) -> 1 whatever the norm (no inf/inf = NaN)
    factor = torch.where(torch.isinf(gamma), 1.0, torch.clamp(gamma / norm, max=1.0))
    scale = torch.where(base > 0, base / lr, 1.0) * factor  # base = 0 only for a zero (tensor) lr
    return scale, gamma


def auto_adaptive_scale(
    norm: Tensor, low: Tensor, ratio: Tensor, natural: Tensor, radius: Tensor, typical: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``auto``'s rule for optimizers that normalize the gradient (Adam, AdamW, RMSprop, ...).

    Such an optimizer's step does not scale with the gradient, so the two limits of the clip shape
    act on different things. The gradient that enters its moment estimates is clipped at the norm
    where the measured smoothness turns from flat to growing, and the step length is bounded through
    the learning rate:

    .. math::

        s = \min\left(1, \frac{\gamma}{\lVert g\rVert}\right),\
        \gamma = \max\left(\frac{2\underline L}{\tilde r}, \bar g\right)
        \qquad
        c = \min\left(1, \frac{\min(\rho_t, 2/\tilde r)}{\ell}\right)

    with :math:`\underline L`, :math:`\tilde r` as in :func:`auto_scale` (:math:`\gamma = L_0/L_1` for
    :math:`L_0 = \underline L`, :math:`L_1 = \tilde r/2`), :math:`\bar g` the typical gradient norm (an
    average of the recent ones), :math:`\ell` the length of the step the optimizer takes at its own
    learning rate (measured on the last step) and :math:`\rho_t` the trust radius. The floor
    :math:`\bar g` keeps the threshold from falling below the gradients the optimizer usually sees: an
    optimizer that normalizes the gradient takes the same steps when every gradient is scaled down,
    so a threshold below them would only change the balance of its moment estimates.

    Args:
        norm: the global gradient norm (0-d).
        low: the smallest smoothness seen (``inf``: none yet).
        ratio: the median ratio :math:`\tilde r` (0: none yet).
        natural: :math:`\ell`, the optimizer's step length at factor 1 (0-d, > 0).
        radius: :math:`\rho_t`, the step-length bound of the first steps (0-d).
        typical: :math:`\bar g`, the floor of the threshold (0-d; ``None`` or NaN: no floor).

    Returns:
        ``(s, gamma, c)``: the gradient factor, the threshold (``inf`` while nothing is measured: no
        clipping), and the learning-rate factor.

    Example:
        >>> s, gamma, c = auto_adaptive_scale(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(1.0),
        ...                                   natural=torch.tensor(8.0), radius=torch.tensor(100.0))
        >>> float(s), float(gamma), float(c)  # gamma = 2 * 1 / 1; the step limit 2 / 1 over the step 8
        (0.5, 2.0, 0.25)
    """
    dtype = norm.dtype
    low, ratio = low.to(dtype), ratio.to(dtype)
    measured = ratio > 0
    length = torch.where(measured, 2.0 / torch.where(measured, ratio, 1.0), math.inf)
    c = torch.clamp(torch.minimum(radius.to(dtype), length) / natural.to(dtype), max=1.0)
    gamma = torch.where(measured & torch.isfinite(low), 2.0 * low / torch.where(measured, ratio, 1.0), math.inf)
    if typical is not None:
        typical = typical.to(dtype)
        gamma = torch.maximum(gamma, torch.where(torch.isnan(typical), 0.0, typical))
    s = torch.where(torch.isinf(gamma), 1.0, torch.clamp(gamma / norm, max=1.0))
    return s, gamma, c
