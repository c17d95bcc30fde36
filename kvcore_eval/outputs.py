"""Output folders that never lose a user's files: atomic writes, run folders that know their kind, one writer each.

Every run (`calibrate`, `sweep`) writes `config.json` with its `kind`. A run refuses a folder that holds
files it did not write, or a run of another kind; it deletes only names it owns, and only in its own folders.
Files are written to a temporary name beside the target (`.<name>.kvcore-tmp`) and renamed over it (atomic on
POSIX), so a crash or a full disk leaves the previous version intact; a temporary left by a kill is recognized
as the tool's own and cleared by the next run. A run holds `<folder>.kvcore-lock` (an flock naming its pid,
host and start time) while it writes: a second run into the same folder is refused, and a lock whose holder
died is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TEMPORARY_SUFFIX = ".kvcore-tmp"
LOCK_SUFFIX = ".kvcore-lock"
CACHE_ENV = "KVCORE_CACHE_DIR"  # what kvcore-eval keeps between runs (downloads, tokenizers); default below
DEFAULT_CACHE_DIR = "~/.cache/kvcore-eval"
# Temporaries of earlier versions: `.<own name>.tmp`, and safetensors' own `.tmpXXXXXX` beside the target.
_LEGACY_TEMPORARY = re.compile(r"^\.(tmp[A-Za-z0-9]{6}|.+\.tmp)$")


class DiskFullError(OSError):
    """No space left while writing an output; the previous files are intact."""


def cache_dir(*parts: str) -> Path:
    """A folder under kvcore-eval's cache ($KVCORE_CACHE_DIR, default ~/.cache/kvcore-eval), not created here."""
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)).expanduser().joinpath(*parts)


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")


def is_own_temporary(name: str) -> bool:
    """A temporary name the tool writes (checked only inside folders that are the tool's runs)."""
    return (name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)) or bool(_LEGACY_TEMPORARY.match(name))


