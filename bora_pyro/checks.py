"""Argument checks shared by every layer: each names the argument, shows the bad value and says
what is accepted, so that a user sees the fix in the message (never an ``assert``).

Every function returns the checked (and normalised) value, so that a check reads as an
assignment: ``batch_size = positive_int("batch_size", batch_size)``. This module imports nothing
heavy (no torch), so that the command line can check its arguments before loading a model.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "positive_int", "non_negative_int", "optional_positive_int", "positive_number",
    "non_negative_number", "fraction", "choice", "did_you_mean", "is_int",
]


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, False for bools (``True`` is not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` >= 1, else a ``ValueError`` naming ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` >= 0, else a ``ValueError`` naming ``name``."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {name}={value!r}.")
    return int(value)


def optional_positive_int(name: str, value: Any, *, none_means: str = "no limit") -> int | None:
    """``None`` or an ``int`` >= 1; the message says what ``None`` means."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer or None ({none_means}), got {name}={value!r}."
        )
    return int(value)


def positive_number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """``value`` as a ``float`` > 0 (finite unless ``allow_inf``), else a ``ValueError``."""
    if not _is_real(value) or math.isnan(value) or not value > 0 or (math.isinf(value) and not allow_inf):
        kind = "a positive number" if allow_inf else "a finite positive number"
        raise ValueError(f"{name} must be {kind}, got {name}={value!r}.")
    return float(value)


def non_negative_number(name: str, value: Any) -> float:
    """``value`` as a finite ``float`` >= 0, else a ``ValueError``."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}.")
    return float(value)


def fraction(name: str, value: Any, *, allow_zero: bool = True) -> float:
    """A share in ``[0, 1)`` (or ``(0, 1)`` without ``allow_zero``), as a ``float``."""
    low = "0 <=" if allow_zero else "0 <"
    if not _is_real(value) or not math.isfinite(value) or value >= 1 or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a fraction with {low} {name} < 1, got {name}={value!r}.")
    return float(value)


def did_you_mean(value: Any, valid: Iterable[Any], *, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``valid``, or ``"."`` when none is close."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else "."


def choice(name: str, value: Any, valid: Iterable[Any]) -> Any:
    """``value`` if it is one of ``valid``, else a ``ValueError`` listing them."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(
            f"{name}={value!r} is not valid; choose one of {', '.join(repr(v) for v in valid)}"
            f"{did_you_mean(value, valid)}"
        )
    return value
