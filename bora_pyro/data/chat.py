"""Conversations as documents: the chat template, and which tokens are the assistant's.

A conversation is a list of turns ``{"role": ..., "content": ...}`` (the ``messages`` format of
TRL's ``SFTTrainer``; other keys of a turn are passed to the template). It is rendered with the
tokenizer's chat template (``tokenizer.apply_chat_template``) and tokenised as one text; only
the assistant's tokens are scored. Which tokens those are is read from the template in one of
two ways:

1. **Generation markers.** A template that wraps the assistant's text in
   ``{% generation %} ... {% endgeneration %}`` tells it directly: the mask is transformers'
   ``return_assistant_tokens_mask=True``, exactly the marked tokens.
2. **Incremental rendering** (templates without markers, SmolLM2's among them). For each
   assistant turn ``k`` the conversation is rendered twice more: the turns before ``k`` with
   the generation prompt (``add_generation_prompt=True``, which ends with the assistant header
   such as ``<|im_start|>assistant\\n``), and the turns up to and including ``k``. The first
   must be a prefix of the second and the second a prefix of the whole conversation; the text
   between the two ends is the turn's answer, less the whitespace the template writes after
   it (so for ChatML templates the answer's text and its ``<|im_end|>`` are scored, as a
   marked template would score them). A token is scored when its characters overlap an
   answer (transformers' rule for marked templates too).

A template for which neither works (it renders earlier turns differently once later ones
follow, e.g. one that drops the reasoning of earlier answers) is refused with an error that
says so and how to fix it: add generation markers to ``tokenizer.chat_template``.

The token sequence of a conversation is the rendered tokens, after the corpus' start token
unless the template already begins with it (SmolLM2's start token ``<|im_start|>`` opens every
rendering), so that training and generation (:func:`chat_prompt_ids`) see the same tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .readers import is_missing

__all__ = [
    "ASSISTANT_ROLE",
    "MASK_METHODS",
    "chat_template_of",
    "has_generation_markers",
    "conversation_values",
    "is_conversation",
    "conversation_checks",
    "encode_conversations",
    "with_start",
    "chat_prompt_ids",
]

#: The role whose turns are scored.
ASSISTANT_ROLE = "assistant"
#: How the assistant mask was found: from ``{% generation %}`` markers, or by rendering
#: the prefixes of the conversation.
MASK_METHODS = ("generation_markers", "incremental")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_EXAMPLE = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]'


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template (its default one when it has several).

    Raises
    ------
    ValueError
        If the tokenizer has no chat template; the message says how to set one.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template, so conversations cannot be rendered; use "
            f"an instruct/chat model's tokenizer, or set one: tokenizer.chat_template = "
            f"'<a Jinja template>'."
        )
    return template


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks the assistant's text with ``{% generation %}``."""
    return bool(_GENERATION_TAG.search(template))


