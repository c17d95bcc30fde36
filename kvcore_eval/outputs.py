"""Output folders that never lose a user's files: atomic writes, and run folders that know their kind.

Every run (`calibrate`, `sweep`) writes `config.json` with its `kind`. A run refuses a folder that holds
files it did not write, or a run of another kind; it deletes only names it owns, and only in its own folders.
Files are written to a temporary name beside the target and renamed over it (atomic on POSIX), so a crash or
a full disk leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors through a temporary file and a rename: a kill at any point leaves the previous file intact."""
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_json(path: Path, what: str) -> Any:
    """JSON of a file kvcore-eval wrote; a damaged one names the file and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): the {what} is damaged or half-written; run it again"
        ) from err


def run_kind(folder: Path) -> str | None:
    """The kind recorded in a run folder's config.json (None: no config, or one of another program)."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("kind")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def check_run_folder(folder: Path, kind: str, own_names: Iterable[str]) -> None:
    """Refuse a folder that holds files this kind of run did not write, or a run of another kind."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder: choose another output folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    recorded = run_kind(folder)
    if recorded is not None and recorded != kind:
        raise FileExistsError(
            f"{folder} holds a `kvcore-eval {recorded}` run, not a {kind} run: choose another output folder"
        )
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in set(own_names))
    if foreign or recorded is None:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{folder} holds files kvcore-eval did not write ({listed or CONFIG_FILE + ' without a run kind'}): it never "
            "writes into or deletes such a folder; choose another output folder"
        )


def write_config(folder: Path, kind: str, settings: dict[str, Any]) -> None:
    atomic_write_json(folder / CONFIG_FILE, {"kind": kind, **settings})


def remove_own(folder: Path, kind: str, own_names: Iterable[str]) -> None:
    """Delete a folder only after checking it is a run of this kind holding nothing but its own files."""
    check_run_folder(folder, kind, own_names)
    if folder.is_dir():
        shutil.rmtree(folder)


def swap_in(new: Path, target: Path, kind: str, own_names: Iterable[str]) -> None:
    """Replace the run in `target` by the finished run in `new`: two renames, then the old run is deleted."""
    old = target.with_name(f"{target.name}.kvcore-old")
    if old.exists():
        remove_own(old, kind, own_names)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        remove_own(old, kind, own_names)
