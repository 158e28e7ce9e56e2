"""Checkpoints of a running fit that survive a kill: written atomically, read back exactly.

A checkpoint is a folder ``<checkpoint_dir>/step-XXXXXXXX`` (the last completed step, 0-based)
holding two files and the marker of a folder bora_pyro wrote (`bora_pyro.files.MARKER`, kind
``"checkpoint"``):

* ``state.safetensors``: every tensor of the run's state: the guide's parameters, the AdamW
  state (``exp_avg``, ``exp_avg_sq``, ``step`` per parameter), tau and the stepper's running
  statistics (the Fisher estimate under MAP, the moving averages of the tau M-step under SVI),
  the best snapshot of early stopping, and the RNG states (torch's global generator, which Pyro
  samples with; CUDA's when the run is on a GPU; numpy's; the minibatch generator at the start
  of its current epoch).
* ``checkpoint.json``: everything else: format and version, step, ``every``, the settings of
  the run (compared on resume), and the state as a nested JSON tree in which each tensor is
  ``{"__tensor__": "<its key in state.safetensors>"}`` (AdamW's parameter groups, the history,
  best value and step, evaluations without improvement, the minibatch position, Python's RNG).
  Strict JSON: non-finite numbers (a NaN validation loss, an infinite best value or tau) are
  written as strings and read back as floats (`bora_pyro.files.dumps_json`).

No pickle is involved. The folder is written under a temporary name (``.tmp-...``, the marker
first) in the same directory, flushed to disk, then renamed with `os.replace`; only after that
are the previous checkpoint and any temporary leftovers removed. A process killed at any moment
therefore leaves the previous complete checkpoint (or the new one), and `latest_checkpoint`
ignores the temporary folders. Only folders that carry the marker are ever read as checkpoints
or removed: the checkpoint folder may hold the user's own files (a ``step-1/`` or a
``.tmp-cache/`` of theirs included), which are never touched.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..files import (
    MARKER, FolderError, clear_trash, dumps_json, fsync, read_marker, remove_leftover, remove_owned, restore_floats,
    write_marker,
)

__all__ = [
    "Checkpoint", "Checkpointing", "latest_checkpoint", "load_checkpoint", "make_checkpointing",
    "remove_checkpoints", "save_checkpoint",
]

_FORMAT = "bora_pyro.checkpoint"
_FORMAT_VERSION = 1
_TENSORS = "state.safetensors"
_META = "checkpoint.json"
_TENSOR_KEY = "__tensor__"
_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_PREFIX = ".tmp-"
#: The temporary folders this module makes (a user's ``.tmp-cache`` does not match).
_TMP_DIR = re.compile(r"\.tmp-(step-\d+|old)-[0-9a-f]{8}")
_KIND = "checkpoint"


@dataclass
class Checkpoint:
    """A checkpoint read back by `load_checkpoint`.

    Attributes
    ----------
    path
        The ``step-XXXXXXXX`` folder.
    step
        Last completed optimiser step (0-based); the run continues at ``step + 1``.
    every
        Steps between checkpoints of the run that wrote it.
    settings
        The settings of that run (JSON values, non-finite numbers as strings), compared by
        `make_checkpointing`.
    state
        Nested dict: ``stepper`` (see `Stepper.state_dict`), ``batches`` (the minibatch
        stream's ``state_dict``), ``rng`` and ``loop`` (history, best snapshot, early stopping).
    """

    path: Path
    step: int
    every: int
    settings: dict
    state: dict


def save_checkpoint(directory: str | os.PathLike, state: dict, *, step: int, every: int, settings: dict) -> Path:
    """Write ``state`` as ``directory/step-XXXXXXXX`` atomically; remove older checkpoints after.

    Only this library's checkpoint folders (with the marker) and its temporary leftovers are
    removed; other entries of ``directory`` are left as they are.

    Parameters
    ----------
    directory
        The checkpoint folder (created if missing).
    state
        Nested dicts and lists of tensors and JSON values (see `Checkpoint.state`).
    step, every, settings
        Recorded in ``checkpoint.json`` (see `Checkpoint`).

    Returns
    -------
    The new checkpoint's folder.

    Raises
    ------
    bora_pyro.files.FolderError
        When ``directory/step-XXXXXXXX`` exists and is not a checkpoint folder bora_pyro wrote.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "step": int(step),
        "every": int(every),
        "settings": settings,
        "state": _encode(state, "", tensors),
    }
    final = directory / f"step-{int(step):08d}"
    if (final.exists() or final.is_symlink()) and not _is_ours(final):
        raise FolderError(
            f"{str(final)!r} exists and is not a checkpoint bora_pyro wrote; nothing in it was "
            "changed. Move it out of the checkpoint folder, or pass another checkpoint_dir."
        )
    tmp = directory / f"{_TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"  # matches _TMP_DIR
    os.mkdir(tmp)
    try:
        write_marker(tmp, _KIND, files=[_TENSORS, _META])
        save_file(tensors, tmp / _TENSORS)
        (tmp / _META).write_text(dumps_json(meta, sort_keys=True), encoding="utf-8")
        for path in (tmp / _TENSORS, tmp / _META, tmp / MARKER, tmp):
            fsync(path)
        if final.exists():  # ours, left by an abandoned continuation of an older checkpoint
            os.replace(final, directory / f"{_TMP_PREFIX}old-{secrets.token_hex(4)}")
        os.replace(tmp, final)
        fsync(directory)
    except BaseException:
        try:
            remove_leftover(tmp)
        except OSError:
            pass
        raise
    _remove_ours(directory, keep=final)
    return final


