"""Wrong ``mode`` values that ``mypy`` must reject (this file is type-checked, not run).

``tests/test_typing.py`` runs mypy on this file and expects exactly one error on every line
marked ``# E: [<error code>]`` and no error anywhere else. The code is inside
a function so that importing the module (pytest's ``--doctest-modules`` collection) runs nothing.
"""

from __future__ import annotations

import torch

from lightning_l0l1.functional import GradientClipper, clip_gradients_


def main() -> None:
    params = list(torch.nn.Linear(4, 2).parameters())

    GradientClipper(mode="clamp")  # E: [arg-type] "clamp" is not a Mode
    # E above: Argument "mode" to "GradientClipper" has incompatible type "Literal['clamp']"; expected
    # "Literal['auto', 'clip', 'adaptive', 'l0l1']"

    clip_gradients_(params, 1.0, mode="l0l1")  # E: [arg-type] l0l1 is stateful: use GradientClipper
    # E above: Argument "mode" to "clip_gradients_" has incompatible type "Literal['l0l1']"; expected
    # "Literal['clip', 'adaptive']"
