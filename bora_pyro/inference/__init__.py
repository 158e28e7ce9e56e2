"""How the posterior is approximated and fitted: delta guide (MAP) or mean-field Normal (SVI), AdamW,
and a learned tau by evidence (MAP) or variational-EM (SVI) updates."""

from .fit import fit_map, fit_svi
from .loop import FitState, Stepper, run_steps
from .map import MAPStepper, PointGuide, optimise_map
from .precision import FisherEstimate, evidence_update
from .svi import MeanFieldGuide, SVIStepper, optimise_svi, variational_em_tau

__all__ = [
    "FisherEstimate", "FitState", "MAPStepper", "MeanFieldGuide", "PointGuide", "SVIStepper",
    "Stepper", "evidence_update", "fit_map", "fit_svi", "optimise_map", "optimise_svi",
    "run_steps", "variational_em_tau",
]
