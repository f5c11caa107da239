"""Writing files so that a crash never leaves half of one, and folders that one run owns at a time.

Every file attnkit writes for a user (reports, artifacts, progress, figures) goes through
:func:`atomic_path`: it is written under a temporary name in the same folder and renamed over the
target only once complete (``os.replace`` is atomic on one file system), so a reader sees the old
file or the new one, never a torn one. :func:`folder_lock` keeps two runs from writing into one
folder, and :func:`checked_output` is the rule for where a user-given output may go.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attnkit.errors import UserError

LOCK_NAME = ".attnkit.lock"


class OutputPathError(UserError, ValueError):
    """An output path attnkit must not or cannot write to; the message names the fix."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` when the block
    ends without an error, removed otherwise. The temporary keeps the suffix (plots pick their format
    from it) and starts with a dot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` atomically; returns the path."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    return Path(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def folder_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.attnkit.lock`` (created exclusively, holding this process's id) while the block
    runs, so two runs never write into one folder. A lock whose process is gone (killed) is taken
    over; one held by a live process is refused, naming it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    for _attempt in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock_holder(lock)
            if holder is not None and pid_alive(holder):
                raise OutputPathError(
                    f"another attnkit run (process {holder}) is writing into {folder}; wait for it to finish, "
                    "or write this run elsewhere (--output)"
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that was killed
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(str(os.getpid()))
        break
    else:
        raise OutputPathError(f"could not take the lock {lock}; remove it if no attnkit run is writing there")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def lock_holder(lock: Path) -> int | None:
    """The process id written in a lock file, or None when it cannot be read."""
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def checked_output(path: str | Path, what: str) -> Path:
    """``path`` if attnkit may write there: not empty, a relative path that stays inside the current
    folder (no ``..`` out of it) or an explicit absolute path, not an existing file, and under a
    folder this user can write to. ``what`` names the setting in the message."""
    text = str(path)
    if not text.strip():
        raise OutputPathError(f"{what} is empty; give a folder, e.g. runs/my-run")
    path = Path(text)
    if not path.is_absolute():
        normal = Path(os.path.normpath(text))
        if normal == Path(".") or normal.parts[0] == "..":
            raise OutputPathError(
                f"{what} {text!r} leaves the current folder {str(Path.cwd())!r} (or is that folder itself); "
                "give a subfolder such as runs/my-run, or an absolute path to write elsewhere"
            )
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {text!r} is an existing file, not a folder; give a folder path")
    parent = next(p for p in [path.absolute(), *path.absolute().parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"{what} {text!r}: cannot write under {str(parent)!r} (permission denied); give a folder you can write to"
        )
    return path
