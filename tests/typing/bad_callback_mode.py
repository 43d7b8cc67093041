"""Wrong ``mode`` values for the callback, in either namespace: ``mypy`` must reject each (type-checked, not run).

``tests/test_typing.py`` expects exactly one error on every line marked ``# E: [<error code>]``.
"""

from __future__ import annotations

from lightning_l0l1 import L0L1Clipping
from lightning_l0l1.lightning import L0L1Clipping as ForLightning
from lightning_l0l1.pytorch_lightning import L0L1Clipping as ForPytorchLightning


def main() -> None:
    L0L1Clipping(mode="clamp")  # E: [arg-type]
    ForLightning(mode="Clip", max_norm=1.0)  # E: [arg-type]
    ForPytorchLightning(nonfinite="ignore")  # E: [arg-type]
