"""Where and in what precision things run: the device, the autocast dtype of the frozen base
model, and the autocast context. Every layer (fitting, evaluation, calibration, the arviz
export, generation) takes these from here, so that ``"auto"``, ``"bf16"`` and the rules for them
are written once.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

__all__ = ["AUTOCAST_DTYPES", "resolve_device", "autocast_dtype", "autocast"]

#: Accepted names of ``autocast=`` and the dtype each selects (the adapters always stay fp32).
AUTOCAST_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device request into a ``torch.device``.

    Parameters
    ----------
    device : str or torch.device, default "auto"
        ``"auto"`` picks ``cuda`` when available, else ``cpu``; otherwise anything
        ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Raises
    ------
    ValueError
        For a string torch cannot parse, or a CUDA device that is not available.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        try:
            resolved = torch.device(device.strip())
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"device={device!r} is not a device torch knows; use 'auto', 'cpu', 'cuda' or "
                f"'cuda:<index>'."
            ) from err
    else:
        raise ValueError(
            f"device must be a string such as 'auto', 'cpu', 'cuda:0' or a torch.device, got "
            f"{device!r} ({type(device).__name__})."
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} asks for CUDA, but CUDA is not available here; use "
                f"device='cpu' or device='auto'."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} asks for CUDA device {resolved.index}, but only "
                f"{torch.cuda.device_count()} device(s) exist; use an index below that."
            )
    return resolved


def autocast_dtype(name: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype | None:
    """The dtype that ``autocast=name`` selects for the base model: ``None`` (fp32, no autocast),
    ``"bf16"`` / ``"bfloat16"`` or ``"fp16"`` / ``"float16"`` (or the ``torch.dtype`` itself).

    Raises
    ------
    ValueError
        For any other name (the message lists the valid ones).
    """
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if name not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast={name!r} is not valid; choose None, torch.bfloat16 or torch.float16.")
        return name
    if name not in AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast={name!r} is not valid; choose None, {', '.join(repr(k) for k in AUTOCAST_DTYPES)}."
        )
    return AUTOCAST_DTYPES[name]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> ContextManager:
    """``torch.autocast(device.type, dtype)``, or a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
