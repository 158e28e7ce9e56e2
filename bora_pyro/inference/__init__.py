"""How the posterior is approximated and fitted: delta guide + AdamW (MAP), evidence updates for tau."""

from .fit import fit_map
from .loop import FitState, run_steps
from .map import MAPState, MAPStepper, map_guide, optimise_map
from .precision import FisherEstimate, evidence_update

__all__ = ["FisherEstimate", "FitState", "MAPState", "MAPStepper", "run_steps", "evidence_update", "fit_map", "map_guide", "optimise_map"]
