"""outputs.py: atomic writes that leave no temporary file and never half a file; run folders that refuse what
they did not write and delete only their own."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import lock_held_by_a_thread

from kvcore_eval import outputs
from kvcore_eval.outputs import (
    CONFIG_FILE,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    check_run_folder,
    read_json,
    remove_own,
    run_kind,
    swap_in,
    write_config,
)

OWN = (CONFIG_FILE, "result.json", "basis.safetensors")


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_text_writes_leave_no_temporary_file(tmp_path):
    path = tmp_path / "notes.md"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second, longer text\n")
    assert path.read_text() == "second, longer text\n"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path):
    path = tmp_path / "notes.md"
    atomic_write_text(path, "previous\n")
    with pytest.raises(UnicodeEncodeError):  # fails after the temporary file was created
        atomic_write_text(path, "a" * 100_000 + "\ud800")
    assert path.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]
    with pytest.raises(FileNotFoundError):  # a missing folder: nothing created anywhere
        atomic_write_text(tmp_path / "no" / "notes.md", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]


def test_json_is_sorted_ends_with_a_newline_and_reads_back(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, None], "path": tmp_path})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert read_json(path, "result") == {"a": [1.5, None], "b": 1, "path": str(tmp_path)}


def test_a_damaged_json_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1, "b"')
    with pytest.raises(ValueError, match=r"r.json is not valid JSON .*the sweep result is damaged or half-written"):
        read_json(path, "sweep result")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_json(path, "sweep result")


def test_atomic_safetensors_round_trip_and_failure(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    atomic_save_safetensors(tensors, path, metadata={"note": "x"})
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    before = path.read_bytes()
    with pytest.raises(ValueError):  # safetensors refuses a non-contiguous tensor
        atomic_save_safetensors({"a": torch.arange(6.0).reshape(2, 3).T}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_run_kind_reads_only_a_kvcore_config(tmp_path):
    assert run_kind(tmp_path) is None
    write_config(tmp_path, "sweep", {"model": "m"})
    assert run_kind(tmp_path) == "sweep"
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == {"kind": "sweep", "model": "m"}
    for foreign in ("[1, 2]", "{not json", '{"name": "someone else\'s"}'):
        (tmp_path / CONFIG_FILE).write_text(foreign)
        assert run_kind(tmp_path) is None, foreign


def test_run_folder_checks_accept_own_runs_and_refuse_foreign_files(tmp_path):
    check_run_folder(tmp_path / "new", "calibrate", OWN)  # absent
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty", "calibrate", OWN)
    own = tmp_path / "own"
    own.mkdir()
    write_config(own, "calibrate", {})
    (own / "result.json").write_text("{}")
    check_run_folder(own, "calibrate", OWN)
    with pytest.raises(FileExistsError, match="holds a `kvcore-eval calibrate` run, not a sweep run"):
        check_run_folder(own, "sweep", OWN)
    (own / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(thesis.tex\)"):
        check_run_folder(own, "calibrate", OWN)
    users = tmp_path / "users"
    users.mkdir()
    for i in range(7):
        (users / f"photo{i}.jpg").write_text("x")
    with pytest.raises(FileExistsError, match=r"photo0.jpg, .*photo4.jpg, \.\.\."):
        check_run_folder(users, "calibrate", OWN)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "result.json").write_text("{}")  # an own name, but no config saying it is a kvcore run
    with pytest.raises(FileExistsError, match="kvcore-eval did not write"):
        check_run_folder(bare, "calibrate", OWN)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        check_run_folder(tmp_path / "file", "calibrate", OWN)


def test_remove_own_deletes_a_run_and_never_a_users_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, "calibrate", {})
    remove_own(run, "calibrate", OWN)
    assert not run.exists()
    users = tmp_path / "users"
    (users / "sub").mkdir(parents=True)
    write_config(users, "calibrate", {})
    (users / "sub" / "data.csv").write_text("1,2")
    before = snapshot(users)
    with pytest.raises(FileExistsError):
        remove_own(users, "calibrate", OWN)
    assert snapshot(users) == before


def test_swap_in_replaces_the_old_run_and_cleans_up(tmp_path):
    target, new = tmp_path / "out", tmp_path / "out.new"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        write_config(folder, "calibrate", {"v": text})
    stale = tmp_path / "out.kvcore-old"  # left by a crash between the two renames
    stale.mkdir()
    write_config(stale, "calibrate", {"v": "stale"})
    swap_in(new, target, "calibrate", OWN)
    assert json.loads((target / CONFIG_FILE).read_text())["v"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fresh = tmp_path / "fresh.new"
    fresh.mkdir()
    write_config(fresh, "calibrate", {})
    swap_in(fresh, tmp_path / "fresh", "calibrate", OWN)  # no previous run
    assert run_kind(tmp_path / "fresh") == "calibrate" and not fresh.exists()


def test_a_stale_folder_of_the_users_stops_the_swap_before_anything_moves(tmp_path):
    target, new = tmp_path / "out", tmp_path / "out.new"
    for folder in (target, new):
        folder.mkdir()
        write_config(folder, "calibrate", {})
    stale = tmp_path / "out.kvcore-old"
    stale.mkdir()
    (stale / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        outputs.swap_in(new, target, "calibrate", OWN)
    assert (stale / "mine.txt").read_text() == "keep me" and target.is_dir() and new.is_dir()


def test_a_link_at_the_lock_name_is_never_written_through(tmp_path):
    """`ln -s victim.txt run.kvcore-lock`: the run is refused, the link and the file it points to stay as they are."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's notes\n")
    (tmp_path / "run.kvcore-lock").symlink_to("victim.txt")
    with pytest.raises(FileExistsError, match=r"run.kvcore-lock is a symbolic link: kvcore-eval never writes through"):
        with outputs.run_lock(tmp_path / "run"):
            pass
    assert victim.read_text() == "the user's notes\n"
    assert (tmp_path / "run.kvcore-lock").is_symlink() and not (tmp_path / "run").exists()
    (tmp_path / "dangling.kvcore-lock").symlink_to("nowhere.txt")  # a link to nothing is not created through either
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        with outputs.run_lock(tmp_path / "dangling"):
            pass
    assert not (tmp_path / "nowhere.txt").exists()


