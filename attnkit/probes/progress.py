"""Resumable profiler progress: the run's setup, then every finished unit, on disk as it finishes.

``path`` holds JSON lines: one with the run's setup, then one per finished unit. A unit's tensors
(a layer's hidden state, the gates and the optimizer's moments) go to one ``.pt`` file per unit in
the folder next to it (``x.progress.jsonl`` -> ``x.progress/``), written atomically before the
unit's line, so a line always has its tensors (unless :meth:`Progress.forget` dropped them on
purpose). A run whose setup matches the file's resumes with the units it finds.

Progress is never thrown away. A run with other settings sets the file (and its folder) aside as
``x.progress.<setup digest>.jsonl``, and a later run with those settings again picks it back up;
this happens only when the new run records its first unit, so a run that stops on a bad input
(a mistyped ``--data``) leaves the files as they were. A line cut short by a kill is dropped with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from attnkit.files import atomic_path, write_atomic

log = logging.getLogger(__name__)


class Progress:
    """Finished units by key, reused when the file's setup matches this run's (an interrupted run
    resumes), started afresh otherwise (the other setup's file set aside). ``path=None`` keeps them
    in memory only."""

    def __init__(self, path: Path | None, setup: dict[str, Any]):
        self.path: Path | None = path
        self.folder: Path | None = path.with_suffix("") if path is not None else None
        self.setup = setup
        self.done: dict[str, dict[str, Any]] = {}
        self.started = False
        """Whether the file on disk is this run's (its setup line written or resumed)."""
        if path is None:
            return
        lines = read_lines(path)
        if not matches(lines, setup) and aside(path, setup).is_file():
            set_aside(path, lines)
            os.replace(aside(path, setup), path)
            if aside(path, setup).with_suffix("").is_dir():
                os.replace(aside(path, setup).with_suffix(""), path.with_suffix(""))
            log.warning(f"picked up the progress an earlier run with these settings set aside ({path})")
            lines = read_lines(path)
        if matches(lines, setup):
            self.started = True
            self.done = {line["key"]: {**line, **self._load(line["key"])} for line in lines[1:]}
            log.info(f"resuming: {len(self.done)} finished units in {path}")
        elif lines:
            log.warning(
                f"{path} holds progress for other settings; it will be kept as {aside(path, lines[0].get('setup'))} "
                "(resumed if you run with those settings again), and this run starts afresh"
            )

    def _begin(self) -> None:
        """Before this run's first unit: set another setup's file aside, write this setup's line."""
        assert self.path is not None
        if not self.started:
            set_aside(self.path, read_lines(self.path))
            write_atomic(self.path, json.dumps({"setup": self.setup}) + "\n")
            self.started = True

    def record(self, key: str, values: dict[str, Any]) -> None:
        """Keep a finished unit: its tensor values in the unit's file, the rest as a JSON line."""
        tensors = {k: v.detach().cpu() for k, v in values.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in values.items() if k not in tensors}
        self.done[key] = {**values, "key": key}
        if self.path is None:
            return
        self._begin()
        if tensors:
            with atomic_path(self._file(key)) as partial:
                torch.save(tensors, partial)
        with self.path.open("a") as f:
            f.write(json.dumps({**plain, "key": key}) + "\n")

    def forget(self, key: str) -> None:
        """Drop a unit's tensors (memory and disk), keeping its other values: state that a later
        unit has superseded."""
        unit = self.done.get(key, {})
        for name in [k for k, v in unit.items() if isinstance(v, torch.Tensor)]:
            del unit[name]
        if self.folder is not None:
            self._file(key).unlink(missing_ok=True)

    def _file(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / (re.sub(r"[^\w.-]", "_", key) + ".pt")

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        file = self._file(key)
        return torch.load(file, weights_only=True) if file.is_file() else {}


def setup_digest(setup: Any) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:12]


def aside(path: Path, setup: Any) -> Path:
    """Where the progress of ``setup`` is kept while a run with other settings uses ``path``."""
    return path.with_name(path.name.removesuffix(".jsonl") + f".{setup_digest(setup)}.jsonl")


def matches(lines: list[dict[str, Any]], setup: dict[str, Any]) -> bool:
    return bool(lines) and lines[0].get("setup") == setup


def set_aside(path: Path, lines: list[dict[str, Any]]) -> None:
    """Move the progress file at ``path`` (and its tensor folder) to its setup's place beside it."""
    if not lines:
        return
    kept = aside(path, lines[0].get("setup"))
    os.replace(path, kept)
    if path.with_suffix("").is_dir():
        os.replace(path.with_suffix(""), kept.with_suffix(""))
    log.warning(f"kept the progress of the earlier settings as {kept}")


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The file's JSON lines, up to the first that does not parse: a line cut short by a kill is
    dropped (with a warning, and from the file, so later lines are not appended to it)."""
    if not path.is_file():
        return []
    lines, texts = [], [t for t in path.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    for text in texts:
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break
    if len(lines) < len(texts):
        dropped = len(texts) - len(lines)
        log.warning(
            f"{path}: dropped {dropped} unreadable line(s) at the end (a write cut short); those units run again"
        )
        write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines))
    return lines
