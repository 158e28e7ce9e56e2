"""Files bora_pyro writes: folders it owns, replaced whole; strict JSON for non-finite numbers.

**Folders.** Every writer (`BoraResult.save`, checkpoints, `export_peft`, the sweep) owns the
folder it writes through a marker file, ``.bora_pyro``, holding the kind of content
(`FOLDER_KINDS`), the library version and, for folders written whole, the names of the entries
it wrote. The rules, applied by `check_target` before anything is written:

* a missing or empty folder may be written;
* a non-empty folder without the marker is the user's: refused, nothing in it touched;
* a folder with the marker of another kind is refused; one of the same kind is replaced only
  with ``overwrite=True``, and only when it holds nothing but what bora_pyro wrote;
* the working directory, a folder above it, and a folder holding one of the run's inputs
  (``protect``) are refused whatever they hold.

`replace_folder` writes a folder whole: the new content goes into a temporary sibling
``.<name>.bora-new-<hex>`` (marker first, so that a leftover is recognisable), then a swap of
renames: the old folder becomes the backup ``.<name>.bora-old``, the new one takes its name, and
the backup is deleted (renamed to ``.bora_pyro-trash-<hex>``, then emptied, its marker last). A
process killed at any point leaves the old or the new content whole under the name or under the
backup name; `find_folder` (used by readers such as `load_result`) looks there, and the next
write restores or removes the leftovers. Only folders that carry the marker (or hold nothing but
a marker being written, under bora_pyro's temporary names) are ever deleted (`remove_owned`), and the folder keeps the
permissions of the one it replaces (the umask's for a new one).

**JSON.** Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON (other
readers, ``jq`` and browsers among them, reject the file). `dumps_json` writes every non-finite
float as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` and refuses anything else that
is not JSON; `restore_floats` turns those three strings back into floats in the parts of a
document that hold numbers (histories, optimiser and loop state): call it on those parts only,
so that a task named ``"NaN"`` elsewhere stays a string.

This module imports nothing heavy, so that the command line can check its paths first.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "NON_FINITE", "encode_floats", "restore_floats", "dumps_json",
    "MARKER", "FOLDER_KINDS", "FolderError", "read_marker", "check_target", "replace_folder",
    "find_folder", "own_folder", "claim_files", "remove_owned", "remove_leftover", "clear_trash", "write_marker", "fsync",
]

#: How non-finite floats are spelled in bora_pyro's JSON files.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_floats(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, scalars) with non-finite floats as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_floats(v) for v in value]
    return value


def restore_floats(value: Any) -> Any:
    """The inverse of `encode_floats` on a part of a document that holds numbers."""
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, dict):
        return {k: restore_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_floats(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of `encode_floats(value)` with ``allow_nan=False``: always valid JSON."""
    return json.dumps(encode_floats(value), allow_nan=False, **kwargs)


# --------------------------------------------------------------------------------------------
# folders bora_pyro owns
# --------------------------------------------------------------------------------------------

#: The marker file inside every folder bora_pyro writes.
MARKER = ".bora_pyro"
#: What a folder may hold: a saved `BoraResult`, one checkpoint of a run, a PEFT export, a sweep.
FOLDER_KINDS = ("result", "checkpoint", "peft", "sweep")
_MARKER_FORMAT = "bora_pyro.folder"
_NEW, _OLD = ".bora-new-", ".bora-old"
#: Prefix of a folder being deleted (renamed first, so that a deletion killed halfway leaves a
#: name that is bora_pyro's whatever is left in it).
_TRASH = ".bora_pyro-trash-"


class FolderError(ValueError):
    """A folder bora_pyro may not write (the user's files, another kind of content, or an
    earlier result that ``overwrite=True`` was not given to replace). Nothing was changed."""


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder bora_pyro wrote (``{"kind", "version", "files"?}``), else ``None``."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(marker, dict) and marker.get("format") == _MARKER_FORMAT
            and marker.get("kind") in FOLDER_KINDS):
        return None
    return marker