def test_a_file_of_the_users_at_the_lock_name_is_refused_and_kept(tmp_path):
    lock = tmp_path / "run.kvcore-lock"
    lock.write_text("my own file, named oddly\n")
    with pytest.raises(FileExistsError, match="holds something kvcore-eval did not write"):
        with outputs.run_lock(tmp_path / "run"):
            pass
    assert lock.read_text() == "my own file, named oddly\n"
    lock.unlink()
    (tmp_path / "victim.txt").write_text("notes\n")
    os.link(tmp_path / "victim.txt", lock)  # a hard link: another name of the user's file
    with pytest.raises(FileExistsError, match="is not a plain file of kvcore-eval's"):
        with outputs.run_lock(tmp_path / "run"):
            pass
    assert (tmp_path / "victim.txt").read_text() == "notes\n"


def test_a_held_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tmp_path):
    import socket

    with lock_held_by_a_thread(tmp_path / "run"):
        with pytest.raises(FileExistsError, match=f"pid {os.getpid()} on {socket.gethostname()}, started "):
            with outputs.run_lock(tmp_path / "run"):
                pass
    assert not (tmp_path / "run.kvcore-lock").exists(), "released and removed"
    (tmp_path / "run.kvcore-lock").write_text("")  # a holder killed before it wrote itself
    with outputs.run_lock(tmp_path / "run") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_an_unwritable_folder_is_named_with_the_fix_not_an_internal_file(tmp_path, read_only):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    with pytest.raises(PermissionError, match=f"^{parent} cannot be written .*make it writable, or choose") as err:
        with outputs.run_lock(parent / "run"):
            pass
    assert "kvcore-lock" not in str(err.value)
    with pytest.raises(PermissionError, match=f"^{parent} cannot be written"):
        outputs.check_writable(parent, "the report goes there")


def test_a_full_disk_while_saving_a_figure_names_file_and_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    path = tmp_path / "plot.png"
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    outputs.atomic_save_figure(figure, path)
    before = path.read_bytes()
    assert before[:4] == b"\x89PNG" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]

    def full(self, fname, **kwargs):
        open(fname, "wb").write(b"half a pn")  # what a full disk leaves: part of the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(outputs.DiskFullError, match=f"writing plot.png into {tmp_path}: nothing was lost"):
        outputs.atomic_save_figure(figure, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_damaged_derived_data_is_named_and_given_back_as_missing(tmp_path, caplog):
    import logging

    path = tmp_path / "point.json"
    path.write_text('{"value": 1.')
    with caplog.at_level(logging.WARNING):
        assert outputs.read_derived(path, "sweep point") is None
    assert any(str(path) in r.getMessage() and "computed again" in r.getMessage() for r in caplog.records)
    atomic_write_json(path, {"value": 1.5, "n": (1, 2)})
    assert outputs.read_derived(path, "sweep point") == {"value": 1.5, "n": [1, 2]}


def test_a_content_digest_survives_the_round_trip_and_tells_an_edit(tmp_path):
    record = {"value": 0.1 + 0.2, "per_document": {"0": 1.25}, "pair": (1, 2), "path": tmp_path, "nan": float("nan")}
    atomic_write_json(tmp_path / "p.json", record)
    read_back = read_json(tmp_path / "p.json", "point")
    assert outputs.content_digest(read_back) == outputs.content_digest(record)
    read_back["value"] = 0.3
    assert outputs.content_digest(read_back) != outputs.content_digest(record)


def test_a_name_too_long_for_a_file_name_with_the_tools_suffixes_is_refused(tmp_path):
    longest = "t" * outputs.MAX_NAME_BYTES
    outputs.check_path_component(longest, "task name")
    with outputs.run_lock(tmp_path / longest):  # its lock file and staging folder are file names too
        (tmp_path / f"{longest}.kvcore-staging").mkdir()
    with pytest.raises(ValueError, match="task name 'tttt.*'... is 241 bytes long: .*rename it"):
        outputs.check_path_component(longest + "t", "task name")
    with pytest.raises(ValueError, match="is 242 bytes long"):
        outputs.check_path_component("é" * 121, "task name")
