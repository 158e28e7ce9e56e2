"""Use the fitted adapters: logits and text generation, many tasks in one batch.

Every row of a batch names its own task; the multi-task LoRA layers apply each row's adapter in
one forward pass (no loop over tasks, no adapter switching), also inside Hugging Face
``generate`` with its KV cache.

Prompts are text to continue, or conversations to answer: lists of ``{"role", "content"}``
turns, rendered with the tokenizer's chat template and its generation prompt
(``add_generation_prompt=True``) exactly as conversations are rendered for training (see
`bora_pyro.data.chat`), so the continuation is the assistant's next answer.

Which adapter a task name selects
---------------------------------
* a task of the fitted result: its own adapter ``theta_d``;
* the reserved name ``"<global>"`` (`GLOBAL_TASK`): the global adapter ``Theta`` (the MAP
  estimate for a new task that has no data yet);
* any other name: a ``ValueError`` listing valid names, unless ``unseen`` says otherwise:
  ``unseen="global"`` gives such names the global adapter; ``unseen="sample"`` gives each
  distinct unseen name one draw ``theta ~ Normal(Theta, tau^-1)`` from the hierarchical prior
  (`draw_task_adapters`, seeded by ``seed``), a plausible adapter for a task the model has not
  seen.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from .checks import choice, positive_int
from .data.chat import chat_prompt_ids, is_conversation

__all__ = ["GLOBAL_TASK", "UNSEEN_CHOICES", "draw_task_adapters", "generate", "resolve_adapters", "task_logits"]

#: Reserved task name for the global adapter Theta.
GLOBAL_TASK = "<global>"
#: What to do with a task name the result was not fitted on.
UNSEEN_CHOICES = ("error", "global", "sample")

# generate() keywords that would change the rows of the batch in ways the row-wise adapters
# cannot follow, or that this module sets itself.
_REJECTED = {
    "assistant_model": "assisted generation runs a second model on other rows",
    "prompt_lookup_num_tokens": "assisted generation (prompt lookup) changes the rows",
    "penalty_alpha": "contrastive search is not supported",
    "num_beam_groups": "group beam search is not supported",
    "constraints": "constrained beam search is not supported",
    "force_words_ids": "constrained beam search is not supported",
    "custom_generate": "custom generation strategies are not supported",
    "input_ids": "pass prompts as text",
    "inputs": "pass prompts as text",
    "inputs_embeds": "pass prompts as text",
    "attention_mask": "the mask is built from the prompts",
    "past_key_values": "the cache is built here",
}


def draw_task_adapters(
    result: Any,
    num_draws: int = 1,
    *,
    seed: int = 0,
    global_adapter: torch.Tensor | None = None,
    tau: dict[str, float] | None = None,
) -> torch.Tensor:
    """Adapters for unseen tasks drawn from the hierarchical prior: ``theta ~ Normal(Theta, tau^-1 I)``.

    Each parameter ``i`` gets ``theta_i = Theta_i + eps_i / sqrt(tau_g(i))`` with ``eps ~ N(0, 1)``
    and ``g(i)`` its precision group (``result.lm.layout.group_index(result.config.precision_groups)``).
    In the pooled limit (tau = inf) every draw equals Theta.

    This is the hook for posterior predictive adapters: for a MAP result Theta and tau are point
    estimates (``result.global_adapter``, ``result.tau``); a result with a posterior over them
    (SVI) can pass a posterior draw of each as ``global_adapter`` and ``tau``.

    Parameters
    ----------
    result
        A fitted `BoraResult` with finite or infinite (not zero) precisions.
    num_draws
        S, the number of adapters to draw.
    seed
        Seed of the draw (a private generator; the global RNG is untouched).
    global_adapter
        ``[P]`` Theta to draw around (default ``result.global_adapter``).
    tau
        ``{group: precision}`` (default ``result.tau``).

    Returns
    -------
    ``[S, P]`` fp32 on the CPU.

    Raises
    ------
    ValueError
        For tau = 0 (independent tasks: the prior says nothing about a new task) or groups that
        do not match the result's precision groups.
    """
    num_draws = positive_int("num_draws", num_draws)
    theta0 = (result.global_adapter if global_adapter is None else global_adapter).detach().float().cpu()
    tau = dict(result.tau if tau is None else tau)
    names, index = result.lm.layout.group_index(result.config.precision_groups)
    if sorted(tau) != sorted(names):
        raise ValueError(
            f"tau has groups {sorted(tau)}, but precision_groups={result.config.precision_groups!r} "
            f"has groups {names}; pass one precision per group."
        )
    values = torch.tensor([float(tau[g]) for g in names], dtype=torch.float64)
    if (values <= 0).any() or values.isnan().any():
        bad = {g: tau[g] for g in names if not float(tau[g]) > 0}
        raise ValueError(
            f"cannot draw a new task's adapter with tau={bad}: with tau = 0 (independent tasks) the "
            "prior says nothing about a new task. Use the global adapter instead "
            f"(task={GLOBAL_TASK!r} or unseen='global'), or fit with tau > 0."
        )
    scale = values.rsqrt().float()[index]  # [P]; 0 where tau = inf
    generator = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(num_draws, theta0.shape[-1], generator=generator)
    return theta0 + eps * scale


def resolve_adapters(
    result: Any, tasks: Sequence[str], *, unseen: str = "error", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters a list of task names selects, as one stack and a row index into it.

    Parameters
    ----------
    result
        A fitted `BoraResult`.
    tasks
        One task name per row (see the module docs for ``"<global>"`` and unseen names).
    unseen
        ``"error"``, ``"global"`` or ``"sample"`` (one seeded prior draw per distinct unseen name).
    seed
        Seed of the draws for ``unseen="sample"``.

    Returns
    -------
    adapters
        ``[K, P]`` fp32, the K distinct adapters used, in order of first use.
    task_ids
        ``LongTensor [N]``: row n uses ``adapters[task_ids[n]]``.
    """
    unseen = choice("unseen", unseen, UNSEEN_CHOICES)
    known = set(result.tasks)
    order: dict[str, int] = {}
    for name in tasks:
        if name not in order:
            order[name] = len(order)
    unseen_names = [n for n in order if n != GLOBAL_TASK and n not in known]
    if unseen_names and unseen == "error":
        _raise_unknown(result, unseen_names[0])
    draws = (
        dict(zip(unseen_names, draw_task_adapters(result, len(unseen_names), seed=seed)))
        if unseen_names and unseen == "sample" else {}
    )
    stack = []
    for name in order:
        if name == GLOBAL_TASK or (name not in known and unseen == "global"):
            stack.append(result.global_adapter.detach().float().cpu())
        elif name in draws:
            stack.append(draws[name])
        else:
            stack.append(result.task_adapters[result.tasks.index(name)].detach().float().cpu())
    ids = torch.tensor([order[name] for name in tasks], dtype=torch.long)
    return torch.stack(stack), ids


