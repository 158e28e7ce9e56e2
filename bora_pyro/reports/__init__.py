"""Reports on a fitted BoRA model: arviz export, figures, calibration and an HTML report.

Reports read a fit through the `FitLike` protocol and never import `bora_pyro.result`.
arviz and matplotlib are imported when a function needs them, not with the package.
"""

from .arviz import (
    compare_fits,
    diagonal_fisher,
    heldout_elpd,
    heldout_log_likelihood,
    heldout_table,
    shrinkage_factors,
    to_inference_data,
)
from .calibration import Calibration, calibration_per_task, expected_calibration_error
from .html import write_report
from .protocol import FitLike

__all__ = [
    "Calibration", "FitLike", "calibration_per_task", "compare_fits", "diagonal_fisher",
    "expected_calibration_error", "heldout_elpd", "heldout_log_likelihood", "heldout_table",
    "shrinkage_factors", "to_inference_data", "write_report",
]
