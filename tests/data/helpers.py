"""Shared helpers of the data tests: a character tokenizer with optional BOS / pad tokens, a
random multi-task table, and comparisons of corpora."""

import string
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2


def make_tokenizer(*, pad=True, bos=True):
    """A character-level tokenizer: one id per printable character."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    kwargs = {"eos_token": "</s>", "unk_token": "<unk>"}
    if bos:
        kwargs["bos_token"] = "<s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def make_frame(sizes=None, seed=0):
    """Documents of random words for tasks named by ``sizes`` (task -> document count)."""
    sizes = sizes or {"beta": 12, "alpha": 20, "gamma": 5}
    rng = np.random.default_rng(seed)
    rows = []
    for task, n in sizes.items():
        for i in range(n):
            words = [
                "".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 6)))
                for _ in range(rng.integers(1, 8))
            ]
            rows.append({"task": task, "text": f"{task} {i}: " + " ".join(words)})
    order = rng.permutation(len(rows))
    return pd.DataFrame([rows[i] for i in order])


def decode(tokenizer, ids):
    return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def all_batches(split, batch_size=4, **kwargs):
    return list(split.batches(batch_size, **kwargs))


def assert_corpora_equal(a, b):
    ta, ma = a.state_dict()
    tb, mb = b.state_dict()
    assert ma == mb
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


SMOLLM2_TEMPLATE = (Path(__file__).parent / "smollm2_chat_template.jinja").read_text(encoding="utf-8")
CHATML = ["<|im_start|>", "<|im_end|>"]


def make_chat_tokenizer(template=SMOLLM2_TEMPLATE):
    """A character-level tokenizer shaped like SmolLM2's: ``<|im_start|>`` (BOS) and
    ``<|im_end|>`` (EOS and pad) are single special tokens, every other character one token,
    and ``template`` its chat template (default: SmolLM2's, as read from its GGUF file)."""
    vocab = {tok: i for i, tok in enumerate(["<unk>", *CHATML])}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(CHATML)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<unk>",
    )
    tokenizer.chat_template = template
    return tokenizer


def chat_frame(n_per_task=(6, 8), seed=0):
    """Two-turn conversations (user, assistant) with a task column and a metadata dict naming
    the same task as ``speaker``."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, n in enumerate(n_per_task):
        for i in range(n):
            words = " ".join(rng.choice(["to", "be", "or", "not", "ay", "no"], size=rng.integers(1, 5)))
            rows.append({
                "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": words}],
                "metadata": {"speaker": f"speaker{d}", "line": i},
                "task": f"speaker{d}",
            })
    return pd.DataFrame(rows)