def clear_own_temporaries(folder: Path) -> list[str]:
    """Delete the temporaries a killed run of the tool left in `folder` (one of its run folders)."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    cleared = []
    for entry in folder.iterdir():
        if is_own_temporary(entry.name) and not entry.is_symlink():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            cleared.append(entry.name)
    if cleared:
        logger.info("cleared temporary files a killed run left in %s: %s", folder, ", ".join(sorted(cleared)))
    return cleared


def _file_mode() -> int:
    """The mode a plain open() gives a new file (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)  # safetensors' SafetensorError wraps the OS error in its text
    return "No space left on device" in text or "StorageFull" in text or "QuotaExceeded" in text


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        if not _is_disk_full(err):
            raise
        full = DiskFullError(
            f"no space left on the device while writing {path.name} into {path.parent}: nothing was lost (the files "
            f"already in {path.parent} are intact and no partial file is left); free some space and run the same "
            "command again"
        )
        full.errno = errno.ENOSPC
        raise full from err


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    temporary = temporary_path(path)
    try:
        with _disk_full_is_one_line(path), open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def keep_elsewhere(text: str, path: Path) -> str:
    """Keep what could not be written at `path` in a new file of the system's temporary folder; returns the words
    that say where it is and how to put it in place (or that it could not be kept either)."""
    kept = None
    try:
        fd, kept = tempfile.mkstemp(prefix=f"kvcore-eval-{path.stem}-", suffix=path.suffix)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        if kept is not None:  # a partial copy would read as the results
            Path(kept).unlink(missing_ok=True)
        return f"could not be kept in {tempfile.gettempdir()} either ({err.strerror or err})"
    return f"are kept in {kept}: once there is room, `cp {kept} {path}`"


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors through a temporary folder of ours and a rename: a kill at any point leaves the previous file
    intact, and whatever it leaves (safetensors' own `.tmpXXXXXX` included) sits in `.<name>.kvcore-tmp/`, which
    the next run recognizes. The file gets the umask's mode, like every other output (safetensors makes it 0600)."""
    from safetensors.torch import save_file

    temporary = temporary_path(path)
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        with _disk_full_is_one_line(path):
            save_file(tensors, str(temporary / path.name), metadata=metadata)
        os.chmod(temporary / path.name, _file_mode())
        os.replace(temporary / path.name, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def atomic_save_figure(figure, path: Path) -> None:
    """A matplotlib Figure saved through a temporary file and a rename (its format from `path`'s suffix): a full disk
    names the file and its folder, and leaves the previous figure intact."""
    temporary = temporary_path(path)
    try:
        with _disk_full_is_one_line(path):
            figure.savefig(temporary, format=path.suffix.lstrip(".") or None)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def content_digest(data: Any) -> str:
    """sha256 of JSON data as `atomic_write_json` writes it (keys sorted): the same before writing and after reading
    back, so a file that holds its own digest tells an edit of its content."""
    text = json.dumps(json.loads(json.dumps(data, default=str)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# A file name holds at most 255 bytes (NAME_MAX); a run folder's name gets the longest suffix the tool adds to it.
MAX_NAME_BYTES = 255 - len(".kvcore-staging")


def check_path_component(name: str, what: str) -> None:
    """A name that becomes one folder or file name under an output folder: never a path that leaves it, and short
    enough to be a file name with the suffixes kvcore-eval adds (its lock, its staging folder)."""
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise ValueError(
            f"{what} {name!r} cannot be used as a file name (it is empty, '.' or '..', or holds '/', '\\' or NUL), "
            "and outputs are written under a folder named after it: rename it"
        )
    if (size := len(name.encode("utf-8", "surrogatepass"))) > MAX_NAME_BYTES:
        raise ValueError(
            f"{what} {name[:40]!r}... is {size} bytes long: outputs are written under a folder named after it, and a "
            f"file name holds at most 255 bytes with the suffixes kvcore-eval adds; rename it (at most "
            f"{MAX_NAME_BYTES} bytes)"
        )


def unwritable(folder: Path, err: OSError, why: str) -> PermissionError:
    """The one line of a folder kvcore-eval cannot write (read-only, immutable, no permission): the folder, the
    reason, and the fix, never an internal file name."""
    return PermissionError(
        f"{folder} cannot be written ({err.strerror or err}): {why}; make it writable, or choose an output folder "
        "elsewhere (--out)"
    )


def check_writable(folder: Path, why: str) -> None:
    """Before any output: `folder` (existing) takes new files. Permissions, read-only mounts, immutable folders: the
    only sure test is to write."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise unwritable(folder, err, why) from None


def check_output_file(path: Path, option: str, is_ours: Callable[[Path], bool]) -> None:
    """Before any work: `path` can be written as a file, and replaces nothing of the user's (`is_ours` tells an
    earlier output of this kind)."""
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: name a file inside it, e.g. {path / 'results.json'}")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {path} cannot be written: {existing} is a file, not a folder")
    if path.exists() and not is_ours(path):
        raise FileExistsError(f"{option} {path} exists and was not written by kvcore-eval: name another file")
    try:  # permissions, read-only mounts, ACLs: the only sure test is to write
        with tempfile.TemporaryFile(dir=path.parent if path.parent.is_dir() else existing):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path} cannot be written ({err.strerror}): choose a writable path") from err


def resolve_run_folder(folder: Path) -> Path:
    """A run folder given as a symbolic link is the folder it points to (the link stays as it is)."""
    if not folder.is_symlink():
        return folder
    target = folder.resolve()
    if not target.exists():
        raise FileNotFoundError(
            f"{folder} is a symbolic link to {target}, which does not exist: create that folder, or remove the link"
        )
    logger.info("%s is a symbolic link: writing into %s", folder, target)
    return target


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _describe(holder: bytes) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a holder that did not record itself"


def _refuse_lock_file(path: Path, folder: Path, what: str) -> FileExistsError:
    return FileExistsError(
        f"{path} {what}: kvcore-eval never writes through it, and it is where the lock of {folder} goes; remove it "
        "(no kvcore-eval run is writing that folder), or choose another output folder"
    )


_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _create_lock_file(path: Path, folder: Path) -> int | None:
    """A descriptor of a new lock file at `path` (O_CREAT|O_EXCL|O_NOFOLLOW), else of the file already there
    (`_open_existing_lock`); None when that vanished meanwhile (try again). An unwritable folder is named, with
    the fix."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return _open_existing_lock(path, folder)
    except OSError as err:
        if err.errno in _UNWRITABLE:
            raise unwritable(path.parent, err, f"{folder} and its lock are written there") from None
        raise


def _open_existing_lock(path: Path, folder: Path) -> int | None:
    """The lock file already at `path`, opened O_NOFOLLOW, when it is a plain file with one name; a symbolic link or
    anything else is refused and left as it is. None when it vanished or was replaced meanwhile."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(found.st_mode):
        raise _refuse_lock_file(path, folder, "is a symbolic link")
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
        raise _refuse_lock_file(path, folder, "is not a plain file of kvcore-eval's")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:  # replaced by a link between the lstat and the open
            raise _refuse_lock_file(path, folder, "is a symbolic link") from None
        if err.errno in _UNWRITABLE:
            raise unwritable(path.parent, err, f"{folder} and its lock are written there") from None
        raise
    if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (found.st_ino, found.st_dev):
        os.close(fd)  # replaced between the lstat and the open
        return None
    return fd


def _is_holder(content: bytes) -> bool:
    """Whether a lock file's content is what `run_lock` writes (empty: a holder killed before it wrote itself)."""
    if not content:
        return True
    try:
        info = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(info, dict) and {"pid", "host", "started"} <= set(info)


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[Path]:
    """Hold `<folder>.kvcore-lock` while writing `folder`: an flock, released by the kernel when the holder exits
    however it exits, and a file naming the holder. A second writer is refused with the holder's pid, host and
    start time; a lock file whose holder died is recognized (its flock is free) and taken over. The file is created
    with O_CREAT|O_EXCL|O_NOFOLLOW: a symbolic link or a file kvcore-eval did not write at that name is refused,
    never written through."""
    import fcntl

    path = folder.with_name(folder.name + LOCK_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unwritable(path.parent, err, f"{folder} and its lock are written there") from None
    while True:
        fd = _create_lock_file(path, folder)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 65536))
            os.close(fd)
            raise FileExistsError(
                f"{folder} is being written by another kvcore-eval run ({holder}; lock {path}): wait for it to "
                "finish or stop it, or choose another output folder"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:  # not a file its last holder removed meanwhile
                break
        os.close(fd)
    try:
        previous = os.read(fd, 65536)
        if not _is_holder(previous):
            raise _refuse_lock_file(path, folder, "holds something kvcore-eval did not write")
    except BaseException:
        os.close(fd)
        raise
    try:
        if previous:
            logger.warning("took over the lock of %s: that run is no longer running", _describe(previous))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_holder()).encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def read_json(path: Path, what: str) -> Any:
    """JSON of a file kvcore-eval wrote; a damaged one names the file and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): the {what} is damaged or half-written; run it again"
        ) from err


def read_derived(path: Path, what: str) -> Any | None:
    """JSON of a file kvcore-eval derives from others (a point, a table of points): None, with a warning naming the
    file, where it is damaged or half-written, so that the caller computes it again instead of failing every rerun."""
    try:
        return read_json(path, what)
    except ValueError as err:
        logger.warning(
            "%s is not valid JSON (%s): a damaged %s, which is derived data; it is computed again",
            path,
            err.__cause__ or err,
            what,
        )
        return None


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
    own = set(own_names) if recorded is not None else set()  # without a run kind, nothing in it is ours
    foreign = sorted(e.name for e in folder.iterdir() if e.name not in own and not is_own_temporary(e.name))
    if foreign or recorded is None:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{folder} holds files kvcore-eval did not write ({listed or CONFIG_FILE + ' without a run kind'}): "
            "it never writes into or deletes such a folder; choose another output folder"
        )


def write_config(folder: Path, kind: str, settings: dict[str, Any]) -> None:
    atomic_write_json(folder / CONFIG_FILE, {"kind": kind, **settings})


def remove_own(folder: Path, kind: str, own_names: Iterable[str]) -> None:
    """Delete a folder only after checking it is a run of this kind holding nothing but its own files."""
    if folder.is_symlink():
        raise FileExistsError(f"{folder} is a symbolic link: kvcore-eval deletes only folders it made; remove the link")
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
