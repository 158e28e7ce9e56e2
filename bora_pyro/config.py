"""`BoraConfig`: the knobs of the BoRA model, validated once and saved next to the weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

__all__ = ["BoraConfig", "parse_tau", "PRECISION_GROUPINGS"]

#: How parameters may share a precision: one tau for all, one for all A and one for all B, or
#: one per (module kind, A|B), e.g. ``q_proj.A``.
PRECISION_GROUPINGS = ("shared", "ab", "module")


def parse_tau(tau: Any) -> float | str | dict[str, float]:
    """Check a ``tau`` argument and return it in canonical form.

    Accepted: a number >= 0 (``0`` = independent tasks, ``float("inf")`` = one shared adapter,
    also the strings ``"inf"``/``"0"``), ``"learn"``, or a mapping ``{group: value}`` of finite
    positive numbers (one fixed precision per group, see ``precision_groups``).
    """
    if isinstance(tau, str):
        low = tau.strip().lower()
        if low == "learn":
            return "learn"
        try:
            tau = float(low)
        except ValueError:
            raise ValueError(
                f"tau={tau!r} is not understood; pass a number >= 0 (0 = independent tasks, "
                "float('inf') = one pooled adapter), 'learn', or a dict {group: value}."
            ) from None
    if isinstance(tau, dict):
        out = {}
        for k, v in tau.items():
            v = float(v)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"tau[{k!r}]={v!r}: per-group precisions must be finite and > 0; use a single "
                    "tau=0 or tau=float('inf') for the independent and pooled limits."
                )
            out[str(k)] = v
        if not out:
            raise ValueError("tau={} is empty; give one value per precision group.")
        return out
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"tau must be a number, 'learn' or a dict, got {type(tau).__name__} {tau!r}.")
    tau = float(tau)
    if math.isnan(tau) or tau < 0:
        raise ValueError(f"tau={tau!r} must be >= 0 (0 = independent tasks, inf = pooled).")
    return tau


@dataclass
class BoraConfig:
    """The model: LoRA shape and the hierarchical prior.

    Attributes
    ----------
    rank, alpha
        LoRA rank r and alpha; each adapted layer computes ``W x + (alpha / r) B A x``.
    target_modules
        Layers to adapt (names or name suffixes, as in PEFT); ``None`` = every linear layer in
        the transformer blocks.
    tau
        Precision of the prior ``theta_d ~ Normal(Theta, tau^-1 I)``. ``0``: independent task
        adapters (no prior, exactly); ``inf``: one adapter shared by all tasks (exactly);
        ``"learn"``: a Gamma hyperprior, the value estimated in the same run (empirical Bayes);
        a dict ``{group: tau}`` fixes one value per precision group. With the likelihood a true
        sum of token log-probabilities, tau is the inverse variance of one LoRA entry around
        the global adapter: useful values are roughly ``1e2 .. 1e6`` (see the README).
    precision_groups
        ``"shared"`` (one tau), ``"ab"`` (one for all A matrices, one for all B: they live on
        very different scales) or ``"module"`` (one per module kind and A|B).
    tau_prior
        ``(concentration, rate)`` of the Gamma hyperprior on each learned tau.
    tau_init
        Starting value of a learned tau.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: Sequence[str] | None = None
    tau: float | str | dict[str, float] = "learn"
    precision_groups: str = "ab"
    tau_prior: tuple[float, float] = (1.0, 1e-3)
    tau_init: float = 1e3
    version: str = field(default="")

    def __post_init__(self) -> None:
        from . import __version__

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got rank={self.rank!r}.")
        self.alpha = float(self.alpha)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got alpha={self.alpha!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        self.tau = parse_tau(self.tau)
        if self.precision_groups not in PRECISION_GROUPINGS:
            raise ValueError(
                f"precision_groups={self.precision_groups!r} is not valid; choose one of "
                f"{PRECISION_GROUPINGS}."
            )
        a, b = (float(x) for x in self.tau_prior)
        if not (a > 0 and b >= 0):
            raise ValueError(
                f"tau_prior=(concentration, rate)={self.tau_prior!r} needs concentration > 0 and rate >= 0."
            )
        self.tau_prior = (a, b)
        self.tau_init = float(self.tau_init)
        if not (math.isfinite(self.tau_init) and self.tau_init > 0):
            raise ValueError(f"tau_init must be finite and > 0, got {self.tau_init!r}.")
        self.version = self.version or __version__

    @property
    def mode(self) -> str:
        """``"independent"`` (tau = 0), ``"pooled"`` (tau = inf), ``"learn"`` or ``"fixed"``."""
        if self.tau == "learn":
            return "learn"
        if isinstance(self.tau, float) and self.tau == 0.0:
            return "independent"
        if isinstance(self.tau, float) and math.isinf(self.tau):
            return "pooled"
        return "fixed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (``inf`` is written as the string ``"inf"``)."""
        d = asdict(self)
        if isinstance(self.tau, float) and math.isinf(self.tau):
            d["tau"] = "inf"
        d["tau_prior"] = list(self.tau_prior)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BoraConfig":
        d = dict(d)
        d["tau_prior"] = tuple(d.get("tau_prior", (1.0, 1e-3)))
        return cls(**d)
