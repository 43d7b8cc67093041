"""The per-optimizer state of a :class:`~lightning_l0l1.clipper.GradientClipper`, and its checkpoint format.

One :class:`OptimizerState` per optimizer, made of small typed parts that each save and restore
themselves: :class:`Counters`, the last finite step's record, the estimator's
:class:`~lightning_l0l1.estimator.EstimatorState` and the rule's own state. A checkpoint stores
each optimizer's parts side by side in one flat dict of plain Python values and CPU tensors
(format :data:`VERSION`; version 1 kept the momentum ratio inside ``env``, and still loads; version 2
did not say which parameters the snapshot holds: such a snapshot is matched by shape at its first use;
version 3 left out a snapshot taken at a non-finite step, which version 4 keeps without its gradients).
Restoring builds the state on the CPU; the first step moves it to the gradients' device.

Every field is checked before anything is restored (:func:`check_clipper_state`): a field of the wrong
type, shape or range, a NaN where none can be, a snapshot that does not match its own layout, gives a
``TypeError`` or ``ValueError`` that names the field by its path (``optimizers[0].delta``) and the
value, and says the checkpoint is damaged. A damaged state is refused whole rather than partly
replaced by a fresh one: the same damage may have reached fields no check can judge.

Imports only :mod:`torch`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_l0l1.estimator import CAPACITY, PENDING, WINDOW, EstimatorState
from lightning_l0l1.modes import Rule
from lightning_l0l1.snapshots import SAMPLE_BLOCK, SAMPLE_MIN_BLOCKS, SAMPLE_STRIDE, FullSnapshot, Snapshot
from lightning_l0l1.stats import RECORD_FIELDS

__all__ = ["VERSION", "Counters", "OptimizerState", "check_array", "check_clipper_state", "check_number", "damaged"]

#: The checkpoint format :meth:`GradientClipper.state_dict` writes.
VERSION = 4


@dataclass
class Counters:
    """How many steps an optimizer took, and how many of them were non-finite or clipped.

    ``nonfinite`` and ``clipped`` are 0-d int64 tensors on the gradients' device, counted there
    without a host read.
    """

    steps: int
    nonfinite: Tensor
    clipped: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu", steps: int = 0) -> Counters:
        z = torch.zeros((), dtype=torch.int64, device=device)
        return cls(steps, z, z.clone())

    def to(self, device: torch.device) -> Counters:
        return Counters(self.steps, self.nonfinite.to(device), self.clipped.to(device))

    def state_dict(self) -> dict[str, int]:
        nonfinite, clipped = torch.stack([self.nonfinite, self.clipped]).tolist()  # one transfer
        return {"steps": self.steps, "nonfinite_steps": int(nonfinite), "clipped_steps": int(clipped)}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> Counters:
        return cls(
            int(sd.get("steps", 0)),
            torch.tensor(int(sd.get("nonfinite_steps", 0)), dtype=torch.int64),
            torch.tensor(int(sd.get("clipped_steps", 0)), dtype=torch.int64),
        )


@dataclass
class OptimizerState:
    """Everything a clipper keeps for one optimizer.

    Attributes:
        counters: the step counts.
        last: the record values of the last finite step (``None`` before the first step).
        estimator: the estimator's state (``None``: estimator off, or not started).
        rule: the rule's own state (see :meth:`~lightning_l0l1.modes.Rule.init`).
        distributed: the gradients are sharded: the snapshot is not checkpointed (only rank zero's
            state is saved under sharded strategies).
        restored: the state was loaded from a checkpoint.
    """

    counters: Counters
    last: Optional[Tensor] = None
    estimator: Optional[EstimatorState] = None
    rule: Any = None
    distributed: bool = False
    restored: bool = False

    def to(self, like: Tensor, n_groups: int, rule: Rule) -> None:
        """Place the state on ``like``'s device, the record in ``like``'s dtype for ``n_groups`` param groups."""
        device = like.device
        if self.counters.nonfinite.device != device:
            self.counters = self.counters.to(device)
        size = len(RECORD_FIELDS) + n_groups
        if self.last is None or self.last.numel() != size:
            self.last = torch.zeros(size, dtype=like.dtype, device=device)
        elif (self.last.device, self.last.dtype) != (device, like.dtype):
            self.last = self.last.to(device, like.dtype)
        if self.estimator is not None:
            self.estimator.to(device)
        self.rule = rule.to(self.rule, like)

    def state_dict(self, rule: Rule, with_buffers: bool) -> dict[str, Any]:
        """The parts side by side; the snapshot only ``with_buffers`` (and never for sharded gradients)."""
        out: dict[str, Any] = {**self.counters.state_dict(), "last": [] if self.last is None else self.last.tolist()}
        if self.estimator is not None:
            out.update(self.estimator.state_dict(with_buffers and not self.distributed))
        if self.rule is not None:
            out.update(rule.state_dict(self.rule))
        return out

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, Any], rule: Rule, snapshot: Optional[Callable[[], Snapshot]] = None
    ) -> OptimizerState:
        """What :meth:`state_dict` saved (either version), on the CPU; ``snapshot`` makes the estimator's
        empty snapshot (``None``: the estimator is off, its saved estimates are still shown)."""
        last = list(sd.get("last") or [])
        return cls(
            counters=Counters.from_state_dict(sd),
            last=torch.tensor(last, dtype=torch.float64) if last else None,
            estimator=EstimatorState.from_state_dict(sd, (snapshot or FullSnapshot)()),
            rule=rule.load_state_dict(sd),
            restored=True,
        )


# ---------------------------------------------------------------------------- checks on load


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        body = f": {value.tolist()!r}" if value.numel() <= 8 else ""
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}{body}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def damaged(path: str, what: str, value: Any, error: type[Exception] = ValueError) -> Exception:
    """The error for a field of a loaded state that cannot be right: names it, shows it, says what to do."""
    return error(
        f"The checkpoint's state is damaged: `{path}` must be {what}, got {_show(value)}. Resume from an intact "
        "checkpoint, or remove this state from it to start the clipper's state afresh."
    )


def _mapping(path: str, value: Any) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise damaged(path, "a dict", value, TypeError)
    return value


def _list(path: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise damaged(path, "a list", value, TypeError)
    return list(value)


def check_number(
    path: str, value: Any, *, integer: bool = False, low: Optional[float] = None, above: bool = False,
    nan: bool = False, inf: bool = False,
) -> float:
    """A Python number (or one-element tensor): an int with ``integer``; ``>= low`` (``> low`` with
    ``above``); NaN and infinities only where allowed."""
    v = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or (integer and not isinstance(v, numbers.Integral)):
        raise damaged(path, "an integer" if integer else "a number", value, TypeError)
    f = float(v)
    if math.isnan(f):
        if not nan:
            raise damaged(path, "a number, not NaN", value)
        return f
    if math.isinf(f) and not (inf and f > 0):
        raise damaged(path, "finite", value)
    if low is not None and (f < low or (above and f == low)):
        raise damaged(path, f"{'>' if above else '>='} {low}", value)
    return f


def check_array(
    path: str, value: Any, shape: Optional[tuple[int, ...]] = None, *, integer: bool = False,
    low: Optional[float] = None, above: bool = False, nan: bool = False, inf: bool = False,
    floating: bool = False, neg_inf: bool = False,
) -> Tensor:
    """A list of numbers (or a tensor) of ``shape``, each as :func:`check_number` says (``neg_inf``: -inf
    allowed too); returned as a float64 tensor (or the tensor itself with ``floating``: a tensor of a
    floating dtype is required)."""
    if floating:
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise damaged(path, "a floating-point tensor", value, TypeError)
        t = value
    else:
        if isinstance(value, (str, bytes, Mapping)) or value is None:
            raise damaged(path, "a list of numbers", value, TypeError)
        if isinstance(value, Tensor) and value.dtype == torch.bool:
            raise damaged(path, "numbers", value, TypeError)
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise damaged(path, "a list of numbers", value, TypeError) from err
        if integer and not torch.equal(t, t.trunc()) and not bool(torch.isnan(t).any()):
            raise damaged(path, "integers", value, TypeError)
    if shape is not None and tuple(t.shape) != shape:
        raise damaged(path, f"of shape {shape}", value)
    if floating and not (nan or inf or neg_inf):  # a snapshot's tensor: checked in its own dtype, no copy
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise damaged(path, "finite everywhere", value)
        if low is not None and t.numel() and (float(t.min()) < low or (above and float(t.min()) == low)):
            raise damaged(path, f"{'>' if above else '>='} {low} everywhere", value)
        return t
    if t.numel():
        d = t.detach().to("cpu", torch.float64)
        if not nan and bool(torch.isnan(d).any()):
            raise damaged(path, "free of NaN", value)
        finite_or_nan = d[~torch.isnan(d)]
        if ((not inf and bool((finite_or_nan == math.inf).any()))
                or (not neg_inf and bool((finite_or_nan == -math.inf).any()))):
            raise damaged(path, "finite", value)
        if low is not None and finite_or_nan.numel():
            least = float(finite_or_nan.min())
            if least < low or (above and least == low):
                raise damaged(path, f"{'>' if above else '>='} {low} everywhere", value)
    return t


#: The estimator's ``env`` fields: (shape, low, NaN allowed, +inf allowed, integer).
_ENV: dict[str, tuple[tuple[int, ...], Optional[float], bool, bool, bool]] = {
    "norms": ((CAPACITY,), 0.0, False, False, False),
    "smooth": ((CAPACITY,), 0.0, False, False, False),
    "lo": ((), None, False, False, False),
    "hi": ((), None, False, False, False),
    "l0": ((), 0.0, False, False, False),
    "l1": ((), 0.0, False, False, False),
    "pairs": ((), 0.0, False, False, True),
    "last": ((), 0.0, False, False, False),
    "last_norm": ((), 0.0, False, False, False),
    "low": ((), 0.0, False, True, False),
    "window": ((WINDOW,), 0.0, True, False, False),
    "ratio": ((), 0.0, False, False, False),
    "pending_norms": ((PENDING,), 0.0, False, False, False),
    "pending_smooth": ((PENDING,), 0.0, False, False, False),
}
_MOMENTUM: dict[str, tuple[tuple[int, ...], Optional[float], bool, bool, bool]] = {
    "amp_window": ((WINDOW,), 0.0, True, False, False),
    "amp_count": ((), 0.0, False, False, True),
    "amp": ((), 0.0, False, False, False),
    "intended": ((), 0.0, True, False, False),
}


def _check_fields(path: str, sd: Any, spec: dict[str, tuple[tuple[int, ...], Optional[float], bool, bool, bool]]
                  ) -> None:
    sd = _mapping(path, sd)
    for name, (shape, low, nan, inf, integer) in spec.items():
        if name in sd:  # a field missing (an older checkpoint) starts empty
            check_array(f"{path}.{name}", sd[name], shape, integer=integer, low=low, nan=nan, inf=inf)


def _check_ids(path: str, value: Any, n: int) -> None:
    ids = _list(path, value)
    if len(ids) != n:
        raise damaged(path, f"a list of {n} [group, position] pairs (one per snapshot tensor)", value)
    for i, pid in enumerate(ids):
        pair = _list(f"{path}[{i}]", pid)
        if len(pair) != 2:
            raise damaged(f"{path}[{i}]", "a [group, position] pair", pid)
        for j, v in enumerate(pair):
            check_number(f"{path}[{i}][{j}]", v, integer=True, low=0)


def _check_snapshot(path: str, sd: Any) -> int:
    """A saved snapshot (either kind); the number of tensors it holds."""
    sd = _mapping(path, sd)
    if not sd:
        return 0
    kind = sd.get("kind", "full")
    if kind not in ("full", "sampled"):
        raise damaged(f"{path}.kind", "'full' or 'sampled'", kind)
    for name in ("grads", "params", "norm"):
        if name not in sd:
            raise damaged(path, f"a dict with `{name}`", f"one without it (keys {sorted(map(str, sd))})")
    grads, params = _list(f"{path}.grads", sd["grads"]), _list(f"{path}.params", sd["params"])
    if len(grads) != len(params):
        raise damaged(f"{path}.params", f"a list of {len(grads)} tensors, as many as `grads`", params)
    check_array(f"{path}.norm", sd["norm"], (), low=0.0, floating=True)
    if not isinstance(sd.get("nonfinite", False), bool):
        raise damaged(f"{path}.nonfinite", "True or False", sd["nonfinite"], TypeError)
    for side, tensors in (("grads", grads), ("params", params)):
        for i, t in enumerate(tensors):
            check_array(f"{path}.{side}[{i}]", t, floating=True)
    if kind == "full":
        for i, (g, p) in enumerate(zip(grads, params)):
            if tuple(g.shape) != tuple(p.shape):
                raise damaged(f"{path}.params[{i}]", f"of the shape of `grads[{i}]`, {tuple(g.shape)}", p)
        return len(grads)
    settings = {}
    for name, default in (("block", SAMPLE_BLOCK), ("stride", SAMPLE_STRIDE), ("min_blocks", SAMPLE_MIN_BLOCKS)):
        settings[name] = int(check_number(f"{path}.{name}", sd.get(name, default), integer=True, low=1))
    check_number(f"{path}.seed", sd.get("seed", 0), integer=True)
    layout = _list(f"{path}.layout", sd.get("layout"))
    if len(layout) != len(grads):
        raise damaged(f"{path}.layout", f"a list of {len(grads)} shapes (one per tensor)", layout)
    block, stride_max, min_blocks = settings["block"], settings["stride"], settings["min_blocks"]
    for i, shape in enumerate(layout):
        dims = [int(check_number(f"{path}.layout[{i}][{j}]", d, integer=True, low=0))
                for j, d in enumerate(_list(f"{path}.layout[{i}]", shape))]
        numel = math.prod(dims)
        stride = max(1, min(stride_max, numel // block // min_blocks))
        if stride == 1:
            want, what = tuple(dims), f"of shape {tuple(dims)} (a tensor kept whole)"
        else:
            nb = numel // block
            n = -(-nb // stride) * block + numel - nb * block
            want, what = (n,), f"of shape ({n},) (the sample of a tensor of shape {tuple(dims)})"
        for side, tensors in (("grads", grads), ("params", params)):
            if tuple(tensors[i].shape) != want:
                raise damaged(f"{path}.{side}[{i}]", what, tensors[i])
    return len(grads)


def _check_optimizer(path: str, sd: Any) -> None:
    sd = _mapping(path, sd)
    counts = {name: check_number(f"{path}.{name}", sd.get(name, 0), integer=True, low=0)
              for name in ("steps", "nonfinite_steps", "clipped_steps")}
    for name in ("nonfinite_steps", "clipped_steps"):
        if counts[name] > counts["steps"]:
            raise damaged(f"{path}.{name}", f"at most `steps` ({int(counts['steps'])})", sd.get(name))
    last = sd.get("last") or []
    t = check_array(f"{path}.last", last, inf=True)
    if t.dim() != 1 or (t.numel() and t.numel() <= len(RECORD_FIELDS)):
        raise damaged(f"{path}.last", f"empty, or a list of more than {len(RECORD_FIELDS)} numbers", last)
    if sd.get("env") is not None:
        _check_fields(f"{path}.env", sd["env"], _ENV)
    if sd.get("momentum") is not None:
        _check_fields(f"{path}.momentum", sd["momentum"], _MOMENTUM)
    if sd.get("delta") is not None:
        check_number(f"{path}.delta", sd["delta"], low=0.0, above=True)
    if sd.get("natural") is not None:
        check_number(f"{path}.natural", sd["natural"], low=0.0, above=True)
    for name in ("applied", "typical"):  # NaN: not set (a non-finite first step)
        if sd.get(name) is not None:
            check_number(f"{path}.{name}", sd[name], low=0.0, nan=True)
    if sd.get("previous") is not None:  # auto under momentum: each group's factor at the last step
        prev = check_array(f"{path}.previous", sd["previous"], nan=True)  # NaN: no factor yet for that group
        if prev.dim() != 1 or not bool(((prev >= 0) & (prev <= 1) | torch.isnan(prev)).all()):
            raise damaged(f"{path}.previous", "a list of factors in [0, 1], one per param group", sd["previous"])
    if sd.get("snapshot"):
        n = _check_snapshot(f"{path}.snapshot", sd["snapshot"])
        check_number(f"{path}.snap_step", sd.get("snap_step"), integer=True, low=-2)
        if sd.get("snap_ids") is not None:
            _check_ids(f"{path}.snap_ids", sd["snap_ids"], n)
        if sd.get("other"):
            other = _mapping(f"{path}.other", sd["other"])
            n = _check_snapshot(f"{path}.other.snapshot", other.get("snapshot"))
            check_number(f"{path}.other.snap_step", other.get("snap_step"), integer=True, low=0)
            _check_ids(f"{path}.other.snap_ids", other.get("snap_ids"), n)


def check_clipper_state(sd: Any) -> dict[int, Mapping[str, Any]]:
    """Check what :meth:`GradientClipper.state_dict` saved (see the module); the optimizers' states by key.

    Raises:
        TypeError, ValueError: for a damaged field, naming its path.
    """
    sd = _mapping("state", sd)
    if "version" in sd:
        check_number("version", sd["version"], integer=True, low=1)
        if int(sd["version"]) > VERSION:
            raise ValueError(
                f"The clipper state is of format version {sd['version']}, written by a newer lightning_l0l1; this "
                f"one reads versions up to {VERSION}. Upgrade lightning_l0l1 to resume from it."
            )
    optimizers = _mapping("optimizers", sd.get("optimizers", {}))
    out: dict[int, Mapping[str, Any]] = {}
    for k, opt in optimizers.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            key = -1
        if isinstance(k, bool) or key < 0 or (isinstance(k, float) and k != key):
            raise damaged(f"optimizers[{k!r}]", "keyed by an optimizer index (an integer >= 0)", k, TypeError)
        _check_optimizer(f"optimizers[{k!r}]", opt)
        out[key] = opt
    return out
