"""bora_pyro: Bayesian hierarchical LoRA (BoRA) for many related tasks, in Pyro."""

__version__ = "0.1.0"
