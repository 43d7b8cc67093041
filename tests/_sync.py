"""The host-read counter every "no host sync" test uses.

A host read is either ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, a
Python ``if`` on a tensor) or a call of ``Tensor.tolist`` / ``Tensor.numpy``, which on the CPU read
memory without going through the dispatcher (so a dispatch mode alone would miss them).

A third kind is only visible on a GPU: ops whose CUDA kernels read a value on the host to size
their output or pick an index (``nonzero``, ``masked_select``, ``unique``, and the whole-tensor
``median``/``nanmedian``). On the CPU they do not sync, so the counter counts the calls
themselves (``kernel_syncs``): a test run on the CPU still catches them in the hot path.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: Ops whose CUDA kernels synchronize with the host (output size or index read there).
CUDA_SYNCING_OPS = frozenset({
    _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten.median.default, _aten.nanmedian.default,
})


class _ScalarReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        elif func in CUDA_SYNCING_OPS:
            self.kernel += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Counts host reads while entered, by kind: ``scalar``, ``transfers`` (``tolist``/``numpy``), ``kernel_syncs``.

    Re-entrant across calls: one instance can be entered once per hook call and keeps adding up.
    ``n`` (alias ``count``) is the total.
    """

    _METHODS = ("tolist", "numpy")

    def __init__(self) -> None:
        self.scalar = 0
        self.transfers = 0
        self.kernel_syncs = 0

    @property
    def n(self) -> int:
        return self.scalar + self.transfers + self.kernel_syncs

    count = n

    def __enter__(self) -> HostReads:
        self._saved = {name: getattr(torch.Tensor, name) for name in self._METHODS}
        for name, orig in self._saved.items():

            def wrapped(t, *a, _orig=orig, **k):
                self.transfers += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        self._mode = _ScalarReads()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self.scalar += self._mode.n
        self.kernel_syncs += self._mode.kernel
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)


class HookReads:
    """Counts the host reads inside one method of an object: ``obj.<name>`` is replaced, on the instance,
    by a wrapper that runs each call inside ``self.reads`` (a :class:`HostReads`) and counts it in ``calls``."""

    def __init__(self, obj: object, name: str) -> None:
        self.reads = HostReads()
        self.calls = 0
        inner = getattr(obj, name)

        def counted(*args, **kwargs):
            self.calls += 1
            with self.reads:
                return inner(*args, **kwargs)

        setattr(obj, name, counted)
