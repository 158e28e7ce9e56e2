"""Multi-task LoRA over a frozen Hugging Face causal LM, in one forward pass per batch.

Each target linear layer ``W`` (``out x in``) of the base model is wrapped so that row ``n`` of a
batch sees ``W + (alpha / r) B_t A_t`` with ``t = task_ids[n]``, the adapter of that row's own
task. The adapters are not parameters of the wrapped layers: they come from one ``[D, P]`` tensor
handed over for the duration of a forward pass (`MultiTaskLM.forward`), so the Pyro model can
treat them as a sample site and the layers stay stateless. There is no Python loop over tasks and
no switching of adapters by name.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..data import IGNORE_INDEX
from .layout import AdapterLayout

__all__ = ["AdapterContext", "MultiTaskLoRALinear", "MultiTaskLM", "find_target_modules"]

# A module inside a numbered block (model.layers.3.mlp.up_proj, transformer.h.0.attn.c_attn).
_IN_BLOCK = re.compile(r"\.\d+\.")


class AdapterContext:
    """What the wrapped layers apply during one forward pass, shared by all of them.

    Attributes
    ----------
    pieces
        ``None`` (plain base model) or one tensor per layout slot (``A`` and ``B`` of each
        module, in layout order): ``[N, size]`` with one row per batch row (``per_row``) or
        ``[size]`` for one adapter applied to every row.
    per_row
        Whether ``pieces`` have one row per batch row.
    """

    __slots__ = ("pieces", "per_row")

    def __init__(self) -> None:
        self.pieces: tuple[torch.Tensor, ...] | None = None
        self.per_row = False


class MultiTaskLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus the per-row LoRA update of its task.

    ``y[n] = base(x[n]) + scaling * x[n] @ A[t_n].T @ B[t_n].T`` with ``A[t]`` ``[r, in]`` and
    ``B[t]`` ``[out, r]`` taken from the context's pieces for this module.
    """

    def __init__(self, base: nn.Module, *, name: str, layout: AdapterLayout, context: AdapterContext):
        super().__init__()
        self.base = base
        self.name = name
        self.layout = layout
        self.context = context
        a, b = layout.slot(name, "A"), layout.slot(name, "B")
        self.a_index, self.b_index = layout.slots.index(a), layout.slots.index(b)
        self.rank, self.in_features = a.shape
        self.out_features = b.shape[0]
        self.scaling = layout.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        pieces = self.context.pieces
        if pieces is None:
            return out
        dtype = out.dtype
        A, B = pieces[self.a_index].to(dtype), pieces[self.b_index].to(dtype)
        if not self.context.per_row:
            A = A.view(self.rank, self.in_features)
            B = B.view(self.out_features, self.rank)
            return out + self.scaling * F.linear(F.linear(x.to(dtype), A), B)
        # Rows come first; some models (OPT's MLP) flatten [N, L, in] to [N * L, in] first.
        n = A.shape[0]
        A = A.view(n, self.rank, self.in_features)
        B = B.view(n, self.out_features, self.rank)
        h = torch.bmm(x.reshape(n, -1, self.in_features).to(dtype), A.transpose(1, 2))
        delta = torch.bmm(h, B.transpose(1, 2)).view(*out.shape)
        return out + self.scaling * delta


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2: weight is [in, out]
        return module.weight.shape[0], module.weight.shape[1]
    return None


def find_target_modules(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[str]:
    """Names of the layers to adapt.

    By default every ``nn.Linear`` / ``Conv1D`` inside the numbered transformer blocks (all
    attention and MLP projections; not the embeddings, not the LM head). ``target_modules``
    overrides it with names matched against the full module name or its last components, as in
    PEFT (``["q_proj", "v_proj"]`` or ``["self_attn.q_proj"]``).
    """
    wrapped = {n + ".base" for n, m in model.named_modules() if isinstance(m, MultiTaskLoRALinear)}
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, MultiTaskLoRALinear) or (_in_out(module) is not None and name not in wrapped)
    ]
    if target_modules is None:
        chosen = [n for n in candidates if _IN_BLOCK.search(n)]
        if not chosen:
            raise ValueError(
                "Could not auto-detect target modules: no nn.Linear or Conv1D inside numbered "
                f"transformer blocks. Pass target_modules=[...] with names from: {candidates[:20]}"
            )
        return chosen
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    chosen, unmatched = [], []
    for t in target_modules:
        hits = [n for n in candidates if n == t or n.endswith("." + t)]
        if not hits:
            unmatched.append(t)
        chosen += [h for h in hits if h not in chosen]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in candidates if _IN_BLOCK.search(n)})
        raise ValueError(
            f"target_modules entries {unmatched} match no nn.Linear/Conv1D layer of this model. "
            f"Valid module kinds here: {kinds} (or pass None to adapt all of them)."
        )
    # Keep the model's own order so that the layout does not depend on the order given.
    return [n for n in candidates if n in set(chosen)]


