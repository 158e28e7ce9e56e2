"""The flat layout of LoRA parameters: one vector of length P per adapter.

BoRA keeps every adapter (each task's and the global one) as one flat vector, so that all task
adapters are one ``[D, P]`` tensor and the hierarchical prior is one vectorised expression. The
`AdapterLayout` says where each module's ``A`` (``rank x in``) and ``B`` (``out x rank``) live
in that vector, and which precision group each parameter belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import PRECISION_GROUPINGS

__all__ = ["AdapterSlot", "AdapterLayout"]


@dataclass(frozen=True)
class AdapterSlot:
    """One LoRA matrix (``A`` or ``B``) of one target module, inside the flat vector.

    Attributes
    ----------
    module
        Dotted name of the wrapped module in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
    kind
        ``"A"`` (shape ``rank x in_features``) or ``"B"`` (shape ``out_features x rank``).
    shape
        ``(rows, cols)`` of the matrix.
    offset
        Index of its first element in the flat vector.
    """

    module: str
    kind: str
    shape: tuple[int, int]
    offset: int

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def stop(self) -> int:
        return self.offset + self.size

    @property
    def module_kind(self) -> str:
        """The last component of the module name (``q_proj``, ``c_attn``, ...)."""
        return self.module.rsplit(".", 1)[-1]


class AdapterLayout:
    """Where each target module's LoRA matrices live in a flat parameter vector of length `size`.

    For each module, in order, ``A`` (row-major, ``rank x in``) then ``B`` (``out x rank``).

    Parameters
    ----------
    modules
        ``(name, in_features, out_features)`` for each target module, in a fixed order.
    rank
        LoRA rank r.
    alpha
        LoRA alpha; the update is ``(alpha / rank) * B @ A``.
    """

    def __init__(self, modules: list[tuple[str, int, int]], *, rank: int, alpha: float):
        if not modules:
            raise ValueError("An AdapterLayout needs at least one target module; got none.")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.modules = [(str(n), int(i), int(o)) for n, i, o in modules]
        slots, offset = [], 0
        for name, fan_in, fan_out in self.modules:
            for kind, shape in (("A", (self.rank, fan_in)), ("B", (fan_out, self.rank))):
                slot = AdapterSlot(name, kind, shape, offset)
                slots.append(slot)
                offset = slot.stop
        self.slots: tuple[AdapterSlot, ...] = tuple(slots)
        self.size = offset
        self._by_key = {(s.module, s.kind): s for s in self.slots}

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor in front of ``B @ A``."""
        return self.alpha / self.rank

    def __repr__(self) -> str:
        return (
            f"AdapterLayout({len(self.modules)} modules, rank={self.rank}, alpha={self.alpha:g}, "
            f"P={self.size:,})"
        )

    def slot(self, module: str, kind: str) -> AdapterSlot:
        try:
            return self._by_key[(module, kind)]
        except KeyError:
            raise KeyError(f"No LoRA matrix {kind!r} for module {module!r} in this layout.") from None

    def view(self, theta: torch.Tensor, module: str, kind: str) -> torch.Tensor:
        """The ``A`` or ``B`` matrix of ``module`` as a view of ``theta``.

        ``theta`` has shape ``[..., P]``; the result has shape ``[..., rows, cols]``.
        """
        s = self.slot(module, kind)
        return theta[..., s.offset : s.stop].unflatten(-1, s.shape)

    def group_index(self, grouping: str = "shared") -> tuple[list[str], torch.Tensor]:
        """Names of the precision groups and the group of each parameter.

        Parameters
        ----------
        grouping
            One of `PRECISION_GROUPINGS`.

        Returns
        -------
        names
            Group names, e.g. ``["all"]``, ``["A", "B"]`` or ``["q_proj.A", "q_proj.B", ...]``.
        index
            ``LongTensor [P]``: the group of each parameter.
        """
        if grouping not in PRECISION_GROUPINGS:
            raise ValueError(
                f"precision_groups={grouping!r} is not valid; choose one of {PRECISION_GROUPINGS}."
            )
        if grouping == "shared":
            keys = ["all"] * len(self.slots)
        elif grouping == "ab":
            keys = [s.kind for s in self.slots]
        else:
            keys = [f"{s.module_kind}.{s.kind}" for s in self.slots]
        names = sorted(set(keys), key=keys.index)
        ids = torch.tensor([names.index(k) for k in keys])
        sizes = torch.tensor([s.size for s in self.slots])
        return names, torch.repeat_interleave(ids, sizes)

    def init_global(self, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A standard LoRA initial adapter, ``[P]`` fp32: ``A ~ U(-1/sqrt(in), 1/sqrt(in))``, ``B = 0``.

        This is PEFT's default (Kaiming-uniform with ``a = sqrt(5)``), so that the adapted model
        starts equal to the base model.
        """
        theta = torch.zeros(self.size)
        for s in self.slots:
            if s.kind == "A":
                bound = 1.0 / math.sqrt(s.shape[1])
                values = torch.rand(s.shape, generator=generator) * (2 * bound) - bound
                theta[s.offset : s.stop] = values.flatten()
        return theta

    def to_dict(self) -> dict:
        """A JSON-able description, inverse of `from_dict`."""
        return {"rank": self.rank, "alpha": self.alpha, "modules": [list(m) for m in self.modules]}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterLayout":
        return cls([tuple(m) for m in d["modules"]], rank=d["rank"], alpha=d["alpha"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AdapterLayout) and self.to_dict() == other.to_dict()
