"""What is random and how it is tied together: the multi-task LoRA LM and the BoRA Pyro model."""

from .bora import BoraModel, lm_log_likelihood
from .builder import build_bora
from .layout import AdapterLayout, AdapterSlot
from .lora import MultiTaskLM, MultiTaskLoRALinear, find_target_modules

__all__ = [
    "AdapterLayout", "AdapterSlot", "BoraModel", "MultiTaskLM", "MultiTaskLoRALinear",
    "build_bora", "find_target_modules", "lm_log_likelihood",
]
