"""Tiny models and tokenizers for tests, notebooks' fast mode and examples.

Everything here is built from a config in well under a second on a CPU and needs no files or
network: a character-level tokenizer and randomly initialised causal LMs of the Llama, GPT-2,
OPT and Qwen2 families (the layer types BoRA must wrap: ``nn.Linear`` and GPT-2's ``Conv1D``),
a synthetic multi-task text table, a corpus drawn from BoRA's own model with a known tau
(`generated_corpus`, for recovery tests), and brute-force P x P curvatures of a tiny model's
task likelihoods (`task_hessians`, the reference for Laplace sds).
"""

from __future__ import annotations

import string

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["char_tokenizer", "tiny_causal_lm", "synthetic_corpus_frame", "generated_corpus", "task_hessians", "TINY_FAMILIES"]

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


def generated_corpus(
    true_tau: float,
    docs_per_task: tuple[int, ...] = (10, 20, 40, 80, 160, 160),
    *,
    rank: int = 2,
    alpha: float = 4.0,
    target_modules: tuple[str, ...] = ("lm_head",),
    doc_length: int = 40,
    validation_size: float = 0.0,
    seed: int = 0,
):
    r"""A corpus drawn from BoRA's own model with a known precision: for tests of tau recovery.

    On ``tiny_causal_lm("llama", seed=0)`` with LoRA (``rank``, ``alpha``, ``target_modules``):
    ``Theta`` is the standard LoRA initialisation plus ``N(0, 1)`` on every B entry,
    ``theta_d ~ Normal(Theta, true_tau^-1 I)`` for each task, and each of task d's
    ``docs_per_task[d]`` documents is ``doc_length`` characters sampled one after another from
    the adapted model's next-token distribution, restricted to the 100 characters of
    ``string.printable`` (every id but the 4 special ones, and read back exactly by
    `char_tokenizer`), so that the fitted model family contains the generating one. (A generator
    restricted to a subset of the vocabulary makes the fit spend the adapters on pushing the
    other tokens' logits down: a misspecification that biases tau.)

    Returns
    -------
    ``(corpus, base, tokenizer)``: a `TaskCorpus` (20% of each task's documents held out as
    test, ``validation_size`` for validation), the fresh base model to fit, and the tokenizer.
    """
    import pandas as pd

    from .data import build_corpus
    from .models import MultiTaskLM

    tok = char_tokenizer()
    allowed = torch.tensor([tok.convert_tokens_to_ids(c) for c in string.printable])
    targets = list(target_modules)
    base = tiny_causal_lm("llama", seed=0)
    lm = MultiTaskLM(base, rank=rank, alpha=alpha, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    _, group = lm.layout.group_index("ab")
    Theta = lm.layout.init_global(generator=g) + (group == 1) * torch.randn(lm.num_params, generator=g)
    theta = Theta + torch.randn(len(docs_per_task), lm.num_params, generator=g) / true_tau**0.5
    task_ids = torch.repeat_interleave(torch.arange(len(docs_per_task)), torch.tensor(docs_per_task))
    ids = torch.full((len(task_ids), 1), tok.bos_token_id)
    with torch.no_grad():
        for _ in range(doc_length):
            logits = lm(ids, adapters=theta, task_ids=task_ids)[:, -1, allowed]
            ids = torch.cat([ids, allowed[torch.multinomial(logits.softmax(-1), 1, generator=g)]], 1)
    lm.unwrap()
    frame = pd.DataFrame({"task": [f"t{d}" for d in task_ids.tolist()],
                          "text": [tok.decode(row[1:]) for row in ids]})
    corpus = build_corpus(frame, tok, max_length=64, test_size=0.2, validation_size=validation_size, seed=0)
    return corpus, base, tok


def task_hessians(lm, task_adapters: torch.Tensor, train, *, kind: str = "hessian") -> torch.Tensor:
    r"""``[D, P, P]`` exact curvature of each task's training NLL in its own adapter (float64).

    By `torch.autograd.functional.hessian` of ``f_d(theta) = sum_{n in d} NLL_n(theta)`` over
    all of task d's documents in one batch: P backward passes, for models small enough.

    Parameters
    ----------
    lm
        The `MultiTaskLM` (e.g. a fit result's ``lm``).
    task_adapters
        ``[D, P]`` point at which to evaluate.
    train
        The `TaskSplit` whose documents make each task's likelihood.
    kind
        ``"hessian"`` (observed labels) or ``"ggn"``: the generalised Gauss-Newton, equal to the
        true Fisher for a softmax likelihood, as the Hessian of the cross-entropy against the
        model's own probabilities held fixed at ``task_adapters``.
    """
    from .data import IGNORE_INDEX
    from .inference.curvature import lm_logits, next_token_targets

    if kind not in ("hessian", "ggn"):
        raise ValueError(f"kind={kind!r} is not a curvature; choose 'hessian' or 'ggn'.")
    logits_fn = lm_logits(lm)
    task_ids = train.batch(list(range(len(train)))).task_ids.tolist()
    out = []
    for d, theta_d in enumerate(task_adapters.detach().double()):
        batch = train.batch([i for i, t in enumerate(task_ids) if t == d])
        n = batch.input_ids.shape[0]
        targets = next_token_targets(batch.labels)
        scored = targets != IGNORE_INDEX

        def log_probs(theta: torch.Tensor) -> torch.Tensor:
            return logits_fn(theta.float().expand(n, -1), batch)[0][scored].double().log_softmax(-1)

        if kind == "hessian":
            def f(theta: torch.Tensor) -> torch.Tensor:
                return -log_probs(theta).gather(1, targets[scored, None]).sum()
        else:
            with torch.no_grad():
                probs = log_probs(theta_d).exp()

            def f(theta: torch.Tensor) -> torch.Tensor:
                return -(probs * log_probs(theta)).sum()

        out.append(torch.autograd.functional.hessian(f, theta_d.clone(), vectorize=True))
    return torch.stack(out)