def check_target(
    path: str | os.PathLike, kind: str, *, overwrite: bool = False, protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Check that a writer of ``kind`` may write the folder ``path``, before anything is written.

    Nothing in ``path`` is changed; the one thing done is to put back an earlier folder that a
    write killed in the middle of its swap left under the backup name (see the module docstring).

    Parameters
    ----------
    path
        The folder to write (need not exist).
    kind
        One of `FOLDER_KINDS`.
    overwrite
        Whether an earlier folder of the same kind, written by bora_pyro, may be replaced.
    protect
        Files or folders the run reads (its data, a model folder): ``path`` must not contain them.

    Returns
    -------
    The absolute path (``.`` and ``..`` resolved, symbolic links not followed).

    Raises
    ------
    FolderError
        When the folder is the working directory or above it, contains a protected path, is a
        file or a symbolic link, holds files bora_pyro did not write, holds another kind of
        content, or holds an earlier one and ``overwrite`` is false. The message names the folder
        and says what to do.
    """
    if kind not in FOLDER_KINDS:
        raise ValueError(f"kind={kind!r} is not valid; choose one of {FOLDER_KINDS}.")
    target = Path(os.path.abspath(path))
    shown = str(path)
    if target.parent == target:
        raise FolderError(f"{shown!r} is the root of the file system; pass a new folder for the {kind}.")
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FolderError(
            f"{shown!r} is the working directory (or a folder above it); bora_pyro replaces the "
            f"folder it writes a {kind} to, so pass a new sub-folder, e.g. {str(Path(path) / kind)!r}."
        )
    for item in protect:
        item_resolved = Path(item).resolve()
        if item_resolved == resolved or resolved in item_resolved.parents:
            raise FolderError(
                f"{shown!r} contains {str(item)!r}, an input of this run; write the {kind} to "
                f"another folder, e.g. {_free_sibling(target, kind)!r}."
            )
    _restore_backup(target)
    if target.is_symlink():
        raise FolderError(f"{shown!r} is a symbolic link; pass the folder it points to, or a new folder.")
    if not target.exists():
        return target
    if not target.is_dir():
        raise FolderError(f"{shown!r} is a file, not a folder; pass a new folder for the {kind}.")
    entries = sorted(entry.name for entry in target.iterdir())
    if not entries:
        return target
    marker = read_marker(target)
    if marker is None:
        raise FolderError(
            f"{shown!r} holds files bora_pyro did not write ({_some(entries)}); nothing in it was "
            f"changed. Write the {kind} to a new or empty folder, e.g. {_free_sibling(target, kind)!r}."
        )
    if marker["kind"] != kind:
        raise FolderError(
            f"{shown!r} holds a bora_pyro {marker['kind']}, not a {kind}; nothing in it was changed. "
            f"Write the {kind} to another folder, e.g. {_free_sibling(target, kind)!r}."
        )
    if not overwrite:
        raise FolderError(
            f"{shown!r} already holds a bora_pyro {kind}; pass overwrite=True (--overwrite on the "
            "command line) to replace it, or choose another folder."
        )
    listed = marker.get("files")
    foreign = [] if listed is None else [e for e in entries if e != MARKER and e not in listed]
    if foreign:
        raise FolderError(
            f"{shown!r} holds a bora_pyro {kind} and also files bora_pyro did not write "
            f"({_some(foreign)}); nothing was changed. Move them out of the folder, or write the "
            f"{kind} to another folder, e.g. {_free_sibling(target, kind)!r}."
        )
    return target


@contextmanager
def replace_folder(
    path: str | os.PathLike, kind: str, *, overwrite: bool = False, protect: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Write the folder ``path`` whole: yield a temporary sibling to fill, then swap it in.

    ``with replace_folder(path, "result", overwrite=...) as tmp: <write files into tmp>``. On a
    normal exit, the files are flushed to disk and the swap described in this module's docstring
    replaces ``path`` (the marker lists what was written); on an exception the temporary folder
    is removed and ``path`` is left as it was. `check_target` runs first (same arguments).
    """
    target = check_target(path, kind, overwrite=overwrite, protect=protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp = target.parent / f".{target.name}{_NEW}{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        write_marker(tmp, kind, files=[])
        if target.is_dir():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        yield tmp
        write_marker(tmp, kind, files=sorted(e.name for e in tmp.iterdir() if e.name != MARKER))
        for entry in sorted(tmp.rglob("*")):
            if entry.is_file() and not entry.is_symlink():
                fsync(entry)
        fsync(tmp)
        _swap(tmp, target)
    except BaseException:
        _discard(tmp)
        raise


def find_folder(path: str | os.PathLike) -> Path:
    """Where to read the folder written at ``path``: ``path`` itself, or, when a write was killed
    in the middle of its swap and ``path`` is missing, the whole earlier folder kept under the
    backup name. Changes nothing (readers may be read-only)."""
    path = Path(path)
    if not path.exists():
        backup = _backup(Path(os.path.abspath(path)))
        if read_marker(backup) is not None:
            return backup
    return path


def own_folder(path: str | os.PathLike, kind: str, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Take a folder that grows in place (a sweep's output, continued after a kill): create it,
    or mark an empty one, or accept one that bora_pyro marked with ``kind``. Refused like
    `check_target` otherwise. Returns the absolute path."""
    target = check_target(path, kind, overwrite=True, protect=protect)
    target.mkdir(parents=True, exist_ok=True)
    if read_marker(target) is None:
        write_marker(target, kind, files=None)
    return target


def claim_files(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Record that bora_pyro wrote the entries ``names`` into ``folder`` (a folder with its
    marker) after it was written, e.g. a sweep's ``test.csv`` beside a saved result, so that
    ``overwrite=True`` may replace them with the folder."""
    marker = read_marker(folder)
    if marker is None:
        raise FolderError(f"{str(folder)!r} is not a folder bora_pyro wrote (no {MARKER} marker).")
    if marker.get("files") is not None:
        write_marker(Path(folder), marker["kind"], files=sorted(set(marker["files"]) | set(names)))


def remove_owned(path: str | os.PathLike, kind: str | None = None) -> bool:
    """Delete the folder ``path`` if bora_pyro wrote it (its marker, of ``kind`` if given).

    The folder is first renamed to ``.bora_pyro-trash-<hex>`` beside it, then emptied, its marker
    last: a deletion killed halfway leaves a name that `clear_trash` recognises. Returns whether
    the folder was deleted; a folder without the marker is left as it is.
    """
    path = Path(path)
    marker = read_marker(path)
    if path.is_symlink() or marker is None or (kind is not None and marker["kind"] != kind):
        return False
    trash = path.parent / f"{_TRASH}{secrets.token_hex(4)}"
    os.replace(path, trash)
    _delete(trash)
    return True


def clear_trash(folder: str | os.PathLike) -> None:
    """Finish the deletions that a killed process left in ``folder`` (``.bora_pyro-trash-*``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(_TRASH):
            remove_leftover(entry)


def remove_leftover(path: str | os.PathLike) -> bool:
    """Delete a temporary folder that a killed write of bora_pyro left: one with the marker, or
    one holding nothing but a marker being written (or nothing: killed just after ``mkdir``).

    Call it only on names that bora_pyro gives its temporary folders. Returns whether it deleted.
    """
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if read_marker(path) is None and not _holds_only_a_marker(path):
        return False
    _delete(path)
    return True


def _holds_only_a_marker(folder: Path) -> bool:
    """Empty but for a marker, whole or being written: what a kill leaves just after ``mkdir``."""
    return {entry.name for entry in folder.iterdir()} <= {MARKER, f"{MARKER}.tmp"}


def _delete(folder: Path) -> None:
    """Delete a folder of bora_pyro's: its entries, then its marker, then the folder."""
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            os.unlink(entry)
    if (folder / MARKER).exists():
        os.unlink(folder / MARKER)
    os.rmdir(folder)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk, so that a rename lands after the data."""
    if Path(path).is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(folder: str | os.PathLike, kind: str, *, files: list[str] | None) -> None:
    """Write (atomically) the marker of a folder bora_pyro writes: ``kind``, the library version
    and, for a folder written whole, ``files``, the names of its entries (``None`` for a folder
    that grows in place)."""
    from . import __version__

    folder = Path(folder)
    marker = {"format": _MARKER_FORMAT, "kind": kind, "version": __version__}
    if files is not None:
        marker["files"] = files
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(dumps_json(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def _backup(target: Path) -> Path:
    return target.parent / f".{target.name}{_OLD}"


def _swap(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``target`` (missing, empty, or bora_pyro's)."""
    backup = _backup(target)
    if target.is_dir() and read_marker(target) is None:
        os.rmdir(target)  # empty (check_target): nothing to keep
    elif target.exists():
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup.exists() and not target.exists():
            os.replace(backup, target)
        raise
    fsync(target.parent)
    if backup.exists():
        remove_owned(backup)


def _restore_backup(target: Path) -> None:
    """Put back an earlier folder that a killed swap left under the backup name."""
    backup = _backup(target)
    if not target.exists() and not target.is_symlink() and read_marker(backup) is not None:
        os.replace(backup, target)


def _remove_leftovers(target: Path) -> None:
    """Remove what killed writes to ``target`` left beside it: temporary folders, unfinished
    deletions, and the backup of an earlier folder that was already replaced. Only folders with
    the marker (or empty ones of the temporary names) are removed."""
    clear_trash(target.parent)
    for entry in target.parent.iterdir():
        if entry.name.startswith(f".{target.name}{_NEW}"):
            remove_leftover(entry)
    if target.exists():
        remove_owned(_backup(target))


def _discard(tmp: Path) -> None:
    try:
        remove_leftover(tmp)
    except OSError:
        pass


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _free_sibling(target: Path, kind: str) -> str:
    base = target / kind if target.is_dir() and not read_marker(target) else target
    if not base.exists():
        return str(base)
    k = 2
    while (candidate := base.with_name(f"{base.name}-{k}")).exists():
        k += 1
    return str(candidate)