def remove_checkpoints(directory: str | os.PathLike) -> None:
    """Remove the checkpoints bora_pyro wrote in ``directory`` (and its temporary leftovers), then
    the folder itself if nothing else is left in it; the user's files stay.

    For a finished run whose checkpoints are no longer needed (e.g. a sweep's fit once its result
    is saved).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    _remove_ours(directory)
    if not any(directory.iterdir()):
        directory.rmdir()


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``, or ``None``.

    Temporary folders of an interrupted write (``.tmp-*``) are ignored, as is a step folder
    without both files or without the marker of a checkpoint bora_pyro wrote.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [
        (int(m.group(1)), entry) for entry in directory.iterdir()
        if (m := _STEP_DIR.fullmatch(entry.name)) and _is_ours(entry)
        and (entry / _META).is_file() and (entry / _TENSORS).is_file()
    ]
    return max(found)[1] if found else None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint: a ``step-XXXXXXXX`` folder, or a checkpoint folder (its latest).

    Raises
    ------
    ValueError
        When ``path`` holds no complete checkpoint or one of another format.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"resume={str(path)!r} is not a folder; pass the checkpoint_dir of the interrupted run "
            "(or one of its step-XXXXXXXX folders)."
        )
    if not (path / _META).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(
                f"resume={str(path)!r} holds no complete checkpoint (no step-XXXXXXXX folder with "
                f"{_META} and {_TENSORS}); pass the checkpoint_dir of a run that wrote one, or "
                "resume=None to start afresh."
            )
        path = latest
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / _META} is not valid JSON ({err}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict):
        meta = {}
    if meta.get("format") != _FORMAT or meta.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"resume={str(path)!r} is not a bora_pyro checkpoint of format version <= {_FORMAT_VERSION} "
            f"(found format={meta.get('format')!r}, version={meta.get('format_version')!r}); "
            "upgrade bora_pyro or start afresh."
        )
    state = restore_floats(_decode(meta["state"], load_file(path / _TENSORS)))
    return Checkpoint(path=path, step=int(meta["step"]), every=int(meta["every"]),
                      settings=meta["settings"], state=state)


class Checkpointing:
    """Where and how often a run writes checkpoints, and the checkpoint it continues from.

    Made by `make_checkpointing`; `run_steps` calls `start` before its first minibatch,
    `restore` after the stepper's setup, and `save` when `due`.

    Parameters
    ----------
    directory
        The folder for ``step-XXXXXXXX`` checkpoints.
    every
        Steps between checkpoints (also written at the last step and on early stopping).
    settings
        JSON-able settings of the run, stored with each checkpoint.
    resume
        The checkpoint to continue from, or ``None``.
    """

    def __init__(
        self, directory: str | os.PathLike, *, every: int, settings: dict, resume: Checkpoint | None = None,
    ):
        self.directory = Path(directory)
        self.every = int(every)
        self.settings = settings
        self.resume = resume

    def due(self, step: int, steps: int, stopped_early: bool) -> bool:
        """Whether to write a checkpoint after ``step`` (0-based) of ``steps``."""
        return (step + 1) % self.every == 0 or step == steps - 1 or stopped_early

    def start(self, batches: Any) -> None:
        """Check that ``batches`` can be checkpointed; on resume, move it to the saved position."""
        if not (hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")):
            raise ValueError(
                f"Checkpointing needs a minibatch stream with state_dict() and load_state_dict() "
                f"(as fit_map and fit_svi build), got a {type(batches).__name__}; pass "
                "checkpointing=None or such a stream."
            )
        if self.resume is not None:
            batches.load_state_dict(self.resume.state["batches"])

    def restore(self, stepper: Any) -> dict:
        """Load the resumed state into ``stepper`` (after its `setup`) and the RNGs; returns the
        loop's state (``history``, ``best_value``, ``best_state``, ``best_step``, ``bad_evals``,
        ``stopped_early``). The checkpoint's tensors are released afterwards."""
        state = self.resume.state
        stepper.load_state_dict(state["stepper"])
        _set_rng_state(state["rng"], stepper.device)
        self.resume.state = {}
        return state["loop"]

    def save(self, step: int, *, stepper: Any, batches: Any, loop: dict) -> Path:
        """Write the state after ``step``: the stepper's, the stream's, the RNGs' and ``loop``."""
        state = {
            "stepper": stepper.state_dict(),
            "batches": batches.state_dict(),
            "rng": _rng_state(stepper.device),
            "loop": loop,
        }
        return save_checkpoint(self.directory, state, step=step, every=self.every, settings=self.settings)


