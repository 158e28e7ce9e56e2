"""Files bora_pyro writes: strict JSON for numbers that may be NaN or infinite.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON (other readers,
``jq`` and browsers among them, reject the file). `dumps_json` writes every non-finite float as
the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` and refuses anything else that is not
JSON; `restore_floats` turns those three strings back into floats in the parts of a document
that hold numbers (histories, optimiser and loop state): call it on those parts only, so that a
task named ``"NaN"`` elsewhere stays a string.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["NON_FINITE", "encode_floats", "restore_floats", "dumps_json"]

#: How non-finite floats are spelled in bora_pyro's JSON files.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_floats(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, scalars) with non-finite floats as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_floats(v) for v in value]
    return value


def restore_floats(value: Any) -> Any:
    """The inverse of `encode_floats` on a part of a document that holds numbers."""
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, dict):
        return {k: restore_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_floats(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of `encode_floats(value)` with ``allow_nan=False``: always valid JSON."""
    return json.dumps(encode_floats(value), allow_nan=False, **kwargs)