def is_conversation(value: Any) -> bool:
    """Whether ``value`` looks like one conversation: a non-empty list of mappings."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(turn, Mapping) for turn in value)
    )


# --------------------------------------------------------------------------------------------
# the column
# --------------------------------------------------------------------------------------------


def conversation_values(
    values: list, rows: np.ndarray, row_tasks: list[str], column: str
) -> list[list[dict]]:
    """The conversations of ``values`` at ``rows``, checked.

    A value is a list of turns (a numpy array of them, as Parquet columns come back, is
    accepted), or in a CSV file its JSON text. A turn is a mapping with a non-empty string
    ``role`` and a string ``content``; every conversation needs at least one assistant turn.

    Returns
    -------
    list of list of dict
        One list of turns (plain dicts, keys with a ``None`` value dropped) per row.

    Raises
    ------
    ValueError
        Naming the column, the row, its task and the turn, with the expected form.
    """
    out = []
    for i in rows.tolist():
        where = f"column {column!r} (messages_column), row {i} (task {row_tasks[i]!r})"
        value = values[i]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(
                    f"{where} holds text that is not a JSON list of turns: {value[:60]!r}. "
                    f"Write each conversation as a list of turns, e.g. {_EXAMPLE}."
                ) from None
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if is_missing(value) or not isinstance(value, (list, tuple)) or not value:
            shown = "an empty list" if isinstance(value, (list, tuple)) else repr(value)[:60]
            raise ValueError(
                f"{where} is {shown}, not a list of turns; each row needs a conversation, e.g. "
                f"{_EXAMPLE}."
            )
        turns = []
        for k, turn in enumerate(value):
            if not isinstance(turn, Mapping):
                raise ValueError(
                    f"{where}, turn {k} is a {type(turn).__name__} ({str(turn)[:40]!r}), not a "
                    f'mapping with "role" and "content".'
                )
            role, content = turn.get("role"), turn.get("content")
            if not isinstance(role, str) or not role:
                raise ValueError(
                    f'{where}, turn {k} has role {role!r}; every turn needs a "role" such as '
                    f'"system", "user" or "assistant".'
                )
            if not isinstance(content, str):
                raise ValueError(
                    f'{where}, turn {k} (role {role!r}) has content {str(content)[:40]!r} of '
                    f'type {type(content).__name__}; "content" must be text.'
                )
            turns.append({key: v for key, v in turn.items() if v is not None})
        if not any(turn["role"] == ASSISTANT_ROLE for turn in turns):
            roles = [turn["role"] for turn in turns]
            raise ValueError(
                f"{where} has no {ASSISTANT_ROLE!r} turn (roles {roles}); only assistant turns "
                f"are scored, so it would add nothing. Drop such rows or fix their roles."
            )
        out.append(turns)
    return out


# --------------------------------------------------------------------------------------------
# rendering and masks
# --------------------------------------------------------------------------------------------


def encode_conversations(
    conversations: Sequence[list[dict]],
    tokenizer: Any,
    *,
    start_id: int,
    max_length: int,
    rows: Sequence[int],
    row_tasks: Sequence[str],
) -> tuple[list[list[int]], list[np.ndarray], str]:
    """Token ids and assistant masks of conversations, each truncated to ``max_length``.

    Parameters
    ----------
    conversations : sequence of list of dict
        Checked conversations (:func:`conversation_values`).
    tokenizer : transformers.PreTrainedTokenizerFast
        With a chat template; a fast tokenizer (character offsets are needed).
    start_id : int
        The corpus' start token, put first unless the rendering begins with it.
    max_length : int
        Tokens kept per conversation, start token included; the rest is cut at the end.
    rows, row_tasks : sequence
        Row of each conversation in the data, and the task of every row (for messages).

    Returns
    -------
    token_lists : list of list of int
        ``[n_d]`` ids per conversation.
    masks : list of numpy.ndarray
        ``[n_d]`` bool per conversation: true at the assistant's tokens (never at position 0).
    method : str
        One of :data:`MASK_METHODS`.

    Raises
    ------
    ValueError
        For a tokenizer without a chat template or without offsets, or a template whose
        renderings of a conversation's prefixes disagree (naming the row and turn).
    """
    template = chat_template_of(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"conversations need a fast tokenizer (one backed by the tokenizers library, which "
            f"reports each token's characters) to find the assistant's tokens; got "
            f"{type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(..., "
            f"use_fast=True)."
        )
    if has_generation_markers(template):
        method = "generation_markers"
        ids, masks = _marked(conversations, tokenizer, rows, row_tasks)
    else:
        method = "incremental"
        ids, masks = _incremental(conversations, tokenizer, rows, row_tasks)
    token_lists, out_masks = [], []
    for toks, mask in zip(ids, masks, strict=True):
        toks, mask = with_start(toks, mask, start_id)
        token_lists.append(toks[:max_length])
        out_masks.append(mask[:max_length])
    return token_lists, out_masks, method


def with_start(ids: list[int], mask: np.ndarray, start_id: int) -> tuple[list[int], np.ndarray]:
    """``ids`` after the start token (unless they begin with it) and the mask to match, false
    at position 0 (the first token has no context)."""
    ids = list(ids)
    mask = np.asarray(mask, dtype=bool)
    if not ids or ids[0] != start_id:
        ids = [start_id, *ids]
        mask = np.concatenate([[False], mask])
    else:
        mask = mask.copy()
        mask[0] = False
    return ids, mask


def _marked(
    conversations: Sequence[list[dict]], tokenizer: Any, rows: Sequence[int], row_tasks: Sequence[str]
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Ids and masks from the template's ``{% generation %}`` markers."""
    encoded = tokenizer.apply_chat_template(
        list(conversations),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
    )
    ids = [list(map(int, toks)) for toks in encoded["input_ids"]]
    masks = [np.asarray(m, dtype=bool) for m in encoded["assistant_masks"]]
    for n, mask in enumerate(masks):
        if not mask.any():
            raise ValueError(
                f"the chat template's {{% generation %}} markers mark no token of the "
                f"conversation at row {rows[n]} (task {row_tasks[rows[n]]!r}), which has an "
                f"assistant turn; wrap every assistant message in the template in "
                f"{{% generation %}} ... {{% endgeneration %}}."
            )
    return ids, masks


