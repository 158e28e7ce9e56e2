"""bora_pyro: Bayesian hierarchical LoRA (BoRA) for many related tasks, in Pyro.

One frozen causal LM, one LoRA adapter per task, all tied to a learned global adapter by
``theta_d ~ Normal(Theta, tau^-1 I)``. Start with `fit_map` (MAP) or `fit_svi` (a posterior).
"""

from ._version import __version__
from .config import BoraConfig
from .inference import fit_map, fit_svi
from .reports import to_inference_data
from .result import BoraResult, load_result

__all__ = ["BoraConfig", "BoraResult", "fit_map", "fit_svi", "load_result", "to_inference_data", "__version__"]