def task_logits(
    result: Any,
    input_ids: torch.Tensor,
    task: str | Sequence[str],
    attention_mask: torch.Tensor | None = None,
    *,
    unseen: str = "error",
    seed: int = 0,
) -> torch.Tensor:
    """Logits of the base model with each row's task adapter applied, in one forward pass.

    Parameters
    ----------
    result
        A fitted `BoraResult`.
    input_ids
        ``LongTensor [N, L]`` token ids (start each row with ``result.corpus.start_token_id``,
        as the training documents were).
    task
        One task name for every row, or a list of N names (one per row); ``"<global>"`` for the
        global adapter.
    attention_mask
        ``[N, L]`` (1 for tokens, 0 for padding), optional.
    unseen, seed
        What to do with names the result was not fitted on, see `resolve_adapters`.

    Returns
    -------
    ``[N, L, V]`` logits (no gradient), on the model's device.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [N, L] tensor of token ids, got {shape}; use ids[None] for one row.")
    names = _task_list(task, input_ids.shape[0])
    adapters, task_ids = resolve_adapters(result, names, unseen=unseen, seed=seed)
    device = result.lm.device
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; "
                "they must be equal."
            )
        attention_mask = attention_mask.to(device)
    with torch.no_grad():
        return result.lm(
            input_ids.to(device), attention_mask,
            adapters=adapters.to(device), task_ids=task_ids.to(device),
        )


def generate(
    result: Any,
    prompts: str | Sequence[str] | Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
    task: str | Sequence[str],
    *,
    max_new_tokens: int = 50,
    unseen: str = "error",
    seed: int | None = None,
    **generation_kwargs: Any,
) -> list[str]:
    """Continue each prompt with its own task's adapter; prompts of many tasks in one batch.

    Each prompt is tokenised as the training documents were (the corpus' start token, then the
    text without special tokens; a conversation rendered by the chat template with its
    generation prompt), the batch is left-padded, and Hugging Face ``generate`` runs on
    ``result.lm.base_model`` with the row-wise adapters applied (KV cache included).

    Parameters
    ----------
    result
        A fitted `BoraResult`.
    prompts
        One prompt or a list of N prompts (an empty prompt generates from the start token); or
        one conversation (a list of ``{"role", "content"}`` turns) or a list of N of them, each
        answered as the assistant's next turn (the tokenizer needs a chat template).
    task
        One task name for every prompt, or a list of N names; ``"<global>"`` for the global
        adapter.
    max_new_tokens
        Most tokens to generate per prompt.
    unseen
        What to do with names the result was not fitted on (``"error"``, ``"global"``,
        ``"sample"``), see `resolve_adapters`.
    seed
        Seeds sampling (``do_sample=True``) and the draws of ``unseen="sample"``, in a forked RNG
        (the global RNG state is restored afterwards). ``None``: sampling uses the global RNG and
        the draws use seed 0.
    **generation_kwargs
        Passed to ``generate``: ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
        ``repetition_penalty``, ``num_beams``, ``num_return_sequences``, ... Beam search works
        (each prompt's beams share its task's adapter). Assisted, contrastive, group-beam and
        constrained generation are rejected: they change the batch rows in ways the row-wise
        adapters cannot follow.

    Returns
    -------
    The generated continuations (without the prompt; for a conversation, the answer), one per
    prompt, or ``num_return_sequences`` per prompt in prompt order.
    """
    rows = _prompt_rows(result, prompts)
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    _check_generation_kwargs(generation_kwargs)
    names = _task_list(task, len(rows))
    adapters, task_ids = resolve_adapters(result, names, unseen=unseen, seed=0 if seed is None else seed)

    model = result.lm.base_model
    expand = _rows_per_prompt(model, generation_kwargs)
    input_ids, attention_mask = _left_padded(rows, result.corpus.pad_token_id)
    device = result.lm.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    pad_id = result.corpus.pad_token_id
    generation_kwargs.setdefault("pad_token_id", pad_id)
    row_ids = task_ids.repeat_interleave(expand).to(device)

    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None else contextlib.nullcontext()
    with rng, torch.no_grad(), _rows_checked(model, len(row_ids)), result.lm.adapters_applied(adapters.to(device), row_ids):
        if seed is not None:
            torch.manual_seed(int(seed))
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            **generation_kwargs,
        )
    sequences = out.sequences if hasattr(out, "sequences") else out
    new_tokens = sequences[:, input_ids.shape[1]:].cpu()
    stop = _stop_ids(model, generation_kwargs)
    texts = []
    for row in new_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(result.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _task_list(task: str | Sequence[str], n: int) -> list[str]:
    if isinstance(task, str):
        return [task] * n
    try:
        names = list(task)
    except TypeError:
        raise ValueError(f"task must be a task name or a list of names, got {task!r}.") from None
    if len(names) != n:
        raise ValueError(
            f"task lists {len(names)} names for {n} rows; give one name per row, or one name for all."
        )
    bad = [t for t in names if not isinstance(t, str)]
    if bad:
        raise ValueError(f"task names must be strings, got {bad[:3]!r}.")
    return names


def _raise_unknown(result: Any, name: str) -> None:
    hint = (
        f" For a task the model was not fitted on use task={GLOBAL_TASK!r} (the global adapter), "
        "or unseen='global' / unseen='sample' (a draw from the prior)."
    )
    corpus = getattr(result, "corpus", None)
    if corpus is not None and hasattr(corpus, "task_index"):
        try:
            corpus.task_index(name)
        except ValueError as err:
            raise ValueError(f"{err}{hint}") from None
    valid = list(result.tasks)
    raise ValueError(
        f"unknown task {name!r}; valid task names include {valid[:10]}{' ...' if len(valid) > 10 else ''}.{hint}"
    )


def _prompt_rows(result: Any, prompts: Any) -> list[list[int]]:
    """Token ids of each prompt: the start token and the text's tokens, or a conversation
    rendered with the chat template's generation prompt."""
    start = result.corpus.start_token_id
    if isinstance(prompts, str):
        prompts = [prompts]
    elif is_conversation(prompts):
        prompts = [prompts]
    prompts = list(prompts) if isinstance(prompts, Sequence) else prompts
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        encoded = result.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [[start, *ids] for ids in encoded]
    if isinstance(prompts, list) and prompts and all(isinstance(p, (list, tuple)) for p in prompts):
        return chat_prompt_ids(prompts, result.tokenizer, start_id=start)
    raise ValueError(
        f"prompts must be a string, a non-empty list of strings, a conversation (a list of "
        f"{{'role', 'content'}} turns) or a non-empty list of conversations, got {str(prompts)[:80]}."
    )


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, L]`` ids (each row left-padded with the corpus' pad id) and the attention mask.

    ``pad_sequence`` rather than ``tokenizer.pad``: the corpus pads with the tokenizer's eos
    token when it has no pad token (GPT-2, Llama), and ``tokenizer.pad`` refuses such tokenizers.
    """
    rows = [torch.tensor(ids, dtype=torch.long) for ids in rows]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    attention_mask = pad_sequence(
        [torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left"
    )
    return input_ids, attention_mask


def _check_generation_kwargs(kwargs: dict) -> None:
    for key, why in _REJECTED.items():
        value = kwargs.get(key)
        harmless = (
            value is None
            or (key == "num_beam_groups" and value == 1)
            or (key == "penalty_alpha" and not value)
        )
        if not harmless:
            shown = f"<{type(value).__name__}>" if isinstance(value, torch.Tensor) else repr(value)
            raise ValueError(f"generate() does not accept {key}={shown} here: {why}.")


def _rows_per_prompt(model: Any, kwargs: dict) -> int:
    """How many batch rows HF ``generate`` makes of one prompt: ``max(num_beams, num_return_sequences)``."""
    config = kwargs.get("generation_config") or model.generation_config

    def value(key: str) -> int:
        v = kwargs.get(key, getattr(config, key, None))
        return positive_int(key, 1 if v is None else v)

    for key in ("penalty_alpha", "num_beam_groups"):
        v = getattr(config, key, None)
        if v not in (None, 1, 0, 0.0) and key not in kwargs:
            raise ValueError(f"the generation_config sets {key}={v!r}: {_REJECTED[key]}.")
    return max(value("num_beams"), value("num_return_sequences"))


@contextlib.contextmanager
def _rows_checked(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Fail loudly if a forward pass sees another number of rows than the adapters were gathered for."""

    def check(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor) and x.shape[0] != rows:
            raise RuntimeError(
                f"generate ran a forward pass on {x.shape[0]} rows, but the task adapters were "
                f"gathered for {rows} rows; this generation mode changes the batch rows and is not "
                "supported with per-row adapters."
            )

    handle = model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _stop_ids(model: Any, kwargs: dict) -> set[int]:
    config = kwargs.get("generation_config") or model.generation_config
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
