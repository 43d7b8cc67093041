r"""What the estimator keeps of the previous step, to measure the secant of the step taken since.

The secant of step :math:`t` needs two numbers, :math:`\lVert g_{t+1} - g_t\rVert` and
:math:`\lVert\theta_{t+1} - \theta_t\rVert`. Two snapshots give them:

* :class:`SampledSnapshot` (the default) keeps a fraction of every tensor: blocks of
  :data:`SAMPLE_BLOCK` consecutive elements, one in :data:`SAMPLE_STRIDE` (a smaller stride for a tensor
  that would give fewer than :data:`SAMPLE_MIN_BLOCKS` blocks, and the whole tensor below
  ``2 * SAMPLE_BLOCK * SAMPLE_MIN_BLOCKS`` elements), from an offset drawn anew at every snapshot, plus the
  elements after the last whole block. The norms of the differences are estimated from the sampled
  elements, each tensor's sampled blocks weighted by the inverse of the fraction sampled, so that the
  estimate of :math:`\lVert x\rVert_p^p` is unbiased over the offset. Memory: about
  ``2 / SAMPLE_STRIDE`` of the gradient bytes (1.6%) for large tensors. The offsets are a hash of the
  seed, the step and the tensor's position: every data-parallel rank samples the same elements, and a
  resumed run the same as an uninterrupted one.
* :class:`FullSnapshot` keeps every gradient and parameter: two gradient-sized buffers, the exact
  differences (and the only one :meth:`~lightning_l0l1.estimator.SecantEstimator.probe` can use).

Both form the differences and hand back tensors whose p-norm is the (estimated) norm of the
difference (the sampled one: one weighted norm per gradient); :attr:`flat` says they are not shaped
like the gradients, so that DTensor gradients
are reduced as flat shards (:meth:`~lightning_l0l1.gradients.Gradients.like`). Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor

from lightning_l0l1.norms import _per_tensor_norms as per_tensor_norms

__all__ = [
    "SAMPLE_BLOCK", "SAMPLE_MIN_BLOCKS", "SAMPLE_STRIDE", "FullSnapshot", "SampledSnapshot", "make_snapshot",
    "sample_offset",
]

#: Elements per sampled block (256 bytes of float32: whole cache lines).
SAMPLE_BLOCK = 64
#: One block in this many is kept: the sampled fraction of a large tensor.
SAMPLE_STRIDE = 128
#: A tensor gives at least this many blocks (a smaller stride), or is kept whole.
SAMPLE_MIN_BLOCKS = 64

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x`` (the same on every platform)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_offset(seed: int, step: int, index: int, stride: int) -> int:
    """The first sampled block, in ``[0, stride)``, of tensor ``index`` at ``step``: a hash, no RNG state."""
    return _mix(_mix(_mix(seed) ^ step) ^ index) % stride


def _total(tensors: list[Tensor], norm_type: float, factors: Optional[list[float]] = None) -> Tensor:
    """The p-norm of ``tensors`` together, in float32 (float64 if any is), on the first tensor's device
    (a model spread over several devices in one process), each tensor's p-norm multiplied by its entry
    in ``factors`` where given."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device
    norms = [n.to(device=device, dtype=acc) for n in per_tensor_norms(tensors, norm_type, acc, None)]
    if factors is not None and any(f != 1.0 for f in factors):
        norms = list(torch._foreach_mul(norms, factors))  # pyright: ignore[reportPrivateImportUsage]
    total: Tensor = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    return total


