"""lightning_l0l1: (L0,L1)-smooth gradient clipping for PyTorch Lightning.

The callback :class:`L0L1Clipping` scales the global gradient on every optimizer
step (``clip``, ``adaptive`` or the ``l0l1`` step); :mod:`lightning_l0l1.functional`
offers the same for plain PyTorch and Fabric loops.

References:
    Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training: a
    theoretical justification for adaptivity", ICLR 2020. https://arxiv.org/abs/1905.11881
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_l0l1.clipper import GradientClipper, NonFiniteGradientError

__version__ = "0.1.0"

__all__ = ["GradientClipper", "L0L1Clipping", "NonFiniteGradientError", "__version__"]

if TYPE_CHECKING:
    from lightning_l0l1.callback import L0L1Clipping


def __getattr__(name: str) -> Any:
    # The callback pulls in pytorch_lightning (~6 s): import it only when asked for, so
    # `lightning_l0l1.functional` stays a torch-only import for plain PyTorch loops.
    if name == "L0L1Clipping":
        from lightning_l0l1.callback import L0L1Clipping

        return L0L1Clipping
    raise AttributeError(f"module 'lightning_l0l1' has no attribute {name!r}")
