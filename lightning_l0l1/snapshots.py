r"""What the estimator keeps of the previous step, to measure the secant of the step taken since.

The secant of step :math:`t` needs two numbers, :math:`\lVert g_{t+1} - g_t\rVert` and
:math:`\lVert\theta_{t+1} - \theta_t\rVert`. Two snapshots give them:

* :class:`SampledSnapshot` (the default) keeps a fraction of every tensor: blocks of
  :data:`SAMPLE_BLOCK` consecutive elements, one in :data:`SAMPLE_STRIDE` (a smaller stride for a tensor
  that would give fewer than :data:`SAMPLE_MIN_BLOCKS` blocks, and the whole tensor below
  ``SAMPLE_BLOCK * SAMPLE_MIN_BLOCKS`` elements), from an offset drawn anew at every snapshot, plus the
  elements after the last whole block. The norms of the differences are estimated from the sampled
  elements, each tensor's sampled blocks weighted by the inverse of the fraction sampled, so that the
  estimate of :math:`\lVert x\rVert_p^p` is unbiased over the offset. Memory: about
  ``2 / SAMPLE_STRIDE`` of the gradient bytes (3.1%) for large tensors. The offsets are a hash of the
  seed, the step and the tensor's position: every data-parallel rank samples the same elements, and a
  resumed run the same as an uninterrupted one.
* :class:`FullSnapshot` keeps every gradient and parameter: two gradient-sized buffers, the exact
  differences (and the only one :meth:`~lightning_l0l1.estimator.SecantEstimator.probe` can use).

Both form the differences and hand back tensors whose p-norm is the (estimated) norm of the
difference; :attr:`flat` says they are not shaped like the gradients, so that DTensor gradients
are reduced as flat shards (:meth:`~lightning_l0l1.gradients.Gradients.like`). Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "SAMPLE_BLOCK", "SAMPLE_MIN_BLOCKS", "SAMPLE_STRIDE", "FullSnapshot", "SampledSnapshot", "make_snapshot",
    "sample_offset",
]

#: Elements per sampled block (256 bytes of float32: whole cache lines).
SAMPLE_BLOCK = 64
#: One block in this many is kept: the sampled fraction of a large tensor.
SAMPLE_STRIDE = 64
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
        if not self.valid:
            return {}
        return {
            "grads": [t.detach().cpu().clone() for t in self.grads],
            "params": [t.detach().cpu().clone() for t in self.params],
            "norm": self.norm.detach().cpu().clone(),  # type: ignore[union-attr]
        }

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


def _flat(t: Tensor) -> Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


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
        block, stride, min_blocks: the block length, the largest sampling stride and the fewest blocks a
            sampled tensor gives (defaults :data:`SAMPLE_BLOCK`, :data:`SAMPLE_STRIDE`,
            :data:`SAMPLE_MIN_BLOCKS`).
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
        self.grads: list[Tensor] = []  # one 1-d buffer per tensor: the sampled blocks, then the tail
        self.params: list[Tensor] = []

    def clear(self) -> None:
        self.grads, self.params, self.layout, self.norm, self.step = [], [], (), None, -1

    def _stride(self, numel: int) -> int:
        """This tensor's sampling stride: ``stride``, less for a tensor that would give fewer than
        ``min_blocks`` blocks (1: the whole tensor)."""
        return max(1, min(self.stride, numel // self.block // self.min_blocks))

    def _plan(self, numel: int, index: int, step: int) -> tuple[int, int, int, int, float]:
        """``(offset, stride, sampled blocks k, elements kept, weight nb / k)``; ``k = 0``: all of it."""
        stride = self._stride(numel)
        if stride == 1:
            return 0, 1, 0, numel, 1.0
        nb = numel // self.block
        o = sample_offset(self.seed, step, index, stride)
        k = (nb - o + stride - 1) // stride
        return o, stride, k, k * self.block + numel - nb * self.block, nb / k

    def _capacity(self, numel: int) -> int:
        stride = self._stride(numel)
        if stride == 1:
            return numel
        nb = numel // self.block
        return -(-nb // stride) * self.block + numel - nb * self.block  # offset 0 keeps the most

    def _pairs(
        self, bufs: list[Tensor], tensors: list[Tensor], step: int
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[tuple[Tensor, float]]]:
        """Matching views of the buffers and of the tensors' sampled elements; each buffer's used part;
        and the buffers' block parts with their weights."""
        mine, theirs, used, weighted = [], [], [], []
        block = self.block
        for i, (b, t) in enumerate(zip(bufs, tensors)):
            flat = _flat(t)
            n = flat.numel()
            o, stride, k, kept, w = self._plan(n, i, step)
            if k == 0:
                whole = b[:kept]
                mine.append(whole)
                theirs.append(flat)
                used.append(whole)
                continue
            # the blocks o, o + stride, ... as one strided view: one op, no copy
            mine.append(b.as_strided((k, block), (block, 1)))
            theirs.append(flat.as_strided((k, block), (stride * block, 1), flat.storage_offset() + o * block))
            weighted.append((mine[-1], w))
            used.append(b[:kept])
            tail = n - (n // block) * block
            if tail:
                mine.append(b[k * block : kept])
                theirs.append(flat[n - tail :])
        return mine, theirs, used, weighted

    def differences(
        self, grads: list[Tensor], params: list[Tensor], norm_type: float
    ) -> tuple[list[Tensor], list[Tensor]]:
        """1-d tensors whose p-norm estimates ``||g_prev - g||`` and ``||p_prev - p||``, formed in the buffers."""
        out = []
        for bufs, cur in ((self.grads, grads), (self.params, params)):
            mine, theirs, used, weighted = self._pairs(bufs, cur, self.step)
            torch._foreach_sub_(mine, theirs)  # pyright: ignore[reportPrivateImportUsage]
            if weighted and not math.isinf(norm_type):
                torch._foreach_mul_(  # pyright: ignore[reportPrivateImportUsage]
                    [b for b, _ in weighted], [w ** (1.0 / norm_type) for _, w in weighted]
                )
            out.append(used)
        return out[0], out[1]

    def take(self, grads: list[Tensor], params: list[Tensor], norm: Tensor, step: int) -> None:
        layout = tuple(tuple(t.shape) for t in grads)
        if layout != self.layout or any(b.device != t.device for b, t in zip(self.grads, grads)):
            self.grads = [torch.empty(self._capacity(t.numel()), dtype=t.dtype, device=t.device) for t in grads]
            self.params = [torch.empty(self._capacity(t.numel()), dtype=t.dtype, device=t.device) for t in params]
            self.layout = layout
        for bufs, cur in ((self.grads, grads), (self.params, params)):
            mine, theirs, _, _ = self._pairs(bufs, cur, step)
            torch._foreach_copy_(mine, theirs)  # pyright: ignore[reportPrivateImportUsage]
        self.norm = norm.detach().clone()
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        if not self.valid:
            return {}
        return {
            "kind": self.kind,
            "seed": self.seed,
            "layout": [list(s) for s in self.layout],
            "grads": [t.detach().cpu().clone() for t in self.grads],
            "params": [t.detach().cpu().clone() for t in self.params],
            "norm": self.norm.detach().cpu().clone(),  # type: ignore[union-attr]
        }

    def load(self, sd: dict[str, Any], device: torch.device, step: int) -> None:
        """Restore :meth:`state_dict`; a full snapshot's (or one sampled with another seed) is dropped:
        the first step after resuming then forms no pair."""
        if not sd or sd.get("kind") != self.kind or int(sd.get("seed", -1)) != self.seed:
            self.clear()
            return
        self.grads = [t.to(device, copy=True) for t in sd["grads"]]
        self.params = [t.to(device, copy=True) for t in sd["params"]]
        self.layout = tuple(tuple(s) for s in sd["layout"])
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
