"""The report folder of one recipe run: claimed by that run alone, filled phase by phase, never mixed.

A run takes the folder's lock before it loads the model, so a second run into the same folder is
refused at once. A folder that already holds files is refused unless ``overwrite`` (then the old
report is cleared first, so old and new files never sit side by side); ``--overwrite`` replaces
only a report folder (one holding ``recipe.yaml``), never a folder of other files. Each phase
(baseline, attnkit) is written the moment it ends: its rows, its extra files, then ``report.json``
with ``status: partial``; the finished run rewrites ``report.json`` with ``status: complete`` and
writes ``report.md``. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from attnkit.files import LOCK_NAME, OutputPathError, folder_lock, write_atomic
from attnkit.tasks.report import render_markdown, rows_file
from attnkit.tasks.result import TaskResult

MARKER = "recipe.yaml"
"""The file every run writes first: a folder holding it is an attnkit report folder."""


def contents(folder: Path) -> list[Path]:
    """What ``folder`` holds besides a run's lock (nothing when it does not exist)."""
    return sorted(p for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []


def check_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder that holds files, unless ``overwrite`` and it is a report folder."""
    found = contents(folder)
    if not found:
        return
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    if not overwrite:
        raise OutputPathError(
            f"{folder} already holds files ({names}); pass --overwrite to replace that report, or write this run "
            "elsewhere (--output, or another `output` in the recipe)"
        )
    if not (folder / MARKER).is_file():
        raise OutputPathError(
            f"{folder} holds files attnkit did not write ({names}); --overwrite replaces only a report folder, so "
            "write this run elsewhere (--output)"
        )


@contextmanager
def claimed(folder: Path, overwrite: bool) -> Iterator[ReportFolder]:
    """Own ``folder`` while the block runs: lock it, check (and with ``overwrite`` clear) it. Folders
    that this run created and left empty (it failed before any phase ended) are removed again."""
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        with folder_lock(folder):
            check_folder(folder, overwrite)
            for old in contents(folder):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            yield ReportFolder(folder)
    finally:
        for path in created:  # the deepest first
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()


class ReportFolder:
    """Writes one run's report files into a folder it owns (see :func:`claimed`)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def phase(self, report: dict[str, Any], name: str, result: TaskResult) -> None:
        """A finished phase: (the first time, the resolved recipe,) its rows and extra files, then
        ``report.json`` (still partial). A run that fails before its first phase leaves no files."""
        if not self.rows:
            write_atomic(self.path / MARKER, yaml.safe_dump(report["recipe"], sort_keys=False, allow_unicode=True))
        self.rows[name] = result.rows
        write_atomic(self.path / rows_file(name), "".join(json_line(row) for row in result.rows))
        if result.write_files is not None:  # figures and other per-run files a task hands over
            report["runs"][name]["files"] = result.write_files(self.path, name)
        self.write_json(report, "partial")

    def stop(self, report: dict[str, Any], status: str, error: BaseException) -> None:
        """The run ended early (``status``: interrupted or failed): keep what is done and say why
        (nothing, when no phase finished)."""
        if not self.rows:
            return
        report["error"] = f"{type(error).__name__}: {error}".rstrip(": ")
        self.write_json(report, status)

    def finish(self, report: dict[str, Any]) -> None:
        """The run is complete: ``report.json`` and ``report.md``."""
        self.write_json(report, "complete")
        write_atomic(self.path / "report.md", render_markdown(report, self.rows))

    def write_json(self, report: dict[str, Any], status: str) -> None:
        report["status"] = status
        write_atomic(self.path / "report.json", to_json(report, indent=2) + "\n")


def json_line(row: dict[str, Any]) -> str:
    return to_json(row) + "\n"


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON: a NaN or infinite number (a metric over nothing, say) becomes null, which every
    JSON reader accepts, instead of Python's bare ``NaN``, which none does."""
    return json.dumps(finite(value), indent=indent, ensure_ascii=False, default=str, allow_nan=False)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
