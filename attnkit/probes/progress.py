"""Resumable profiler progress: one JSON line per finished unit after a line with the setup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Progress:
    """Results so far, keyed; reused when the file's setup matches this run's (an interrupted run
    resumes), started afresh otherwise. ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | None, setup: dict[str, Any]):
        self.path: Path | None = path
        self.done: dict[str, dict[str, Any]] = {}
        if path is None:
            return
        if path.is_file():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if lines and lines[0].get("setup") == setup:
                self.done = {line["key"]: line for line in lines[1:]}
        if not self.done:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"setup": setup}) + "\n")

    def record(self, key: str, values: dict[str, Any]) -> None:
        self.done[key] = {**values, "key": key}
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(self.done[key]) + "\n")
