"""Reports on a fitted BoRA model: arviz export, figures, calibration and an HTML report.

arviz and matplotlib are imported when a function needs them, not with the package.
"""

from .arviz import diagonal_fisher, shrinkage_factors, to_inference_data
from .calibration import Calibration, calibration_per_task, expected_calibration_error
from .html import write_report

__all__ = [
    "Calibration", "calibration_per_task", "diagonal_fisher", "expected_calibration_error",
    "shrinkage_factors", "to_inference_data", "write_report",
]
