"""Argument checks shared by every public entry point.

Each check returns the value in its canonical form or raises :class:`ValueError` naming the
argument in backticks and showing the value received. Imports nothing but the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["choice", "count", "flag", "norm_type", "positive", "text"]


def positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """A finite number ``> 0`` (``>= 0`` with ``allow_zero``), as a float.

    Example:
        >>> positive("max_norm", 2)
        2.0
        >>> positive("max_norm", -1.0)
        Traceback (most recent call last):
        ...
        ValueError: `max_norm` must be a finite positive number, got -1.0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be a finite {kind} number, got {value!r}.")
    return v


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def flag(name: str, value: Any, allow_none: bool = False) -> Optional[bool]:
    """``True`` or ``False`` (or ``None`` with ``allow_none``); truthy values are refused."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return value


def count(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
    """An integer ``>= 1`` (or ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an integer >= 1" if allow_none else "an integer >= 1"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return value


def text(name: str, value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be a string, got {value!r}.")
    return value


def norm_type(value: Any) -> float:
    """The ``p`` of a p-norm: any finite ``p > 0`` or ``inf`` (``float("inf")`` or ``"inf"``), as a float."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`norm_type` must be a positive number or 'inf', got {value!r}.") from None
    if isinstance(value, bool) or math.isnan(p) or p <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf', got {value!r}.")
    return p
