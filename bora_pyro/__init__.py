"""bora_pyro: Bayesian hierarchical LoRA (BoRA) for many related tasks, in Pyro.

One frozen causal LM, one LoRA adapter per task, all tied to a learned global adapter by
``theta_d ~ Normal(Theta, tau^-1 I)``. Start with `fit_map` (MAP) or `fit_svi` (a posterior).

The public names are imported on first use (PEP 562), so that ``import bora_pyro`` and the
command line's ``--help`` do not load torch, transformers or pyro.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

#: Public name -> the submodule that defines it.
_LAZY = {
    "fit_map": ".inference",
    "fit_svi": ".inference",
    "BoraResult": ".result",
    "load_result": ".result",
    "to_inference_data": ".reports",
    "BoraConfig": ".config",
    "DataConfig": ".config",
    "TrainConfig": ".config",
    "resolve_settings": ".config",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
