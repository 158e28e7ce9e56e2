"""Ship the adapters: standard PEFT LoRA folders out, PEFT LoRA folders in.

`export_peft` writes one PEFT LoRA adapter folder per task (and one for the global adapter), the
format that ``peft.PeftModel.from_pretrained(base_model, folder)`` and multi-LoRA servers read:

* ``adapter_config.json``: ``peft_type="LORA"``, ``task_type="CAUSAL_LM"``, ``r``,
  ``lora_alpha``, ``target_modules``, ``fan_in_fan_out`` (``True`` for GPT-2's ``Conv1D``),
  ``base_model_name_or_path``, ...;
* ``adapter_model.safetensors``: for each adapted module ``M`` (its dotted name in the base
  model), ``base_model.model.M.lora_A.weight`` (``[r, in]``) and ``base_model.model.M.lora_B.weight``
  (``[out, r]``), fp32. The adapted layer computes ``W x + (lora_alpha / r) B A x``, exactly the
  update BoRA applies.

`load_peft_adapter` reads such a folder back into the flat layout (``[P]``), e.g. to start a fit
from an adapter trained elsewhere (``fit_map(..., init_adapter=folder)``).

The files are written with ``safetensors`` and ``json`` directly, so exporting does not need
``peft`` installed; the tests load every export with ``peft`` and compare the logits.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from .files import dumps_json, replace_folder
from .generation import GLOBAL_TASK
from .models.layout import AdapterLayout

__all__ = [
    "GLOBAL_FOLDER",
    "INDEX_FILE",
    "export_peft",
    "initial_adapter",
    "load_peft_adapter",
    "safe_folder_names",
]

#: Folder (inside the export directory) of the global adapter Theta.
GLOBAL_FOLDER = "_global"
#: The file mapping task names to folders, written next to them.
INDEX_FILE = "index.json"

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_WEIGHTS_FILE_BIN = "adapter_model.bin"
_PREFIX = "base_model.model."
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 100
# Names Windows refuses as file names, whatever the extension.
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def safe_folder_names(names: Sequence[str], *, reserved: Sequence[str] = (GLOBAL_FOLDER, INDEX_FILE)) -> list[str]:
    """Filesystem-safe, unique folder names for ``names``, in the same order.

    Runs of characters other than letters, digits, ``.``, ``_`` and ``-`` become one ``_``;
    leading and trailing ``_`` and ``.`` are dropped (``"HAMLET (Hamlet)"`` -> ``"HAMLET_Hamlet"``);
    an empty result becomes ``"task"``; names are cut to 100 characters. Names that would collide
    (ignoring case, as on macOS and Windows file systems) or equal one of ``reserved`` get a suffix
    ``_2``, ``_3``, ...

    Parameters
    ----------
    names
        Task names.
    reserved
        Folder names that must not be used.

    Returns
    -------
    One folder name per entry of ``names``.
    """
    taken = {r.lower() for r in reserved}
    out = []
    for name in names:
        base = _UNSAFE.sub("_", str(name)).strip("_.")[:_MAX_NAME].strip("_.") or "task"
        if base.split(".", 1)[0].lower() in _WINDOWS_RESERVED:
            base = base + "_"
        candidate, k = base, 1
        while candidate.lower() in taken:
            k += 1
            candidate = f"{base}_{k}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def export_peft(
    result: Any,
    directory: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    include_global: bool = True,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write each task's adapter (and the global one) as a standard PEFT LoRA adapter folder.

    ``directory/<folder>/adapter_config.json`` and ``adapter_model.safetensors`` for each task,
    with ``<folder>`` the task name made filesystem-safe and unique (`safe_folder_names`:
    ``"HAMLET (Hamlet)"`` -> ``HAMLET_Hamlet``); ``directory/_global/`` for the global adapter
    Theta; and ``directory/index.json`` mapping task names to folders (with the base model, the
    method, tau, rank and alpha). Load one with
    ``peft.PeftModel.from_pretrained(base_model, directory / folder)``: its logits equal
    bora_pyro's for that task. In the pooled limit (tau = inf) every task folder holds the global
    adapter.

    ``directory`` is a folder bora_pyro owns (`bora_pyro.files`): it must be missing or empty, or
    hold an earlier export that ``overwrite=True`` replaces whole (written beside it, then
    swapped in by renames); a folder holding other files is refused and left untouched.

    Parameters
    ----------
    result
        A fitted `BoraResult`.
    directory
        Where to write (created if needed).
    tasks
        Task names to export (default: all of ``result.tasks``).
    include_global
        Also write the global adapter to ``_global/``.
    base_model_name_or_path
        What to record as the base model in ``adapter_config.json`` (default: the result's
        ``model_spec``, or the model config's ``_name_or_path`` when the model was an object).
    overwrite
        Replace an earlier export at ``directory``.

    Returns
    -------
    ``{task name: folder path}``, with the key `GLOBAL_TASK` (``"<global>"``) for the global adapter.

    Raises
    ------
    bora_pyro.files.FolderError
        When ``directory`` holds files bora_pyro did not write, or an earlier export and
        ``overwrite`` is false.
    """
    layout: AdapterLayout = result.lm.layout
    names = list(result.tasks) if tasks is None else _as_name_list(tasks, "tasks")
    rows = [result.corpus.task_index(name) for name in names]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tasks lists {dup} more than once; give each task once.")
    folders = safe_folder_names(names)
    directory = Path(directory)
    config = _adapter_config(result, layout, base_model_name_or_path)
    index = {
        "format": "bora_pyro.peft_export",
        "version": _version(),
        "base_model": config["base_model_name_or_path"],
        "method": result.method,
        "rank": layout.rank,
        "alpha": layout.alpha,
        "tau": {g: _json_float(v) for g, v in result.tau.items()},
        "tasks": dict(zip(names, folders)),
        "global": GLOBAL_FOLDER if include_global else None,
    }
    written: dict[str, Path] = {}
    with replace_folder(directory, "peft", overwrite=overwrite) as tmp:
        task_adapters = result.task_adapters.detach().float().cpu()
        for name, row, folder in zip(names, rows, folders):
            _write_adapter(tmp / folder, task_adapters[row], layout, config)
            written[name] = directory / folder
        if include_global:
            _write_adapter(tmp / GLOBAL_FOLDER, result.global_adapter.detach().float().cpu(), layout, config)
            written[GLOBAL_TASK] = directory / GLOBAL_FOLDER
        (tmp / INDEX_FILE).write_text(
            dumps_json(index, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8"
        )
    return written


def load_peft_adapter(folder: str | os.PathLike, layout: AdapterLayout) -> torch.Tensor:
    """Read a PEFT LoRA adapter folder into the flat layout.

    The folder must adapt exactly the layout's modules with the layout's rank (the shapes
    ``A [r, in]``, ``B [out, r]`` are checked module by module). A different ``lora_alpha``
    (also per module through ``alpha_pattern``, or ``use_rslora``) is converted exactly: ``B`` is
    multiplied by ``scaling_peft / layout.scaling`` so that ``scaling * B @ A`` is unchanged.

    Parameters
    ----------
    folder
        A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
        ``adapter_model.bin``), as written by PEFT's ``save_pretrained`` or `export_peft`.
    layout
        The `AdapterLayout` to fill (``result.lm.layout``, ``MultiTaskLM(...).layout``).

    Returns
    -------
    ``[P]`` fp32 tensor.

    Raises
    ------
    ValueError
        If the folder is not a LoRA adapter, or its modules, rank or shapes differ from the
        layout's (the message names the module).
    FileNotFoundError
        If the folder or its files do not exist.
    """
    if not isinstance(layout, AdapterLayout):
        raise ValueError(
            f"layout must be an AdapterLayout (e.g. result.lm.layout), got {type(layout).__name__}."
        )
    folder = Path(folder)
    config_path = folder / _CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no {_CONFIG_FILE}; pass a PEFT LoRA adapter folder (written by "
            "PeftModel.save_pretrained or bora_pyro.export.export_peft)."
        )
    config = json.loads(config_path.read_text())
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{folder} holds a peft_type={peft_type!r} adapter; only 'LORA' adapters can be read.")
    if config.get("use_dora"):
        raise ValueError(f"{folder} holds a DoRA adapter (use_dora=true); only plain LoRA adapters can be read.")
    weights = _read_weights(folder)
    state = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in weights.items()}

    theta = torch.zeros(layout.size)
    used = set()
    for module, _, _ in layout.modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        missing = [k for k in (a_key, b_key) if k not in state]
        if missing:
            present = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
            raise ValueError(
                f"{folder} has no LoRA weights for module {module!r} (looked for {missing}); it adapts "
                f"{len(present)} modules, e.g. {present[:4]}. Its target modules must match the "
                f"layout's ({len(layout.modules)} modules, e.g. {[m[0] for m in layout.modules[:4]]}): "
                "fit with the same base model and target_modules."
            )
        used.update((a_key, b_key))
        for kind, key in (("A", a_key), ("B", b_key)):
            slot = layout.slot(module, kind)
            value = state[key]
            if tuple(value.shape) != slot.shape:
                raise ValueError(
                    f"{folder}: module {module!r} has lora_{kind} of shape {tuple(value.shape)}, but the "
                    f"layout expects {slot.shape} (rank {layout.rank}). Use the rank (r="
                    f"{config.get('r')!r} in the folder) and base model the adapter was trained with."
                )
        factor = _peft_scaling(config, module, layout.rank) / layout.scaling
        A = state[a_key].float()
        B = state[b_key].float() if factor == 1.0 else state[b_key].float() * factor
        theta[layout.slot(module, "A").offset : layout.slot(module, "A").stop] = A.flatten()
        theta[layout.slot(module, "B").offset : layout.slot(module, "B").stop] = B.flatten()
    extra = sorted(k for k in state if k not in used)
    if extra:
        raise ValueError(
            f"{folder} holds weights for modules the layout does not adapt, e.g. {extra[:4]} "
            f"({len(extra)} tensors); the target modules must match the layout's "
            f"({len(layout.modules)} modules, e.g. {[m[0] for m in layout.modules[:4]]})."
        )
    return theta


