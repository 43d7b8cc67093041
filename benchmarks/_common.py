"""Shared helpers for the benchmark scripts: synthetic gradients, timing, sync and allocation counting.

A host read (sync) is what the tests count: :class:`HostReads` of ``tests/_sync.py``, imported from there,
so that a benchmark's "host syncs" and a test's assertion on the same code are the same number.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
from _sync import HostReads  # noqa: E402  (the one definition of a host read)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {dev}, torch {torch.__version__}"


def make_params(n_params: float, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """Transformer-like parameter shapes (4 matrices, 2 vectors per block) adding up to ~n_params."""
    d = 256 if n_params < 5e6 else (768 if n_params < 5e7 else 1024)
    per_block = 12 * d * d + 13 * d
    blocks = max(1, round(n_params / per_block))
    shapes: list[tuple[int, ...]] = []
    for _ in range(blocks):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (3 * d,), (d,), (4 * d,), (d,), (d,), (d,), (d,)]
    return params_of(shapes, dtype, device, seed)


def params_of(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: str, seed: int = 0
              ) -> list[torch.nn.Parameter]:
    """Parameters of ``shapes`` (uninitialised) with standard-normal gradients from the seed's generator."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
        p.grad = torch.randn(s, generator=g).to(dtype=dtype, device=device)
        params.append(p)
    return params


def windows(ids: torch.Tensor, seed: int, steps: int, batch: int, length: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of ``batch`` random windows of ``length`` tokens of ``ids``, from the seed's own
    generator (the same batches whatever else draws random numbers)."""
    g = torch.Generator().manual_seed(seed)
    n = len(ids) - length
    for _ in range(steps):
        starts = torch.randint(n, (batch,), generator=g)
        yield ids[starts[:, None] + torch.arange(length)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    cases: dict[str, Callable[[], Any]], reset: Callable[[], None], reps: int, device: str, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each case; cases alternate within every repetition."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(warmup + reps):
        for name, fn in cases.items():
            reset()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_cases(
    params: Sequence[torch.nn.Parameter], cases: dict[str, Callable[[], Any]], base: str, reps: int, device: str,
    block: int,
) -> list[list[Any]]:
    """One row per case: ms per step (each case runs ``block`` steps; median over ``reps`` interleaved
    repetitions, gradients reset before each), the extra ms and % over case ``base``, and the host reads
    of one block (counted in a separate run)."""
    saved = [p.grad.clone() for p in params]

    def reset() -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    times = {k: v / block for k, v in interleaved(cases, reset, reps, device).items()}
    rows = []
    for name, t in times.items():
        reset()
        counter = HostReads()
        with counter:
            cases[name]()
        sync(device)
        extra = t - times[base]
        rows.append([name, t * 1e3, extra * 1e3, 100 * extra / times[base], counter.n])
    return rows


class _Allocations(TorchDispatchMode):
    """Bytes of fresh (non-view, non-inplace, not ``out=``) outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        is_inplace = name.split(".")[0].endswith("_") and not name.startswith("_local")
        writes_out = func._overloadname.startswith("out")  # `torch.cat(..., out=)`: into a given tensor
        if not is_inplace and not writes_out and not func.is_view:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


class OpCounter(HostReads):
    """Host reads (``syncs``: all of :class:`HostReads`' kinds) and bytes of fresh outputs (``alloc_bytes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc_bytes = 0

    @property
    def syncs(self) -> int:
        return self.n

    def __enter__(self) -> OpCounter:
        super().__enter__()
        self._alloc = _Allocations()
        self._alloc.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._alloc.__exit__(*exc)
        self.alloc_bytes += self._alloc.bytes
        super().__exit__(*exc)


def fake_trainer(optimizer: torch.optim.Optimizer) -> Any:
    """The few trainer attributes the callback's hook reads."""
    return SimpleNamespace(
        optimizers=[optimizer],
        precision_plugin=SimpleNamespace(scaler=None),
        strategy=SimpleNamespace(model=None),
        global_step=0,
        gradient_clip_val=None,
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(report: str, out: Path, quick: bool) -> str:
    """Print the report; in a full run also write it to ``out`` (quick runs leave results alone)."""
    print(report)
    if not quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return report