def _incremental(
    conversations: Sequence[list[dict]], tokenizer: Any, rows: Sequence[int], row_tasks: Sequence[str]
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Ids and masks by rendering each assistant turn's prefix (see the module docs)."""
    texts, spans = [], []
    for n, conversation in enumerate(conversations):
        text, found = _assistant_spans(conversation, tokenizer, rows[n], row_tasks[rows[n]])
        texts.append(text)
        spans.append(found)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids, masks = [], []
    for toks, offsets, found in zip(encoded["input_ids"], encoded["offset_mapping"], spans, strict=True):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(toks), dtype=bool)
        for start, end in found:
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        ids.append(list(map(int, toks)))
        masks.append(mask)
    return ids, masks


def _assistant_spans(
    conversation: list[dict], tokenizer: Any, row: int, task: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant answer in it."""

    def render(turns: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    full = render(conversation, False)
    spans = []
    for k, turn in enumerate(conversation):
        if turn["role"] != ASSISTANT_ROLE:
            continue
        where = f"the conversation at row {row} (task {task!r}), turn {k}"
        if k == 0:
            raise ValueError(
                f"{where} is an assistant turn with nothing before it: the chat template has no "
                f"generation markers, so the assistant's tokens are found by rendering the turns "
                f"before each answer, and there are none. Start the conversation with a system "
                f"or user turn, or add {{% generation %}} markers to tokenizer.chat_template."
            )
        before = render(conversation[:k], True)
        upto = render(conversation[: k + 1], False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise ValueError(
                f"cannot find the assistant's tokens in {where}: the chat template has no "
                f"{{% generation %}} markers, and it renders the turns before this answer "
                f"differently once later turns follow (rendering the prefixes of a conversation "
                f"does not give prefixes of its text). Add {{% generation %}} ... "
                f"{{% endgeneration %}} around the assistant's content in "
                f"tokenizer.chat_template (transformers then reports the assistant's tokens "
                f"itself)."
            )
        start = len(before)
        end = start + len(upto[start:].rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def chat_prompt_ids(
    conversations: Sequence[Sequence[Mapping[str, Any]]], tokenizer: Any, *, start_id: int
) -> list[list[int]]:
    """Token ids of conversations to answer: rendered with ``add_generation_prompt=True``, after
    the start token as in :func:`encode_conversations`.

    Parameters
    ----------
    conversations : sequence of list of mapping
        Each a non-empty list of ``{"role", "content"}`` turns (usually ending with a user turn).
    tokenizer : transformers.PreTrainedTokenizerBase
        With a chat template.
    start_id : int
        The corpus' start token.

    Returns
    -------
    list of list of int
        One id list per conversation, ending with the template's assistant header.
    """
    chat_template_of(tokenizer)
    checked = conversation_checks(conversations)
    texts = [
        tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        for turns in checked
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [with_start(ids, np.zeros(len(ids), dtype=bool), start_id)[0] for ids in encoded]


def conversation_checks(conversations: Sequence[Any]) -> list[list[dict]]:
    """Conversations to answer, checked: each a non-empty list of turns with a string ``role``
    and ``content`` (no assistant turn needed)."""
    out = []
    for n, turns in enumerate(conversations):
        if not is_conversation(turns):
            raise ValueError(
                f"conversation {n} is {str(turns)[:60]!r}; a conversation is a non-empty list of "
                f"turns, e.g. [{{'role': 'user', 'content': 'Hi'}}]."
            )
        for k, turn in enumerate(turns):
            if not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise ValueError(
                    f"conversation {n}, turn {k} is {dict(turn)!r}; every turn needs a string "
                    f'"role" and a string "content".'
                )
        out.append([dict(turn) for turn in turns])
    return out