def initial_adapter(
    init_adapter: str | os.PathLike | torch.Tensor | None, layout: AdapterLayout, *, seed: int = 0
) -> torch.Tensor:
    """The ``[P]`` adapter a fit starts from (the global adapter and every task adapter).

    Parameters
    ----------
    init_adapter
        ``None`` (standard LoRA initialisation, `AdapterLayout.init_global`, seeded by
        ``seed``), a PEFT LoRA folder (read with `load_peft_adapter`) or a ``[P]`` tensor.
    layout
        The layout of the model being fitted.
    seed
        Seed of the standard initialisation.
    """
    if init_adapter is None:
        return layout.init_global(generator=torch.Generator().manual_seed(seed))
    if isinstance(init_adapter, (str, os.PathLike)):
        return load_peft_adapter(init_adapter, layout)
    if isinstance(init_adapter, torch.Tensor):
        if init_adapter.shape != (layout.size,):
            raise ValueError(
                f"init_adapter has shape {tuple(init_adapter.shape)}, but this model's layout needs "
                f"[P] = [{layout.size}] ({layout}); pass an adapter fitted with the same base model, "
                "rank and target_modules, or a PEFT folder."
            )
        theta = init_adapter.detach().float().cpu().clone()
        if not torch.isfinite(theta).all():
            raise ValueError("init_adapter holds NaN or infinite values; pass a finite [P] tensor.")
        return theta
    raise ValueError(
        f"init_adapter must be None, a PEFT LoRA folder (str or Path) or a [P] tensor, got "
        f"{type(init_adapter).__name__}."
    )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_name_list(value: Any, argument: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        raise ValueError(f"{argument} must be a task name or a list of names, got {value!r}.") from None


def _adapter_config(result: Any, layout: AdapterLayout, base_model_name_or_path: str | None) -> dict:
    base = result.lm.base_model
    if base_model_name_or_path is None:
        spec = result.model_spec
        if spec == "<object>":
            spec = getattr(base.config, "_name_or_path", None) or None
        base_model_name_or_path = spec
    module_types = [type(base.get_submodule(name).base).__name__ for name, _, _ in layout.modules]
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": "Conv1D" in module_types,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": layout.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": layout.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": _target_modules(base, layout),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def _target_modules(base: torch.nn.Module, layout: AdapterLayout) -> list[str]:
    """Module kinds (``["q_proj", "v_proj"]``) when they select exactly the layout's modules under
    PEFT's suffix matching, else the full module names."""
    from .models.lora import MultiTaskLoRALinear

    inner = {n + ".base" for n, m in base.named_modules() if isinstance(m, MultiTaskLoRALinear)}
    names = [n for n, _ in base.named_modules() if n and n not in inner]
    wanted = [m[0] for m in layout.modules]
    kinds = sorted({n.rsplit(".", 1)[-1] for n in wanted})
    selected = {n for n in names if any(n == k or n.endswith("." + k) for k in kinds)}
    return kinds if selected == set(wanted) else wanted


def _write_adapter(folder: Path, theta: torch.Tensor, layout: AdapterLayout, config: dict) -> None:
    folder.mkdir()
    tensors = {}
    for module, _, _ in layout.modules:
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = layout.view(theta, module, "A").contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = layout.view(theta, module, "B").contiguous()
    save_file(tensors, folder / _WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / _CONFIG_FILE).write_text(dumps_json(config, indent=2, sort_keys=True), encoding="utf-8")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / _WEIGHTS_FILE).is_file():
        return load_file(folder / _WEIGHTS_FILE)
    if (folder / _WEIGHTS_FILE_BIN).is_file():
        return torch.load(folder / _WEIGHTS_FILE_BIN, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds neither {_WEIGHTS_FILE} nor {_WEIGHTS_FILE_BIN}.")


def _peft_scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA) for one module, with ``alpha_pattern``."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _json_float(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else ("inf" if value > 0 else "nan")


def _version() -> str:
    from ._version import __version__

    return __version__