def make_checkpointing(
    checkpoint_dir: str | os.PathLike | None,
    checkpoint_every: int | None,
    resume: str | os.PathLike | None,
    *,
    steps: int,
    settings: dict,
) -> Checkpointing | None:
    """Check the checkpoint arguments of `fit_map` / `fit_svi` and plan the checkpoints.

    Parameters
    ----------
    checkpoint_dir
        Folder to write checkpoints to (default with ``resume``: the resumed checkpoint's folder).
    checkpoint_every
        Steps between checkpoints (default: the resumed run's value, else a tenth of the run).
    resume
        A checkpoint folder of an interrupted run (its latest checkpoint is used) or one of its
        ``step-XXXXXXXX`` folders.
    steps
        Length of the run.
    settings
        JSON-able settings of this run; a resumed checkpoint must have been written with equal ones.

    Returns
    -------
    ``None`` when all three arguments are ``None`` (no checkpoints), else a `Checkpointing`.

    Raises
    ------
    ValueError
        For a bad ``checkpoint_every``, ``checkpoint_every`` without a folder, a
        ``checkpoint_dir`` that already holds another run's checkpoint, or a ``resume``
        checkpoint missing or written with other settings (the differences are listed).
    """
    if checkpoint_dir is None and checkpoint_every is None and resume is None:
        return None
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(
            f"checkpoint_every must be a positive integer (steps between checkpoints), got "
            f"checkpoint_every={checkpoint_every!r}."
        )
    settings = json.loads(dumps_json(settings, sort_keys=True, default=str))
    resumed = None
    if resume is not None:
        resumed = load_checkpoint(resume)
        _check_settings(resumed, settings)
        if checkpoint_dir is None:
            checkpoint_dir = resumed.path.parent
        if checkpoint_every is None:
            checkpoint_every = resumed.every
    elif checkpoint_dir is None:
        raise ValueError(
            f"checkpoint_every={checkpoint_every} needs checkpoint_dir=<folder> to write the "
            "checkpoints to (or resume=<folder> to continue a run there)."
        )
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} is a file; pass a folder.")
    existing = latest_checkpoint(checkpoint_dir)
    if existing is not None and (resumed is None or existing.parent.resolve() != resumed.path.parent.resolve()):
        raise ValueError(
            f"checkpoint_dir={str(checkpoint_dir)!r} already holds a checkpoint of another run "
            f"({existing.name}); pass resume={str(checkpoint_dir)!r} to continue that run, or choose "
            "an empty folder."
        )
    every = checkpoint_every if checkpoint_every is not None else max(1, steps // 10)
    return Checkpointing(checkpoint_dir, every=every, settings=settings, resume=resumed)


def _check_settings(checkpoint: Checkpoint, settings: dict) -> None:
    saved, current = _flatten(checkpoint.settings), _flatten(settings)
    differences = [
        f"{key}={saved.get(key, '<unset>')!r} (this call: {current.get(key, '<unset>')!r})"
        for key in sorted(set(saved) | set(current)) if saved.get(key, "<unset>") != current.get(key, "<unset>")
    ]
    if differences:
        raise ValueError(
            f"resume={str(checkpoint.path)!r} was written by a run with other settings: "
            + "; ".join(differences)
            + ". Resume with the interrupted run's settings, or start afresh with another checkpoint_dir."
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree of ``value`` with each tensor moved (copied, on the CPU) into ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR_KEY: name}
    if isinstance(value, dict):
        return {str(k): _encode(v, f"{name}/{k}" if name else str(k), tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"Cannot store a {type(value).__name__} at {name!r} in a checkpoint.")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR_KEY}:
            return tensors[tree[_TENSOR_KEY]]
        return {k: _decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    return tree


def _rng_state(device: torch.device) -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _remove_ours(directory: Path, keep: Path | None = None) -> None:
    """Remove this module's checkpoints and temporary leftovers in ``directory`` (but ``keep``)."""
    for entry in directory.iterdir():
        if entry == keep:
            continue
        if _TMP_DIR.fullmatch(entry.name):
            remove_leftover(entry)
        elif _STEP_DIR.fullmatch(entry.name):
            remove_owned(entry, _KIND)
    clear_trash(directory)


def _is_ours(folder: Path) -> bool:
    marker = read_marker(folder)
    return not folder.is_symlink() and marker is not None and marker["kind"] == _KIND
