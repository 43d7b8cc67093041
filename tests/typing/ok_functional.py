"""Correct uses of the torch-only API: ``mypy`` must accept this file (it is type-checked, not run).

Checked by ``tests/test_typing.py``; the code is inside a function so that importing the module
(pytest's ``--doctest-modules`` collection) runs nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import assert_type

from lightning_l0l1.functional import GradientClipper, clip_gradients_, grad_norm


def main() -> None:
    model = torch.nn.Linear(4, 2)
    model(torch.ones(3, 4)).sum().backward()

    norm = clip_gradients_(model.parameters(), max_norm=1.0)
    assert_type(norm, Tensor)
    assert_type(clip_gradients_(model.parameters(), 1.0, mode="adaptive", norm_type="inf"), Tensor)
    assert_type(clip_gradients_(list(model.parameters()), 0.5, "clip", 2.0, foreach=None), Tensor)
    assert_type(clip_gradients_(model.weight, 1.0), Tensor)

    assert_type(grad_norm(model.parameters()), Tensor)
    assert_type(grad_norm(model.parameters(), norm_type=float("inf")), Tensor)

    clipper = GradientClipper(mode="clip", max_norm=1.0)
    assert_type(clipper, GradientClipper)
    auto = GradientClipper()
    assert_type(auto, GradientClipper)
    GradientClipper(mode="l0l1", l0=1.0, l1=0.1)
    GradientClipper(mode="adaptive", max_norm=2.0, norm_type="inf", foreach=False)


if __name__ == "__main__":
    main()
