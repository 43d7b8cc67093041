"""lightning_l0l1: (L0,L1)-smooth gradient clipping for PyTorch Lightning.

The callback :class:`L0L1Clipping` scales the global gradient on every optimizer
step (``auto``, ``clip``, ``adaptive`` or the ``l0l1`` step); :mod:`lightning_l0l1.functional`
offers the same for plain PyTorch and Fabric loops.

The callback works with either Lightning namespace. ``lightning_l0l1.L0L1Clipping`` is the class of
the namespace in use (:func:`namespace`); ``lightning_l0l1.lightning.L0L1Clipping`` (for
``lightning.pytorch``) and ``lightning_l0l1.pytorch_lightning.L0L1Clipping`` name one explicitly.
Importing this package imports neither namespace.

References:
    Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training: a
    theoretical justification for adaptivity", ICLR 2020. https://arxiv.org/abs/1905.11881
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any, Literal

from lightning_l0l1.clipper import GradientClipper, NonFiniteGradientError

__version__ = "0.1.0"

__all__ = ["GradientClipper", "L0L1Clipping", "NonFiniteGradientError", "__version__", "namespace"]

if TYPE_CHECKING:
    from lightning_l0l1._typing import L0L1Clipping

Namespace = Literal["lightning", "pytorch_lightning"]


def namespace() -> Namespace:
    """The Lightning namespace ``L0L1Clipping`` is built for: the one imported so far, else the one installed.

    ``"lightning"`` (``lightning.pytorch``) when only it has been imported, ``"pytorch_lightning"`` when
    only that has; when both or neither have been, ``pytorch_lightning`` if installed, else
    ``lightning``. Import the class from ``lightning_l0l1.lightning`` or
    ``lightning_l0l1.pytorch_lightning`` to choose it yourself.

    Raises:
        ImportError: when neither package is installed, saying what to install.
    """
    unified, classic = "lightning.pytorch" in sys.modules, "pytorch_lightning" in sys.modules
    if unified != classic:
        return "lightning" if unified else "pytorch_lightning"
    if importlib.util.find_spec("pytorch_lightning") is not None:
        return "pytorch_lightning"
    if importlib.util.find_spec("lightning") is not None:
        return "lightning"
    raise ImportError(
        "`L0L1Clipping` is a Lightning callback, but neither Lightning package is installed: "
        "`pip install lightning` (used as `import lightning.pytorch as pl`) or `pip install pytorch-lightning` "
        "(`import pytorch_lightning as pl`). Plain PyTorch loops need neither: use `lightning_l0l1.functional` "
        "or `GradientClipper`."
    )


def __getattr__(name: str) -> Any:
    # The callback pulls in Lightning (seconds): import it only when asked for, so
    # `lightning_l0l1.functional` stays a torch-only import for plain PyTorch loops.
    if name == "L0L1Clipping":
        return importlib.import_module(f"lightning_l0l1.{namespace()}").L0L1Clipping
    raise AttributeError(f"module 'lightning_l0l1' has no attribute {name!r}")
