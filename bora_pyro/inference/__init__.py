"""How the posterior is approximated and fitted: delta guide + AdamW (MAP), evidence updates for tau."""

from .fit import fit_map
from .map import MAPState, map_guide, optimise_map
from .precision import FisherEstimate, evidence_update

__all__ = ["FisherEstimate", "MAPState", "evidence_update", "fit_map", "map_guide", "optimise_map"]
