"""Resumable profiler progress: the run's setup, then every finished unit, on disk as it finishes.

``path`` holds JSON lines: one with the run's setup, then one per finished unit. A unit's tensors
(a layer's hidden state, the gates and the optimizer's moments) go to one ``.pt`` file per unit in
the folder next to it (``x.progress.jsonl`` -> ``x.progress/``), written before the unit's line,
so a line always has its tensors (unless :meth:`Progress.forget` dropped them on purpose). A run
whose setup matches the file's resumes with the units it finds; any other setup starts afresh.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class Progress:
    """Finished units by key, reused when the file's setup matches this run's (an interrupted run
    resumes), started afresh otherwise. ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | None, setup: dict[str, Any]):
        self.path: Path | None = path
        self.folder: Path | None = path.with_suffix("") if path is not None else None
        self.done: dict[str, dict[str, Any]] = {}
        if path is None:
            return
        lines = read_lines(path)
        if lines and lines[0].get("setup") == setup:
            self.done = {line["key"]: {**line, **self._load(line["key"])} for line in lines[1:]}
            log.info(f"resuming: {len(self.done)} finished units in {path}")
        elif lines:
            log.info(f"{path} was written for other settings; starting afresh")
        if not self.done:
            shutil.rmtree(self.folder, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"setup": setup}) + "\n")

    def record(self, key: str, values: dict[str, Any]) -> None:
        """Keep a finished unit: its tensor values in the unit's file, the rest as a JSON line."""
        tensors = {k: v.detach().cpu() for k, v in values.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in values.items() if k not in tensors}
        self.done[key] = {**values, "key": key}
        if self.path is None:
            return
        if tensors:
            file = self._file(key)
            file.parent.mkdir(parents=True, exist_ok=True)
            partial = file.with_suffix(".partial")
            torch.save(tensors, partial)
            partial.replace(file)
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


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The file's JSON lines, up to the first that does not parse (a line cut short by a kill)."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break
    return lines
