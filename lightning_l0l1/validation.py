"""Argument checks shared by every public entry point.

Each check returns the value in its canonical form or raises :class:`ValueError` naming the
argument in backticks and showing the value received. Imports nothing but the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["FLOAT32_TINY", "choice", "count", "device", "flag", "norm_type", "positive", "text"]


def _scalar(value: Any) -> Any:
    """A one-element array (a 0-d tensor, a numpy scalar or 0-d array) as its Python number, read once."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


#: The smallest normal float32: a smaller step bound rounds towards 0 in float32.
FLOAT32_TINY = 1.1754943508222875e-38


def positive(
    name: str, value: Any, allow_zero: bool = False, low: Optional[float] = None, high: Optional[float] = None
) -> float:
    """A finite number ``> 0`` (``>= 0`` with ``allow_zero``), as a float, within ``[low, high]`` where given.
    Python and numpy numbers and 0-d tensors are accepted (a tensor is read on the host here, once).

    Example:
        >>> positive("max_norm", 2)
        2.0
        >>> positive("max_norm", -1.0)
        Traceback (most recent call last):
        ...
        ValueError: `max_norm` must be a finite positive number, got -1.0.
    """
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    v = float(number)
    if math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be a finite {kind} number, got {value!r}.")
    if high is not None and v > high:
        raise ValueError(f"`{name}` must be at most {high!r} (larger overflows in float32), got {value!r}.")
    if low is not None and v < low:
        raise ValueError(f"`{name}` must be at least {low!r} (smaller rounds to 0 in float32), got {value!r}.")
    return v


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return choices[choices.index(value)]


def flag(name: str, value: Any, allow_none: bool = False) -> Optional[bool]:
    """``True`` or ``False`` (or ``None`` with ``allow_none``); truthy values are refused."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return value


def count(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
    """An integer ``>= 1`` (or ``None`` with ``allow_none``), as an ``int``; numpy integers are accepted."""
    if value is None and allow_none:
        return None
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < 1:
        allowed = "None or an integer >= 1" if allow_none else "an integer >= 1"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return int(number)


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


def device(name: str, value: Any, choices: Sequence[Optional[str]]) -> Optional[str]:
    """A device given as a string or a ``torch.device``, as its string; one of ``choices``."""
    text_value = None if value is None else str(value) if type(value).__name__ == "device" else value
    if text_value not in choices:
        allowed = " or ".join("None" if c is None else repr(c) for c in choices)
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return text_value