class _Snapshot:
    """What both snapshots share: the step they were taken at, the gradient norm there, the layout."""

    kind: ClassVar[str]
    #: the differences are not shaped like the gradients (1-d samples, or 1-element norms)
    flat: bool = False

    def __init__(self) -> None:
        self.layout: tuple[tuple[int, ...], ...] = ()
        self.norm: Optional[Tensor] = None  # ||g|| at the snapshot
        self.step = -1

    @property
    def valid(self) -> bool:
        return bool(self.layout)

    def matches(self, grads: list[Tensor]) -> bool:
        return self.valid and self.layout == tuple(tuple(g.shape) for g in grads)

    def differences(
        self, grads: list[Tensor], params: list[Tensor], norm_type: float
    ) -> tuple[list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def difference_norms(self, grads: list[Tensor], params: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
        """The (estimated) norms of ``g_prev - g`` and ``p_prev - p`` over the local tensors (0-d each): the
        global norms where every gradient is whole on this rank."""
        dg, dp = self.differences(grads, params, norm_type)
        return _total(dg, norm_type), _total(dp, norm_type)

    def _buffers_state(self, grads: list[Tensor], params: list[Tensor]) -> dict[str, Any]:
        """The buffers and the norm as CPU copies (``{}`` for an empty snapshot)."""
        if not self.valid or self.norm is None:
            return {}
        return {
            "grads": [t.detach().cpu().clone() for t in grads],
            "params": [t.detach().cpu().clone() for t in params],
            "norm": self.norm.detach().cpu().clone(),
        }


class FullSnapshot(_Snapshot):
    """The gradients and parameters of the previous estimation step, whole.

    One buffer per gradient and per parameter (two gradient-sized buffers in all), on the
    tensors' device or, with ``offload``, in (pinned, on CUDA) host memory: the difference
    is then formed one tensor at a time on the device, so the device holds at most one
    tensor-sized temporary, and copies are issued without blocking.
    """

    kind = "full"

    def __init__(self, offload: bool = False) -> None:
        super().__init__()
        self.requested_offload = offload
        self.offload = offload
        self.grads: list[Tensor] = []
        self.params: list[Tensor] = []

    @property
    def flat(self) -> bool:  # type: ignore[override]
        return self.offload

    def clear(self) -> None:
        self.grads, self.params, self.layout, self.norm, self.step = [], [], (), None, -1

    def differences(
        self, grads: list[Tensor], params: list[Tensor], norm_type: float
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Tensors whose p-norm is ``||g_prev - g||`` and ``||p_prev - p||``.

        On the device the differences are formed in the buffers themselves (no allocation).
        Offloaded, each difference is formed on the device, reduced to its norm and freed before
        the next one, and the 1-element norms are returned (their p-norm is the same).
        """
        if not self.offload:
            torch._foreach_sub_(self.grads, grads)  # pyright: ignore[reportPrivateImportUsage]
            torch._foreach_sub_(self.params, params)  # pyright: ignore[reportPrivateImportUsage]
            return self.grads, self.params

        def norms(bufs: list[Tensor], cur: list[Tensor]) -> list[Tensor]:
            out = []
            for b, t in zip(bufs, cur):
                d = b.to(t.device, non_blocking=True).sub_(t)
                acc = torch.float32 if d.dtype in (torch.float16, torch.bfloat16) else None
                out.append(torch.linalg.vector_norm(d, norm_type, dtype=acc).view(1))
            return out

        return norms(self.grads, grads), norms(self.params, params)

    def take(self, grads: list[Tensor], params: list[Tensor], norm: Tensor, step: int) -> None:
        layout = tuple(tuple(t.shape) for t in grads)
        if layout != self.layout:
            # Tensors already on the CPU gain nothing from offloading: use the in-place path.
            self.offload = self.requested_offload and any(t.device.type != "cpu" for t in grads)
            pin = self.offload and torch.cuda.is_available()
            dev = (lambda t: torch.device("cpu")) if self.offload else (lambda t: t.device)
            self.grads = [torch.empty(g.shape, dtype=g.dtype, device=dev(g), pin_memory=pin) for g in grads]
            self.params = [torch.empty(p.shape, dtype=p.dtype, device=dev(p), pin_memory=pin) for p in params]
            self.layout = layout
        if self.offload:
            for b, t in zip(self.grads + self.params, grads + params):
                b.copy_(t, non_blocking=True)
        else:
            torch._foreach_copy_(self.grads, grads)  # pyright: ignore[reportPrivateImportUsage]
            torch._foreach_copy_(self.params, params)  # pyright: ignore[reportPrivateImportUsage]
        self.norm = norm.detach().clone()
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return self._buffers_state(self.grads, self.params)

    def load(self, sd: dict[str, Any], device: torch.device, step: int) -> None:
        if not sd or sd.get("kind", "full") != self.kind:
            self.clear()
            return
        target = torch.device("cpu") if self.offload else device
        # copies: the buffers are modified in place, the caller's state dict must not be
        self.grads = [t.to(target, copy=True) for t in sd["grads"]]
        self.params = [t.to(target, copy=True) for t in sd["params"]]
        self.layout = tuple(tuple(t.shape) for t in self.grads)
        self.norm = sd["norm"].to(device)
        self.step = step

    def to(self, device: torch.device) -> None:
        """Move the buffers to ``device`` (offloaded ones stay in host memory)."""
        if not self.offload:
            self.grads = [t.to(device) for t in self.grads]
            self.params = [t.to(device) for t in self.params]
        if self.norm is not None:
            self.norm = self.norm.to(device)


class SampledSnapshot(_Snapshot):
    """The sampled elements of the gradients and parameters of the previous estimation step.

    Per tensor of ``n`` elements, ``nb = n // block`` whole blocks and the stride
    ``r = min(stride, nb // min_blocks)``: if ``r <= 1`` the whole tensor; otherwise the blocks
    ``o, o + r, ...`` (``k`` of them, ``o`` from :func:`sample_offset`) and the ``n - nb * block``
    elements after the last whole block. The sampled blocks' difference is multiplied by
    ``(nb / k) ** (1/p)`` (1 for the max-norm), so the p-norm of the returned tensors estimates the
    p-norm of the whole difference.

    Args:
        seed: the offsets' seed (kept in the checkpoint).
        block: the block length (default :data:`SAMPLE_BLOCK`).
        stride: the largest sampling stride (default :data:`SAMPLE_STRIDE`).
        min_blocks: the fewest blocks a sampled tensor gives (default :data:`SAMPLE_MIN_BLOCKS`).
    """

    kind = "sampled"
    flat = True

    def __init__(
        self, seed: int = 0, block: Optional[int] = None, stride: Optional[int] = None, min_blocks: Optional[int] = None
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.block = int(block or SAMPLE_BLOCK)
        self.stride = int(stride or SAMPLE_STRIDE)
        self.min_blocks = int(min_blocks or SAMPLE_MIN_BLOCKS)
        # per tensor: a buffer of its shape (kept whole), or a 1-d one for the sampled blocks, then the tail
        self.grads: list[Tensor] = []
        self.params: list[Tensor] = []
        self._strides: list[int] = []  # per tensor: its sampling stride (1: whole)
        self._plan: list[tuple[int, int]] = []  # per tensor: (first block, blocks kept) at the snapshot

    def clear(self) -> None:
        self.grads, self.params, self.layout, self.norm, self.step = [], [], (), None, -1
        self._plan = []

    def _plan_for(self, step: int) -> list[tuple[int, int]]:
        """Per tensor, the first sampled block and the number of blocks kept at ``step`` (``(0, 0)``: whole)."""
        plan = []
        for i, (shape, stride) in enumerate(zip(self.layout, self._strides)):
            if stride == 1:
                plan.append((0, 0))
                continue
            nb = math.prod(shape) // self.block
            o = sample_offset(self.seed, step, i, stride)
            plan.append((o, (nb - o + stride - 1) // stride))
        return plan

    def _stride(self, numel: int) -> int:
        """This tensor's sampling stride: ``stride``, less for a tensor that would give fewer than
        ``min_blocks`` blocks (1: the whole tensor)."""
        return max(1, min(self.stride, numel // self.block // self.min_blocks))

    def _buffer(self, t: Tensor) -> Tensor:
        """A tensor kept whole gets a buffer of its shape; a sampled one a 1-d buffer for the most it samples."""
        stride = self._stride(t.numel())
        if stride == 1:
            return torch.empty(t.shape, dtype=t.dtype, device=t.device)
        nb = t.numel() // self.block
        size = -(-nb // stride) * self.block + t.numel() - nb * self.block  # offset 0 keeps the most
        return torch.empty(size, dtype=t.dtype, device=t.device)

    def _pairs(
        self, bufs: list[Tensor], tensors: list[Tensor], plan: list[tuple[int, int]]
    ) -> tuple[list[tuple[list[Tensor], list[Tensor]]], list[Tensor], list[float]]:
        """Matching lists of buffers and tensors (whole tensors in one pair of lists, sampled views in
        another, so each goes to one ``_foreach`` call); the parts of the buffers in use and their
        weights (the sampled blocks ``nb / k``; the tails and whole tensors 1)."""
        whole_mine, whole_theirs, mine, theirs, used, weights = [], [], [], [], [], []
        block = self.block
        for b, t, stride, (o, k) in zip(bufs, tensors, self._strides, plan):
            if stride == 1:  # kept whole: no view, a contiguous foreach
                whole_mine.append(b)
                whole_theirs.append(t)
                used.append(b)
                weights.append(1.0)
                continue
            flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
            n = flat.numel()
            nb = n // block
            # the blocks o, o + stride, ... as one strided view: one op, no copy
            mine.append(b.as_strided((k, block), (block, 1)))
            theirs.append(flat.as_strided((k, block), (stride * block, 1), flat.storage_offset() + o * block))
            used.append(mine[-1])
            weights.append(nb / k)
            tail = n - nb * block
            if tail:
                mine.append(b[k * block : k * block + tail])
                theirs.append(flat[n - tail :])
                used.append(mine[-1])
                weights.append(1.0)
        return [(whole_mine, whole_theirs), (mine, theirs)], used, weights

    def _subtract(self, grads: list[Tensor], params: list[Tensor]) -> list[tuple[list[Tensor], list[float]]]:
        """Form ``prev - cur`` in the buffers' parts in use; per side, those parts and their weights."""
        out = []
        for bufs, cur in ((self.grads, grads), (self.params, params)):
            pairs, used, weights = self._pairs(bufs, cur, self._plan)
            for mine, theirs in pairs:
                if mine:
                    torch._foreach_sub_(mine, theirs)  # pyright: ignore[reportPrivateImportUsage]
            out.append((used, weights))
        return out

    def _factors(self, weights: list[float], norm_type: float) -> list[float]:
        """What each part's p-norm is multiplied by: ``w ** (1/p)`` (1 for the max-norm)."""
        return [1.0] * len(weights) if math.isinf(norm_type) else [w ** (1.0 / norm_type) for w in weights]

    def differences(
        self, grads: list[Tensor], params: list[Tensor], norm_type: float
    ) -> tuple[list[Tensor], list[Tensor]]:
        """1-element tensors, one per gradient, whose p-norm estimates ``||g_prev - g||`` and
        ``||p_prev - p||``: the differences are formed in the buffers and reduced to weighted norms
        (``(w ||x_S||_p^p + ||x_tail||_p^p)^(1/p)``; the max-norm is not weighted)."""
        out = []
        for used, weights in self._subtract(grads, params):
            acc = torch.float64 if any(t.dtype == torch.float64 for t in used) else torch.float32
            norms = [n.to(acc) for n in per_tensor_norms(used, norm_type, acc, None)]
            scaled = [(n, f) for n, f in zip(norms, self._factors(weights, norm_type)) if f != 1.0]
            if scaled:
                torch._foreach_mul_([n for n, _ in scaled], [f for _, f in scaled])  # pyright: ignore[reportPrivateImportUsage]
            per_gradient, j = [], 0
            for stride, shape in zip(self._strides, self.layout):
                # a sampled tensor with a tail has two parts
                c = 2 if stride > 1 and math.prod(shape) % self.block else 1
                part = norms[j] if c == 1 else torch.linalg.vector_norm(torch.stack(norms[j : j + c]), norm_type)
                per_gradient.append(part.view(1))
                j += c
            out.append(per_gradient)
        return out[0], out[1]

    def difference_norms(self, grads: list[Tensor], params: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
        # every part's weighted p-norm goes straight into one total: no per-gradient grouping
        (gu, gw), (pu, pw) = self._subtract(grads, params)
        return _total(gu, norm_type, self._factors(gw, norm_type)), _total(pu, norm_type, self._factors(pw, norm_type))

    def take(self, grads: list[Tensor], params: list[Tensor], norm: Tensor, step: int) -> None:
        layout = tuple(tuple(t.shape) for t in grads)
        if layout != self.layout or any(b.device != t.device for b, t in zip(self.grads, grads)):
            self.grads = [self._buffer(t) for t in grads]
            self.params = [self._buffer(t) for t in params]
            self.layout = layout
            self._strides = [self._stride(t.numel()) for t in grads]
        self._plan = self._plan_for(step)
        for bufs, cur in ((self.grads, grads), (self.params, params)):
            pairs, *_ = self._pairs(bufs, cur, self._plan)
            for mine, theirs in pairs:
                if mine:
                    torch._foreach_copy_(mine, theirs)  # pyright: ignore[reportPrivateImportUsage]
        self.norm = norm.detach().clone()
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        out = self._buffers_state(self.grads, self.params)
        if out:
            out.update(kind=self.kind, seed=self.seed, layout=[list(s) for s in self.layout])
        return out

    def load(self, sd: dict[str, Any], device: torch.device, step: int) -> None:
        """Restore :meth:`state_dict`; a full snapshot's (or one sampled with another seed) is dropped:
        the first step after resuming then forms no pair."""
        if not sd or sd.get("kind") != self.kind or int(sd.get("seed", -1)) != self.seed:
            self.clear()
            return
        self.grads = [t.to(device, copy=True) for t in sd["grads"]]
        self.params = [t.to(device, copy=True) for t in sd["params"]]
        self.layout = tuple(tuple(s) for s in sd["layout"])
        self._strides = [self._stride(math.prod(shape)) for shape in self.layout]
        self._plan = self._plan_for(step)
        self.norm = sd["norm"].to(device)
        self.step = step

    def to(self, device: torch.device) -> None:
        self.grads = [t.to(device) for t in self.grads]
        self.params = [t.to(device) for t in self.params]
        if self.norm is not None:
            self.norm = self.norm.to(device)


Snapshot = Union[FullSnapshot, SampledSnapshot]


def make_snapshot(kind: str, offload: bool = False, seed: int = 0) -> Snapshot:
    """A new, empty snapshot of ``kind`` (``"sampled"`` or ``"full"``)."""
    return SampledSnapshot(seed) if kind == "sampled" else FullSnapshot(offload)
