"""The callback for the ``lightning.pytorch`` namespace (the unified ``lightning`` package).

>>> from lightning_l0l1.lightning import L0L1Clipping  # doctest: +SKIP
>>> lightning.pytorch.Trainer(callbacks=[L0L1Clipping()])  # doctest: +SKIP

LightningCLI: ``class_path: lightning_l0l1.lightning.L0L1Clipping``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from lightning_l0l1.callback import L0L1ClippingBase

__all__ = ["L0L1Clipping"]


class L0L1Clipping(L0L1ClippingBase, Callback):
    __doc__ = L0L1ClippingBase.__doc__
