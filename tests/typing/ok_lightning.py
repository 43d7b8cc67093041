"""Type-checked, not run: the callback in the ``lightning.pytorch`` namespace, as its users write it.

Checked by ``tests/test_typing.py``; the code is inside a function so that importing the module
(pytest's ``--doctest-modules`` collection) runs nothing.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_l0l1 import L0L1Clipping
from lightning_l0l1.lightning import L0L1Clipping as ExplicitL0L1Clipping


def main() -> None:
    callbacks: list[Callback] = [L0L1Clipping(), ExplicitL0L1Clipping(mode="clip", max_norm=1.0)]
    pl.Trainer(callbacks=[L0L1Clipping(mode="adaptive", max_norm=2.0), *callbacks])
    stats: dict[str, float] = L0L1Clipping().latest()
    print(stats)
