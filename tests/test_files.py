"""Folders bora_pyro owns (a marker; the user's folders refused and left untouched; replacement
by a rename swap) and strict JSON."""

import json
import math
import os
import stat

import pytest

from bora_pyro.files import (
    MARKER, FolderError, check_target, claim_files, clear_trash, dumps_json, find_folder, own_folder,
    read_marker, remove_owned, replace_folder, restore_floats,
)


def _tree(folder):
    """Every file under ``folder`` with its bytes, and every folder with its mode."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = path.read_bytes() if path.is_file() else stat.S_IMODE(path.stat().st_mode)
    return out


def _write(path, content="new", **kwargs):
    with replace_folder(path, "result", **kwargs) as tmp:
        (tmp / "a.txt").write_text(content)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(content)
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_new_folder_is_written_with_the_umask_permissions_and_a_marker(tmp_path):
    path = _write(tmp_path / "deep" / "run")
    assert (path / "a.txt").read_text() == "new" and (path / "sub" / "b.txt").read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700
    marker = read_marker(path)
    assert marker["kind"] == "result" and marker["files"] == ["a.txt", "sub"] and marker["version"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["run"]  # no leftovers beside it


def test_an_empty_folder_is_written_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "run"
    path.mkdir(mode=0o750)
    path.chmod(0o750)
    _write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    _write(path, "newer", overwrite=True)  # and across a replacement
    assert stat.S_IMODE(path.stat().st_mode) == 0o750 and (path / "a.txt").read_text() == "newer"


def test_a_folder_with_files_bora_pyro_did_not_write_is_refused_and_untouched(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.jsonl").write_text('{"task": "a", "text": "b"}\n')
    (project / "notes").mkdir()
    (project / "notes" / "n.md").write_text("mine")
    before = _tree(project)
    for overwrite in (False, True):
        with pytest.raises(FolderError, match=r"project'? holds files bora_pyro did not write \('data.jsonl', 'notes'\)"
                                              r"; nothing in it was changed.*e\.g\. '.*project/result'"):
            _write(project, overwrite=overwrite)
    assert _tree(project) == before and sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_the_working_directory_and_folders_above_it_are_refused(tmp_path, monkeypatch):
    run = _write(tmp_path / "run")
    monkeypatch.chdir(run)
    before = _tree(tmp_path)
    for path in (".", run, "..", tmp_path.parent):
        with pytest.raises(FolderError, match="working directory"):
            _write(path, overwrite=True)
    assert _tree(tmp_path) == before


def test_a_folder_holding_an_input_of_the_run_is_refused(tmp_path):
    run = _write(tmp_path / "run")
    data = run / "data.jsonl"  # e.g. the user saved their data into an earlier result's folder
    with pytest.raises(FolderError, match=r"contains '.*data.jsonl', an input of this run"):
        check_target(run, "result", overwrite=True, protect=[data])
    with pytest.raises(FolderError, match="an input of this run"):
        check_target(tmp_path, "result", overwrite=True, protect=[data])
    check_target(tmp_path / "other", "result", protect=[data])


def test_an_earlier_folder_is_replaced_only_with_overwrite_and_only_if_all_of_it_is_ours(tmp_path):
    path = _write(tmp_path / "run", "old")
    with pytest.raises(FolderError, match=r"already holds a bora_pyro result; pass overwrite=True \(--overwrite"):
        _write(path)
    with pytest.raises(FolderError, match="holds a bora_pyro result, not a peft"):
        with replace_folder(path, "peft", overwrite=True):
            pass
    (path / "my notes.txt").write_text("mine")
    before = _tree(path)
    with pytest.raises(FolderError, match=r"also files bora_pyro did not write \('my notes.txt'\)"):
        _write(path, overwrite=True)
    assert _tree(path) == before
    claim_files(path, ["my notes.txt"])  # e.g. a sweep's table written beside a result
    _write(path, "new", overwrite=True)
    assert (path / "a.txt").read_text() == "new" and not (path / "my notes.txt").exists()


def test_files_and_links_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="is a file"):
        _write(tmp_path / "file")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FolderError, match="symbolic link"):
        _write(tmp_path / "link")


def test_a_failing_writer_leaves_the_earlier_folder_and_no_leftovers(tmp_path):
    path = _write(tmp_path / "run", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with replace_folder(path, "result", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (path / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


class Killed(BaseException):
    """The process died: this and every later file operation fail."""


_OPERATIONS = ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync", "chmod")


def _run_killed_after(k, action):
    """Run ``action`` with every file-system operation from the ``k``-th on raising `Killed`
    (cleanup code included, as in a killed process). Returns the number of operations done."""
    done = [0]

    def wrap(original):
        def operation(*args, **kwargs):
            if done[0] >= k:
                raise Killed
            done[0] += 1
            return original(*args, **kwargs)
        return operation

    with pytest.MonkeyPatch.context() as mp:
        for name in _OPERATIONS:
            mp.setattr(os, name, wrap(getattr(os, name)))
        try:
            action()
        except Killed:
            pass
    return done[0]


def test_a_replacement_killed_at_any_operation_leaves_the_old_or_the_new_folder_whole(tmp_path):
    path = tmp_path / "run"
    total = _run_killed_after(math.inf, lambda: _write(path))  # count the operations of one write
    assert total > 10
    seen = set()
    for k in range(total + 2):
        _write(path, "old", overwrite=True)
        _run_killed_after(k, lambda: _write(path, "new", overwrite=True))
        found = find_folder(path)
        content = (found / "a.txt").read_text()
        assert content in ("old", "new") and (found / "sub" / "b.txt").read_text() == content, k
        assert read_marker(found)["files"] == ["a.txt", "sub"], k
        seen.add(content)
        # The next write repairs whatever the kill left, and leaves only its folder.
        _write(path, "next", overwrite=True)
        assert (path / "a.txt").read_text() == "next"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], k
    assert seen == {"old", "new"}


def test_own_folder_marks_a_growing_folder_and_takes_it_again(tmp_path):
    out = own_folder(tmp_path / "sweep", "sweep")
    (out / "fits").mkdir()
    assert own_folder(out, "sweep") == out and read_marker(out).get("files") is None
    with pytest.raises(FolderError, match="holds a bora_pyro sweep, not a result"):
        own_folder(out, "result")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "x").write_text("x")
    with pytest.raises(FolderError, match="did not write"):
        own_folder(tmp_path / "user", "sweep")


def test_remove_owned_removes_only_marked_folders_and_finishes_killed_deletions(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "x").write_text("x")
    assert remove_owned(user) is False and (user / "x").exists()
    path = _write(tmp_path / "run")
    assert remove_owned(path, "peft") is False and path.exists()
    _run_killed_after(3, lambda: remove_owned(path))  # renamed to the trash name, partly emptied
    trash = [p for p in tmp_path.iterdir() if p.name.startswith(".bora_pyro-trash-")]
    assert len(trash) == 1 and (trash[0] / MARKER).exists()
    clear_trash(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]


def _refuse_constant(name):
    raise ValueError(f"bare {name} in a JSON file")


def test_dumps_json_is_strict_and_restore_floats_inverts_it():
    value = {"val_nll": [math.nan, 1.5], "tau": [[math.inf, -math.inf]], "name": "NaN-free", "n": 3}
    text = dumps_json(value)
    decoded = json.loads(text, parse_constant=_refuse_constant)
    back = restore_floats(decoded)
    assert math.isnan(back["val_nll"][0]) and back["val_nll"][1] == 1.5
    assert back["tau"] == [[math.inf, -math.inf]] and back["name"] == "NaN-free" and back["n"] == 3
