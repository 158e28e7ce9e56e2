"""Tiny models and tokenizers for tests, notebooks' fast mode and examples.

Everything here is built from a config in well under a second on a CPU and needs no files or
network: a character-level tokenizer and randomly initialised causal LMs of the Llama, GPT-2,
OPT and Qwen2 families (the layer types BoRA must wrap: ``nn.Linear`` and GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import string

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["char_tokenizer", "tiny_causal_lm", "synthetic_corpus_frame", "TINY_FAMILIES"]

TINY_FAMILIES = ("llama", "gpt2", "opt", "qwen2")


def char_tokenizer(*, pad_token: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``string.printable`` (104 ids).

    Parameters
    ----------
    pad_token
        Whether the tokenizer has a pad token. ``False`` mimics the many causal-LM tokenizers
        that ship without one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    kwargs = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    if pad_token:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def tiny_causal_lm(
    family: str = "llama",
    *,
    vocab_size: int = 104,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given family, in eval mode, fp32.

    Parameters
    ----------
    family
        One of ``TINY_FAMILIES``: ``"llama"`` (q/k/v/o/gate/up/down ``nn.Linear``), ``"gpt2"``
        (``Conv1D`` layers), ``"opt"`` or ``"qwen2"``.
    vocab_size, hidden_size, num_layers
        Shape of the model. ``vocab_size`` must cover the tokenizer (104 for `char_tokenizer`).
    seed
        Seed of the random weights.
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    heads = 4
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # char_tokenizer's ids
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=512, **ids,
        )
        cls = LlamaForCausalLM
    elif family == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=512, **ids,
        )
        cls = Qwen2ForCausalLM
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=heads,
            n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
        cls = GPT2LMHeadModel
    elif family == "opt":
        config = OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, ffn_dim=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, word_embed_proj_dim=hidden_size,
            max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, **ids,
        )
        cls = OPTForCausalLM
    else:
        raise ValueError(f"family={family!r} is not a tiny model family; choose one of {TINY_FAMILIES}.")
    torch.manual_seed(seed)
    model = cls(config)
    return model.eval()


_SHARED_WORDS = ("the", "and", "of", "to", "thou", "my", "is", "not", "with", "be")
_TASK_WORDS = (
    ("sword", "crown", "war", "blood"), ("love", "rose", "kiss", "moon"),
    ("gold", "ship", "sea", "trade"), ("ghost", "grave", "night", "bones"),
    ("wine", "song", "feast", "dance"), ("law", "court", "seal", "oath"),
)


def synthetic_corpus_frame(
    docs_per_task: tuple[int, ...] = (12, 24, 48), *, words_per_doc: tuple[int, int] = (6, 12), seed: int = 0
):
    """A small multi-task text table (``task``, ``text``) whose tasks truly differ.

    Every document mixes words shared by all tasks with words of its own task, so a shared
    adapter helps every task and a task adapter helps more. Up to 6 tasks.
    """
    import numpy as np
    import pandas as pd

    if len(docs_per_task) > len(_TASK_WORDS):
        raise ValueError(f"At most {len(_TASK_WORDS)} tasks, got docs_per_task={docs_per_task}.")
    rng = np.random.default_rng(seed)
    rows = []
    for d, n in enumerate(docs_per_task):
        own = _TASK_WORDS[d]
        for _ in range(n):
            k = int(rng.integers(words_per_doc[0], words_per_doc[1] + 1))
            words = [
                own[rng.integers(len(own))] if rng.random() < 0.5 else _SHARED_WORDS[rng.integers(len(_SHARED_WORDS))]
                for _ in range(k)
            ]
            rows.append({"task": f"task{d}", "text": " ".join(words)})
    return pd.DataFrame(rows)
