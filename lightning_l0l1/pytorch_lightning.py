"""The callback for the ``pytorch_lightning`` namespace (the ``pytorch-lightning`` package).

>>> from lightning_l0l1.pytorch_lightning import L0L1Clipping  # doctest: +SKIP
>>> pytorch_lightning.Trainer(callbacks=[L0L1Clipping()])  # doctest: +SKIP

LightningCLI: ``class_path: lightning_l0l1.pytorch_lightning.L0L1Clipping``.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback

from lightning_l0l1.callback import L0L1ClippingBase

__all__ = ["L0L1Clipping"]


class L0L1Clipping(L0L1ClippingBase, Callback):
    __doc__ = L0L1ClippingBase.__doc__
