"""What type checkers see as ``lightning_l0l1.L0L1Clipping`` (never imported at run time).

At run time ``lightning_l0l1.L0L1Clipping`` is the callback class of the Lightning namespace in use
(see :func:`lightning_l0l1.namespace`). A type checker cannot know which one that is, so it is
declared here as a ``Callback`` of both namespaces: a Trainer of either accepts it. Either import
may be missing (only one Lightning package installed): it then types as ``Any``.
"""

from lightning.pytorch.callbacks import Callback as _LightningCallback  # type: ignore[import-not-found,unused-ignore]
from pytorch_lightning.callbacks import Callback as _PLCallback  # type: ignore[import-not-found,unused-ignore]

from lightning_l0l1.callback import L0L1ClippingBase

__all__ = ["L0L1Clipping"]


# The two namespaces' hook signatures name their own Trainer types, so they differ (misc).
class L0L1Clipping(L0L1ClippingBase, _PLCallback, _LightningCallback):  # type: ignore[misc]  # pyright: ignore
    ...