class MultiTaskLM(nn.Module):
    """A frozen causal LM whose target layers apply per-task LoRA adapters in one forward pass.

    Parameters
    ----------
    base_model
        A Hugging Face causal LM. Its parameters are frozen (``requires_grad=False``); the
        model is wrapped in place (call `unwrap` to restore it). Wrapping a model that is already
        wrapped replaces the old wrappers.
    rank, alpha
        LoRA rank r and alpha (the update is scaled by ``alpha / r``).
    target_modules
        Layers to adapt; see `find_target_modules`.
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        *,
        rank: int,
        alpha: float,
        target_modules: Sequence[str] | None = None,
    ):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got rank={rank!r}.")
        base_model.requires_grad_(False)
        self.base_model = base_model
        existing = _wrappers(base_model)
        if existing:
            # Already wrapped (e.g. several fits sharing one loaded base model): keep the wrappers
            # if they have the same layout, so that earlier results stay usable.
            layout, context = existing[0].layout, existing[0].context
            same = (layout.rank, layout.alpha) == (rank, float(alpha))
            if same and [w.name for w in existing] == find_target_modules(base_model, target_modules):
                self.layout, self.context = layout, context
                self._probe = existing[0]
                self._slot_sizes = [slot.size for slot in layout.slots]
                return
            _unwrap(base_model)
        names = find_target_modules(base_model, target_modules)
        modules = dict(base_model.named_modules())
        self.layout = AdapterLayout([(n, *_in_out(modules[n])) for n in names], rank=rank, alpha=alpha)
        self.context = AdapterContext()
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            wrapped = MultiTaskLoRALinear(modules[name], name=name, layout=self.layout, context=self.context)
            setattr(parent, child, wrapped)
        self._probe = _wrappers(base_model)[0]
        self._slot_sizes = [slot.size for slot in self.layout.slots]

    @property
    def num_params(self) -> int:
        """P, the length of one flat adapter."""
        return self.layout.size

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def unwrap(self) -> PreTrainedModel:
        """Restore the base model's original layers and return it."""
        _unwrap(self.base_model)
        return self.base_model

    @contextmanager
    def adapters_applied(
        self, adapters: torch.Tensor | None, task_ids: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Apply ``adapters`` (``None``, ``[P]`` or ``[D, P]`` with ``task_ids [N]``) inside the block."""
        if adapters is not None:
            if adapters.shape[-1] != self.layout.size:
                raise ValueError(
                    f"adapters have {adapters.shape[-1]} parameters per task but this model's layout "
                    f"has P={self.layout.size}; were they fitted with another rank or target_modules?"
                )
            if adapters.dim() == 2 and task_ids is None:
                raise ValueError("adapters of shape [D, P] need task_ids, one task id per row.")
        probe = self._probe
        if probe.context is not self.context or _get(self.base_model, probe.name) is not probe:
            raise RuntimeError(
                "The base model of this MultiTaskLM was re-wrapped by another one with a different "
                "rank, alpha or target_modules (e.g. a later fit on the same model object); its "
                "adapters no longer apply. Reload the result with bora_pyro.load_result(path)."
            )
        ctx = self.context
        saved = ctx.pieces, ctx.per_row
        if adapters is None:
            ctx.pieces, ctx.per_row = None, False
        else:
            # One gather of each row's adapter and one split into per-module pieces: their
            # backward is one index_add and one cat, not a full-size gradient per module.
            per_row = adapters.dim() == 2
            rows = adapters.index_select(0, task_ids) if per_row else adapters
            ctx.pieces, ctx.per_row = rows.split(self._slot_sizes, dim=-1), per_row
        try:
            yield
        finally:
            ctx.pieces, ctx.per_row = saved

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        adapters: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[N, L, V]`` of the base model with each row's adapter applied."""
        with self.adapters_applied(adapters, task_ids):
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    def sequence_nll(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        adapters: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Negative log-likelihood of each row, summed over its scored tokens: ``[N]``, fp32.

        ``labels[n, t]`` is the token at position ``t`` when it is scored and `IGNORE_INDEX`
        otherwise; token ``t`` is predicted from positions ``< t``:
        ``nll[n] = -sum_{t: labels[n,t] != IGNORE_INDEX} log p(labels[n, t] | input_ids[n, :t])``.
        """
        logits = self.forward(input_ids, attention_mask, adapters=adapters, task_ids=task_ids)
        # Shift the labels, not the logits: slicing logits[:, :-1] would copy the whole [N, L, V]
        # tensor (and its gradient) to make it contiguous; the last position scores nothing.
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none",
        )
        return nll.view(target.shape).sum(-1)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _wrappers(model: nn.Module) -> list[MultiTaskLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MultiTaskLoRALinear)]


def _unwrap(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiTaskLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
