"""A `BoraResult` built directly (no fit) from a tiny random LM and random adapters, in well under a second."""

from __future__ import annotations

import pandas as pd
import torch

from bora_pyro import BoraConfig, BoraResult
from bora_pyro.data import build_corpus
from bora_pyro.models.lora import MultiTaskLM
from bora_pyro.testing import char_tokenizer, tiny_causal_lm

#: Task names with characters that are unsafe in folder names, and two that clash once made safe.
TASKS = ("HAMLET (Hamlet)", "OPHELIA", "hamlet_hamlet")


def tiny_result(
    family: str = "llama",
    *,
    tasks: tuple[str, ...] = TASKS,
    tau: float | dict = 100.0,
    precision_groups: str = "ab",
    scale: float = 0.3,
    pooled: bool = False,
    seed: int = 1,
) -> BoraResult:
    """A result whose adapters are ``scale * N(0, 1)`` draws (all equal to the global one if ``pooled``).

    The base model is ``tiny_causal_lm(family)`` (seed 0), wrapped with rank 4, alpha 8 on all
    block projections; the corpus has 4 short documents per task.
    """
    tokenizer = char_tokenizer()
    frame = pd.DataFrame({"task": [t for t in tasks for _ in range(4)], "text": ["to be or not to be"] * (4 * len(tasks))})
    corpus = build_corpus(frame, tokenizer, tasks=list(tasks), max_length=32, seed=0)
    lm = MultiTaskLM(tiny_causal_lm(family), rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    global_adapter = scale * torch.randn(lm.layout.size, generator=g)
    if pooled:
        task_adapters = global_adapter.expand(len(tasks), -1).clone()
    else:
        task_adapters = global_adapter + scale * torch.randn(len(tasks), lm.layout.size, generator=g)
    config = BoraConfig(rank=4, alpha=8, tau=tau, precision_groups=precision_groups)
    if isinstance(tau, dict):
        taus = dict(tau)
    else:
        names, _ = lm.layout.group_index(precision_groups)
        taus = {name: float(tau) for name in names}
    return BoraResult(
        tasks=list(corpus.tasks), task_adapters=task_adapters, global_adapter=global_adapter,
        tau=taus, config=config, history={}, lm=lm, tokenizer=tokenizer, corpus=corpus,
        model_spec="<object>",
    )
