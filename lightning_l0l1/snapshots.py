r"""What the estimator keeps of the previous step, to measure the secant of the step taken since.

The secant of step :math:`t` needs two numbers, :math:`\lVert g_{t+1} - g_t\rVert` and
:math:`\lVert\theta_{t+1} - \theta_t\rVert`. Two snapshots give them:

* :class:`SampledSnapshot` (the default) keeps a fraction of every tensor: blocks of
  :data:`SAMPLE_BLOCK` consecutive elements, one in :data:`SAMPLE_STRIDE` (a smaller stride for a tensor
  that would give fewer than :data:`SAMPLE_MIN_BLOCKS` blocks, and the whole tensor below
  ``2 * SAMPLE_BLOCK * SAMPLE_MIN_BLOCKS`` elements), from an offset drawn anew at every snapshot, plus the
  elements after the last whole block. The norms of the differences are estimated from the sampled
  elements, each tensor's sampled blocks weighted by the inverse of the fraction sampled, so that the
  estimate of :math:`\lVert x\rVert_p^p` is unbiased over the offset. The samples of all tensors of
  one dtype share one buffer of whole blocks, and the current step's sample is gathered into a second
  one, so that a step's device work is a few operations whatever the number of tensors. Memory: about
  ``4 / SAMPLE_STRIDE`` of the gradient bytes (3.1%) for large tensors, the two buffers together.
  The offsets are a hash of the seed, the step and the tensor's position: every data-parallel rank
  samples the same elements, and a resumed run the same as an uninterrupted one.
* :class:`FullSnapshot` keeps every gradient and parameter: two gradient-sized buffers, the exact
  differences (and the only one :meth:`~lightning_l0l1.estimator.SecantEstimator.probe` can use).

Both form the differences in their buffers (the sampled one in its second buffer, leaving the snapshot as
it was). :meth:`~_Snapshot.difference_norms` gives the two
(estimated) norms at once; :meth:`~_Snapshot.differences` gives, per gradient, a tensor whose p-norm is
its part of them (the sampled one: one weighted 1-element norm per gradient), for gradients that are
reduced over ranks; :attr:`flat` says they are not shaped like the gradients, so that DTensor gradients
are reduced as flat shards (:meth:`~lightning_l0l1.gradients.Gradients.like`). Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor

from lightning_l0l1.norms import _acc_dtype, _norm_dtype, _reduce
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


def _total(tensors: list[Tensor], norm_type: float) -> Tensor:
    """The p-norm of ``tensors`` together, in float32 (float64 if any is), on the first tensor's device
    (a model spread over several devices in one process)."""
    acc = _acc_dtype(tensors)
    return _reduce(per_tensor_norms(tensors, norm_type, acc, None), norm_type, tensors[0].device, acc)


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

    def difference_norms(self, grads: list[Tensor], params: list[Tensor], norm_type: float) -> Tensor:
        """The (estimated) norms of ``g_prev - g`` and ``p_prev - p`` over the local tensors, as one
        2-element tensor: the global norms where every gradient is whole on this rank."""
        dg, dp = self.differences(grads, params, norm_type)
        return torch.stack([_total(dg, norm_type), _total(dp, norm_type)])

    def partial_difference_norms(
        self, grads: list[Optional[Tensor]], params: list[Optional[Tensor]], norm_type: float
    ) -> Tensor:
        """:meth:`difference_norms` over some of the snapshot's tensors only: ``grads[i]``/``params[i]``
        is the current tensor of the snapshot's tensor ``i``, ``None`` for one left out (a parameter that
        has no gradient now); a side with none given has norm 0. The snapshot is left as it was (the
        differences are formed elsewhere), so that it can still serve a later pair."""
        raise NotImplementedError


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
        return self._differences(self.grads, self.params, grads, params, norm_type)

    def _differences(
        self, buf_grads: list[Tensor], buf_params: list[Tensor], grads: list[Tensor], params: list[Tensor],
        norm_type: float, inplace: bool = True,
    ) -> tuple[list[Tensor], list[Tensor]]:
        if not self.offload and not inplace:
            return ([b - t for b, t in zip(buf_grads, grads)], [b - t for b, t in zip(buf_params, params)])
        if not self.offload:
            torch._foreach_sub_(buf_grads, grads)  # pyright: ignore[reportPrivateImportUsage]
            torch._foreach_sub_(buf_params, params)  # pyright: ignore[reportPrivateImportUsage]
            return buf_grads, buf_params

        def norms(bufs: list[Tensor], cur: list[Tensor]) -> list[Tensor]:
            out = []
            for b, t in zip(bufs, cur):
                d = b.to(t.device, non_blocking=True).sub_(t)
                acc = torch.float32 if d.dtype in (torch.float16, torch.bfloat16) else None
                out.append(torch.linalg.vector_norm(d, norm_type, dtype=acc).view(1))
            return out

        return norms(buf_grads, grads), norms(buf_params, params)

    def partial_difference_norms(
        self, grads: list[Optional[Tensor]], params: list[Optional[Tensor]], norm_type: float
    ) -> Tensor:
        kg = [i for i, g in enumerate(grads) if g is not None]
        kp = [i for i, p in enumerate(params) if p is not None]
        dg, dp = self._differences([self.grads[i] for i in kg], [self.params[i] for i in kp],
                                   [grads[i] for i in kg], [params[i] for i in kp],  # type: ignore[misc]
                                   norm_type, inplace=False)
        zero = self.norm.new_zeros(()) if self.norm is not None else torch.zeros(())
        return torch.stack([_total(dg, norm_type) if dg else zero, _total(dp, norm_type) if dp else zero])

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

    @property
    def nbytes(self) -> int:
        """The bytes the snapshot holds (on the device, or in host memory when offloaded)."""
        return sum(t.numel() * t.element_size() for t in self.grads + self.params)

    def state_dict(self) -> dict[str, Any]:
        """The buffers and the norm as CPU copies (``{}`` for an empty snapshot)."""
        if not self.valid or self.norm is None:
            return {}
        return {
            "grads": [t.detach().cpu().clone() for t in self.grads],
            "params": [t.detach().cpu().clone() for t in self.params],
            "norm": self.norm.detach().cpu().clone(),
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


#: A tensor's gradient dtype, parameter dtype and device.
_Signature = tuple[torch.dtype, torch.dtype, torch.device]
#: What a gather needs of one group and buffer whatever the plan (see ``SampledSnapshot._fixed``).
_Fixed = tuple[list[int], list[int], list[Tensor], list[Tensor], list[Tensor]]


@dataclass(frozen=True)
class _Slot:
    """Where one tensor's sample lives and how it is sampled.

    ``stride == 1``: kept whole, over ``ceil(numel / block)`` blocks. Otherwise ``kmax = ceil(nb / stride)``
    blocks: the ``q = nb // stride`` of its *run* (every offset has them), the *extra* block (an offset below
    ``nb - q * stride`` has one more; none when ``nb`` is a whole number of strides), then one block for the
    ``tail`` elements after the last whole block.

    ``start`` is the tensor's first block in the *canonical* order: per tensor, its blocks (whole), or its
    ``kmax`` blocks then its tail block (sampled); the order the norms are reduced in and checkpoints keep.
    ``at``, ``extra`` and ``tail_at`` are where its run (or its whole blocks), its extra block and its tail
    block are in the buffers (-1: none), laid out so that the runs of all tensors come first, in one piece.
    """

    group: int
    start: int
    numel: int
    stride: int
    nb: int
    kmax: int
    tail: int
    at: int = 0
    q: int = 0
    extra: int = -1
    tail_at: int = -1


class _Group:
    """The buffers of the tensors of one dtype on one device.

    ``buffer`` (the snapshot) and ``scratch`` (the current step's sample, then the difference) each hold
    ``2 * blocks`` blocks, zero-initialised: the gradients' blocks, then the parameters' in the same layout.
    Per side, the first ``runs`` blocks are the runs of the sampled tensors, one after the other, so that one
    ``cat`` of strided views fills them; the extra, tail and whole blocks follow. ``order`` maps each block of
    the canonical order to its place in the buffers (``None``: the same place). The blocks past a tensor's
    data (the end of a whole tensor, of a tail) stay zero and add nothing to a norm.
    """

    def __init__(
        self, members: list[int], blocks: int, runs: int, order: list[int], block: int, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.members, self.blocks, self.runs = members, blocks, runs
        self.buffer = torch.zeros(2 * blocks * block, dtype=dtype, device=device)
        self.scratch = torch.zeros_like(self.buffer)
        identity = order == list(range(blocks))
        index_dtype = torch.int32 if blocks < 2**31 else torch.int64
        self.order = None if identity else torch.tensor(order, dtype=index_dtype, device=device)
        self.ordered: Optional[Tensor] = None  # the block norms in the canonical order (made at first use, kept)

    @property
    def acc(self) -> torch.dtype:
        """The dtype its norms are accumulated in."""
        return torch.float64 if self.buffer.dtype == torch.float64 else torch.float32

    @property
    def nbytes(self) -> int:
        order = 0 if self.order is None else self.order.numel() * self.order.element_size()
        return 2 * self.buffer.numel() * self.buffer.element_size() + order

    def to(self, device: torch.device) -> None:
        self.buffer, self.scratch = self.buffer.to(device), self.scratch.to(device)
        if self.order is not None:
            self.order = self.order.to(device)
        self.ordered = None


class SampledSnapshot(_Snapshot):
    """The sampled elements of the gradients and parameters of the previous estimation step.

    Per tensor of ``n`` elements, ``nb = n // block`` whole blocks and the stride
    ``r = min(stride, nb // min_blocks)``: if ``r <= 1`` the whole tensor; otherwise the blocks
    ``o, o + r, ...`` (``k`` of them, ``o`` from :func:`sample_offset`) and the ``n - nb * block``
    elements after the last whole block. The sampled blocks' p-th powers are weighted by ``nb / k``
    (the max-norm is not weighted), so the p-norm of the returned values estimates the p-norm of the
    whole difference.

    The samples of all tensors of one dtype and device share one buffer of whole blocks (the
    gradients', then the parameters'), and the current step's sample is gathered into a second one of the
    same layout, so that the device work of a step does not grow with the number of tensors: the strided
    blocks of every tensor are gathered by one ``cat`` per group and side (torch's batched kernel on a GPU,
    up to 64 tensors per launch), the whole tensors, tails and extra blocks by one multi-tensor copy, and
    the difference and its norms are a few operations on the buffers. Where a group's gradients or
    parameters differ in dtype from its buffer (FSDP's low-precision gradients of float32 parameters,
    kept in float32), torch's batched kernels do not apply and the gather takes one copy per tensor.

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
        self._slots: list[_Slot] = []
        self._groups: list[_Group] = []
        # per tensor: (gradient dtype, parameter dtype, device), what the layout was made for
        self._signature: tuple[_Signature, ...] = ()
        self._plan: list[tuple[int, int]] = []  # per tensor: (first block, blocks kept) at the snapshot
        self._kept: Optional[tuple[int, ...]] = None  # per tensor: the blocks kept at the current plan
        self._views: dict[tuple[str, int, str, int], Tensor] = {}  # parts of the buffers, made once
        self._fixed_parts: dict[tuple[str, int], _Fixed] = {}  # per buffer and group: see _fixed
        self._weights: Optional[tuple[float, list[tuple[Tensor, Tensor]]]] = None  # (p, per group)

    def clear(self) -> None:
        self.layout, self.norm, self.step = (), None, -1
        self._slots, self._groups, self._signature, self._plan = [], [], (), []
        self._kept, self._views, self._fixed_parts, self._weights = None, {}, {}, None

    @property
    def nbytes(self) -> int:
        """The bytes the snapshot's buffers hold (the snapshot, the current sample and the block order)."""
        return sum(g.nbytes for g in self._groups)

    # -- layout ------------------------------------------------------------------------------

    def _stride(self, numel: int) -> int:
        """This tensor's sampling stride: ``stride``, less for a tensor that would give fewer than
        ``min_blocks`` blocks (1: the whole tensor)."""
        return max(1, min(self.stride, numel // self.block // self.min_blocks))

    def _allocate(self, shapes: list[tuple[int, ...]], signature: list[_Signature]) -> None:
        """Lay the tensors' samples out in one buffer per dtype and device (zeros). A gradient and its
        parameter share a dtype as a rule; where they do not (FSDP's low-precision gradients of float32
        parameters) both are kept in the wider one, which holds either exactly."""
        self.clear()
        block = self.block
        by_key: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, (grad_dtype, param_dtype, device) in enumerate(signature):
            by_key.setdefault((torch.promote_types(grad_dtype, param_dtype), device), []).append(i)
        slots: dict[int, _Slot] = {}
        for g, ((dtype, device), members) in enumerate(by_key.items()):
            canonical: dict[int, tuple[int, int, int, int, int, int, int]] = {}
            start = 0
            for i in members:
                numel = math.prod(shapes[i])
                stride, nb = self._stride(numel), numel // block
                if stride == 1:
                    kmax, tail, count = 0, 0, -(-numel // block)
                else:
                    kmax, tail = -(-nb // stride), numel - nb * block
                    count = kmax + (1 if tail else 0)
                canonical[i] = (start, numel, stride, nb, kmax, tail, count)
                start += count
            # where each part goes: the runs, then the extra blocks, the tails, the whole tensors
            sampled = [i for i in members if canonical[i][2] > 1]
            at, pos = {}, 0
            for i in sampled:
                at[i] = pos
                pos += canonical[i][3] // canonical[i][2]
            runs = pos
            extra = {}
            for i in sampled:
                if canonical[i][4] > canonical[i][3] // canonical[i][2]:
                    extra[i], pos = pos, pos + 1
            tail_at = {}
            for i in sampled:
                if canonical[i][5]:
                    tail_at[i], pos = pos, pos + 1
            for i in members:
                if canonical[i][2] == 1:
                    at[i], pos = pos, pos + canonical[i][6]
            order = [0] * start
            for i in members:
                first, numel, stride, nb, kmax, tail, count = canonical[i]
                q = nb // stride if stride > 1 else count
                for j in range(q):
                    order[first + j] = at[i] + j
                if i in extra:
                    order[first + q] = extra[i]
                if i in tail_at:
                    order[first + kmax] = tail_at[i]
                slots[i] = _Slot(g, first, numel, stride, nb, kmax, tail, at[i], q if stride > 1 else 0,
                                 extra.get(i, -1), tail_at.get(i, -1))
            self._groups.append(_Group(members, start, runs, order, block, dtype, device))
        self._slots = [slots[i] for i in range(len(shapes))]
        self.layout = tuple(shapes)
        self._signature = tuple(signature)

    def _part(self, which: str, side: int, kind: str, i: int) -> Tensor:
        """A part of buffer ``which`` (``"buffer"`` or ``"scratch"``), side ``side`` (0 gradients, 1 parameters):
        ``"runs"`` (``i``: the group), all the runs as ``(runs, block)``; ``"whole"``, tensor ``i`` shaped like
        it; ``"run"``, its run as ``(q, block)``; ``"extra"``, its extra block; ``"tail"``, its tail."""
        key = (which, side, kind, i)
        view = self._views.get(key)
        if view is None:
            b = self.block
            if kind == "runs":
                grp = self._groups[i]
                base = side * grp.blocks * b
                view = getattr(grp, which)[base : base + grp.runs * b].view(grp.runs, b)
            else:
                s = self._slots[i]
                grp = self._groups[s.group]
                buf, base = getattr(grp, which), side * grp.blocks * b
                if kind == "whole":
                    view = buf[base + s.at * b : base + s.at * b + s.numel].view(self.layout[i])
                elif kind == "run":
                    view = buf[base + s.at * b : base + (s.at + s.q) * b].view(s.q, b)
                elif kind == "extra":
                    view = buf[base + s.extra * b : base + (s.extra + 1) * b]
                else:
                    view = buf[base + s.tail_at * b : base + s.tail_at * b + s.tail]
            self._views[key] = view
        return view

    # -- the sample ----------------------------------------------------------------------------

    def _set_plan(self, step: int) -> None:
        """Draw the sample of ``step``: per tensor, the first sampled block and the number of blocks kept
        (``(0, 0)``: whole)."""
        plan: list[tuple[int, int]] = []
        for i, s in enumerate(self._slots):
            if s.stride == 1:
                plan.append((0, 0))
                continue
            o = sample_offset(self.seed, step, i, s.stride)
            plan.append((o, (s.nb - o + s.stride - 1) // s.stride))
        self._plan = plan
        kept = tuple(k for _, k in plan)
        if kept != self._kept:
            self._kept, self._weights = kept, None

    def _sampled_views(self, t: Tensor, i: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Tensor ``i``'s sample at the current plan, as strided views of ``t`` (no copy): its run
        ``(q, block)``, its extra block (``None`` when this offset has none) and its tail (``None``: none)."""
        s, (o, k) = self._slots[i], self._plan[i]
        b = self.block
        if not t.is_contiguous():  # a copy; gradients and parameters are contiguous as a rule
            t = t.contiguous()
        base = t.storage_offset()
        run = t.as_strided((s.q, b), (s.stride * b, 1), base + o * b)
        extra = t.as_strided((b,), (1,), base + (o + s.q * s.stride) * b) if k > s.q else None
        tail = t.as_strided((s.tail,), (1,), base + s.nb * b) if s.tail else None
        return run, extra, tail

    def _fixed(self, which: str, g: int) -> _Fixed:
        """What :meth:`_gather` needs of group ``g`` and buffer ``which`` whatever the plan (made once): the
        tensors kept whole, the sampled ones, the parts the whole tensors and the tails go to (both sides),
        and the two sides' runs."""
        fixed = self._fixed_parts.get((which, g))
        if fixed is None:
            grp = self._groups[g]
            whole = [i for i in grp.members if self._slots[i].stride == 1]
            sampled = [i for i in grp.members if self._slots[i].stride > 1]
            dst = [self._part(which, side, "whole", i) for side in (0, 1) for i in whole]
            tails = [self._part(which, side, "tail", i) for side in (0, 1) for i in sampled if self._slots[i].tail]
            runs = [self._part(which, side, "runs", g) for side in (0, 1)]
            fixed = self._fixed_parts[(which, g)] = (whole, sampled, dst, tails, runs)
        return fixed

    @torch.no_grad()
    def _gather(self, which: str, grads: list[Tensor], params: list[Tensor]) -> None:
        """Copy the current plan's sample of ``grads`` and ``params`` into buffer ``which``: per group and
        side one ``cat`` of the runs, and one multi-tensor copy of the rest (all of it dense)."""
        b = self.block
        for g in range(len(self._groups)):
            whole, sampled, dst, tails, runs_out = self._fixed(which, g)
            dst = list(dst)
            src = [grads[i] for i in whole] + [params[i] for i in whole]
            extra_dst: list[Tensor] = []
            extra_src: list[Tensor] = []
            tail_src: list[Tensor] = []
            for side, tensors in ((0, grads), (1, params)):
                runs: list[Tensor] = []
                for i in sampled:
                    t = tensors[i]
                    if not t.is_contiguous():  # a copy; gradients and parameters are contiguous as a rule
                        t = t.contiguous()
                    s, (o, k) = self._slots[i], self._plan[i]
                    base = t.storage_offset()
                    runs.append(t.as_strided((s.q, b), (s.stride * b, 1), base + o * b))
                    if k > s.q:
                        extra_dst.append(self._part(which, side, "extra", i))
                        extra_src.append(t.as_strided((b,), (1,), base + (o + s.q * s.stride) * b))
                    if s.tail:
                        tail_src.append(t.as_strided((s.tail,), (1,), base + s.nb * b))
                if len(runs) == 1:
                    runs_out[side].copy_(runs[0])
                elif runs:
                    torch.cat(runs, out=runs_out[side])
            dst += tails + extra_dst
            src += tail_src + extra_src
            if dst:
                torch._foreach_copy_(dst, src)  # pyright: ignore[reportPrivateImportUsage]

    @torch.no_grad()
    def _difference(self) -> None:
        """``scratch = buffer - scratch``: the previous sample minus the current one."""
        for grp in self._groups:
            torch.sub(grp.buffer, grp.scratch, out=grp.scratch)

    def _block_weights(self, norm_type: float) -> list[tuple[Tensor, Tensor]]:
        """Per group, in the canonical order, what each block's norm is multiplied by (``(nb / k) ** (1/p)``
        for a sampled block, 1 for the others and for the max-norm, 0 for a block out of use at the current
        plan: a tensor's extra block when it keeps ``q``) and where it is 0. Made on the device from Python
        numbers (no host-to-device copy); rebuilt only when the numbers of blocks kept change (never, when
        every sampled tensor is a whole number of strides)."""
        if self._weights is not None and self._weights[0] == norm_type:
            return self._weights[1]
        out = []
        for grp in self._groups:
            factors = torch.ones(grp.blocks, dtype=grp.acc, device=grp.buffer.device)
            sampled, weights, unused = [], [], []
            for i in grp.members:
                s, k = self._slots[i], self._plan[i][1]
                if s.stride == 1:
                    continue
                sampled.append(factors[s.start : s.start + k])
                weights.append(1.0 if math.isinf(norm_type) else (s.nb / k) ** (1.0 / norm_type))
                if k < s.kmax:
                    unused.append(factors[s.start + k : s.start + s.kmax])
            if sampled:
                torch._foreach_mul_(sampled, weights)  # pyright: ignore[reportPrivateImportUsage]
            if unused:
                torch._foreach_zero_(unused)  # pyright: ignore[reportPrivateImportUsage]
            out.append((factors, factors == 0))
        self._weights = (norm_type, out)
        return out

    def _block_norms(self, norm_type: float) -> list[Tensor]:
        """Per group, the weighted p-norm of every block of ``scratch`` in use (0 for the others),
        ``(2, blocks)`` in the canonical order."""
        out = []
        for grp, (factor, unused) in zip(self._groups, self._block_weights(norm_type)):
            buffer = grp.scratch
            blocks = buffer.view(2 * grp.blocks, self.block)
            norms = torch.linalg.vector_norm(blocks, norm_type, dim=1,
                                             dtype=_norm_dtype(buffer.device, buffer.dtype, grp.acc))
            norms = norms.to(grp.acc).view(2, grp.blocks)
            if grp.order is not None:  # into a kept tensor: no allocation per step
                if grp.ordered is None or grp.ordered.dtype != norms.dtype:
                    grp.ordered = torch.empty_like(norms)
                norms = torch.index_select(norms, 1, grp.order, out=grp.ordered)
            # filled, not multiplied by 0: a block out of use may hold a stale non-finite value
            out.append(norms.mul_(factor).masked_fill_(unused, 0.0))
        return out

    def _sides(self, norm_type: float) -> Tensor:
        # (a group of empty tensors only has no block: its norms are 0)
        sides: list[Tensor] = [torch.linalg.vector_norm(n, norm_type, dim=1) if n.shape[1] else n.new_zeros(2)
                               for n in self._block_norms(norm_type)]
        return sides[0] if len(sides) == 1 else _combine(sides, norm_type)

    def difference_norms(self, grads: list[Tensor], params: list[Tensor], norm_type: float) -> Tensor:
        self._gather("scratch", grads, params)
        self._difference()
        return self._sides(norm_type)

    @torch.no_grad()
    def partial_difference_norms(
        self, grads: list[Optional[Tensor]], params: list[Optional[Tensor]], norm_type: float
    ) -> Tensor:
        """The differences of the kept tensors are formed as in :meth:`difference_norms` and those of the
        tensors left out are zero (a zero block adds nothing to a norm), so the estimate is over the kept
        tensors' samples, each weighted as before. The snapshot is not modified (only ``scratch`` is)."""
        dst: list[Tensor] = []
        src: list[Tensor] = []
        out: list[Tensor] = []
        for side, tensors in ((0, grads), (1, params)):
            for i, (t, s) in enumerate(zip(tensors, self._slots)):
                if s.stride == 1:
                    parts = [self._part("scratch", side, "whole", i)]
                    cur: list[Optional[Tensor]] = [t]
                else:
                    run, extra, tail = self._sampled_views(t, i) if t is not None else (None, None, None)
                    parts = [self._part("scratch", side, "run", i)]
                    cur = [run]
                    if self._plan[i][1] > s.q:
                        parts.append(self._part("scratch", side, "extra", i))
                        cur.append(extra)
                    if s.tail:
                        parts.append(self._part("scratch", side, "tail", i))
                        cur.append(tail)
                if t is None:
                    out += parts
                else:
                    dst += parts
                    src += cur  # type: ignore[arg-type]
        if dst:
            torch._foreach_copy_(dst, src)  # pyright: ignore[reportPrivateImportUsage]
        self._difference()
        if out:
            torch._foreach_zero_(out)  # pyright: ignore[reportPrivateImportUsage]
        return self._sides(norm_type)

    def differences(
        self, grads: list[Tensor], params: list[Tensor], norm_type: float
    ) -> tuple[list[Tensor], list[Tensor]]:
        """1-element tensors, one per gradient, whose p-norm estimates ``||g_prev - g||`` and
        ``||p_prev - p||``: the differences are formed in ``scratch`` and reduced to weighted norms
        (``(w ||x_S||_p^p + ||x_tail||_p^p)^(1/p)``; the max-norm is not weighted)."""
        self._gather("scratch", grads, params)
        self._difference()
        out: list[list[Tensor]] = [[torch.empty(0)] * len(self._slots) for _ in range(2)]
        for grp, norms in zip(self._groups, self._block_norms(norm_type)):
            parts, where = [], []
            for i in grp.members:
                s = self._slots[i]
                count = -(-s.numel // self.block) if s.stride == 1 else s.kmax + (1 if s.tail else 0)
                if count == 0:  # an empty tensor (an empty shard): its norm is 0
                    out[0][i] = out[1][i] = norms.new_zeros(1)
                    continue
                for side in (0, 1):
                    parts.append(norms[side, s.start : s.start + count])
                    where.append((side, i))
            per = torch._foreach_norm(parts, norm_type) if parts else []  # pyright: ignore[reportPrivateImportUsage]
            for (side, i), n in zip(where, per):
                out[side][i] = n.view(1)
        return out[0], out[1]

    def take(self, grads: list[Tensor], params: list[Tensor], norm: Tensor, step: int) -> None:
        layout = tuple(tuple(t.shape) for t in grads)
        signature = tuple((g.dtype, p.dtype, g.device) for g, p in zip(grads, params))
        if layout != self.layout or signature != self._signature:
            self._allocate(list(layout), list(signature))
        self._set_plan(step)
        self._gather("buffer", grads, params)
        self.norm = norm.detach().clone()
        self.step = step

    # -- checkpoints ----------------------------------------------------------------------------

    def _sample(self, side: int, i: int, dtype: Optional[torch.dtype] = None, device: Any = None) -> Tensor:
        """Tensor ``i``'s sample on side ``side`` in the canonical form (a copy): a whole tensor in its shape;
        a sampled one as one 1-d tensor of ``kmax * block + tail`` elements: the ``k`` blocks kept, the tail, then
        zeros (a block, where ``k < kmax``)."""
        s, k = self._slots[i], self._plan[i][1]
        if s.stride == 1:
            return self._part("buffer", side, "whole", i).detach().to(device, dtype, copy=True)
        b = self.block
        run = self._part("buffer", side, "run", i).detach()
        flat = torch.zeros(s.kmax * b + s.tail, dtype=dtype or run.dtype, device=device or run.device)
        flat[: s.q * b] = run.reshape(-1)
        if k > s.q:
            flat[s.q * b : (s.q + 1) * b] = self._part("buffer", side, "extra", i).detach()
        if s.tail:
            flat[k * b : k * b + s.tail] = self._part("buffer", side, "tail", i).detach()
        return flat

    def _saved_form(self, side: int) -> list[Tensor]:
        """Per tensor, its sample as checkpoints hold it (CPU copies, in the tensor's own dtype)."""
        return [self._sample(side, i, sig[0] if side == 0 else sig[1], "cpu") for i, sig in enumerate(self._signature)]

    def state_dict(self) -> dict[str, Any]:
        if not self.valid or self.norm is None:
            return {}
        return {
            "grads": self._saved_form(0), "params": self._saved_form(1), "norm": self.norm.detach().cpu().clone(),
            "kind": self.kind, "seed": self.seed, "layout": [list(s) for s in self.layout],
            "block": self.block, "stride": self.stride, "min_blocks": self.min_blocks,
        }

    @torch.no_grad()
    def load(self, sd: dict[str, Any], device: torch.device, step: int) -> None:
        """Restore :meth:`state_dict`; a full snapshot's, or one sampled with another seed or other
        sampling settings, is dropped: the first step after resuming then forms no pair."""
        settings = (sd.get("block", SAMPLE_BLOCK), sd.get("stride", SAMPLE_STRIDE),
                    sd.get("min_blocks", SAMPLE_MIN_BLOCKS)) if sd else None
        if (not sd or sd.get("kind") != self.kind or int(sd.get("seed", -1)) != self.seed
                or settings != (self.block, self.stride, self.min_blocks)):
            self.clear()
            return
        shapes = [tuple(int(d) for d in s) for s in sd["layout"]]
        self._allocate(shapes, [(g.dtype, p.dtype, device) for g, p in zip(sd["grads"], sd["params"])])
        self._set_plan(step)
        b = self.block
        for side, saved in ((0, sd["grads"]), (1, sd["params"])):
            for i, (t, s, (_, k)) in enumerate(zip(saved, self._slots, self._plan)):
                if s.stride == 1:
                    self._part("buffer", side, "whole", i).copy_(t)
                    continue
                t = t.reshape(-1)
                self._part("buffer", side, "run", i).view(-1).copy_(t[: s.q * b])
                if k > s.q:
                    self._part("buffer", side, "extra", i).copy_(t[s.q * b : (s.q + 1) * b])
                if s.tail:
                    self._part("buffer", side, "tail", i).copy_(t[k * b : k * b + s.tail])
        self.norm = sd["norm"].to(device)
        self.step = step

    def to(self, device: torch.device) -> None:
        for grp in self._groups:
            grp.to(device)
        # the buffers' own device (``cuda:0``, not ``cuda``): what :meth:`take` compares the tensors' with
        self._signature = tuple(
            (grad_dtype, param_dtype, self._groups[s.group].buffer.device)
            for (grad_dtype, param_dtype, _), s in zip(self._signature, self._slots)
        )
        self._views, self._fixed_parts, self._weights = {}, {}, None
        if self.norm is not None:
            self.norm = self.norm.to(device)

    # -- pickling -------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Without the cached views of the buffers: pickled apart from their buffer, they would each get a
        storage of their own (``pickle``, unlike ``torch.save`` and ``deepcopy``, does not keep views
        shared); they are made again on the unpickled buffers when next used."""
        state = self.__dict__.copy()
        state.update(_views={}, _fixed_parts={}, _weights=None)
        return state

    # -- what tests and benchmarks inspect --------------------------------------------------------

    @property
    def grads(self) -> list[Tensor]:
        """Per gradient, a copy of its sample as checkpoints hold it (in the buffer's dtype, on its device)."""
        return [self._sample(0, i) for i in range(len(self._slots))]

    @property
    def params(self) -> list[Tensor]:
        """Per parameter, a copy of its sample (laid out as :attr:`grads`)."""
        return [self._sample(1, i) for i in range(len(self._slots))]


def _combine(sides: list[Tensor], norm_type: float) -> Tensor:
    """The p-norm, per side, of several groups' ``(2,)`` norms, on the first group's device."""
    device, acc = sides[0].device, _acc_dtype(sides)
    stacked = torch.stack([s.to(device=device, dtype=acc) for s in sides], dim=1)
    total: Tensor = torch.linalg.vector_norm(stacked, norm_type, dim=1)
    return total


Snapshot = Union[FullSnapshot, SampledSnapshot]


def make_snapshot(kind: str, offload: bool = False, seed: int = 0) -> Snapshot:
    """A new, empty snapshot of ``kind`` (``"sampled"`` or ``"full"``)."""
    return SampledSnapshot(seed) if kind == "sampled" else FullSnapshot(offload)
