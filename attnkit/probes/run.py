"""What every profiler run shares: its fingerprint, its resumable progress, the unit loop, the artifact.

A profiler splits its work into units (a candidate head, a text, a needle prompt, a layer, a
block of training steps), each with a key. :class:`ProfileRun` runs the units not yet finished,
in order, with a progress bar, and records each as it finishes; an interrupted run with the same
fingerprint (model, dtype, settings, data) skips the finished ones, and a run with another
fingerprint starts afresh. The profiler's science (what a unit computes, how the artifact is
made from the units) stays in its own module.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from attnkit.heads import ModelShape
from attnkit.probes.configs import ProfilerConfig
from attnkit.probes.progress import Progress
from attnkit.tasks.result import progress_bar

T = TypeVar("T")


def digest(data: Any) -> str:
    """A short hash of JSON-able ``data`` (texts, items, file contents), for a fingerprint."""
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A short hash of a file's bytes ("missing" when it does not exist: reading it will say so)."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


class ProfileRun:
    """One run of profiler ``name`` on ``model`` with ``config``, reading ``data`` (summarised by a
    digest); finished units go to ``progress_path`` (default: next to ``output``, ``.progress.jsonl``;
    without either, memory only)."""

    def __init__(
        self,
        name: str,
        model: Any,
        config: ProfilerConfig,
        *,
        model_id: str,
        output: Path | None = None,
        progress: bool = True,
        data: str = "",
        progress_path: Path | None = None,
    ):
        self.name, self.model, self.config = name, model, config
        self.model_id = model_id
        self.output = Path(output) if output is not None else None
        self.progress = progress
        self.shape = ModelShape.from_config(model.config, model_id)
        self.setup = self.fingerprint(data)
        path = progress_path or (self.output.with_suffix(".progress.jsonl") if self.output is not None else None)
        self.record = Progress(path, self.setup)
        self.started = time.perf_counter()

    def fingerprint(self, data: str) -> dict[str, Any]:
        """What a finished unit's result depends on: the profiler, the model (id, config fingerprint,
        dtype), the settings and the data."""
        dtype = next(self.model.parameters()).dtype
        return {
            "profiler": self.name,
            "model_id": self.model_id,
            "model_fingerprint": self.shape.fingerprint,
            "dtype": str(dtype).removeprefix("torch."),
            "data_digest": data,
            **self.config.setup(),
        }

    @property
    def done(self) -> dict[str, dict[str, Any]]:
        """Finished units by key (those of an interrupted run included)."""
        return self.record.done

    @contextmanager
    def bar(self, label: str, total: int, finished: int = 0) -> Iterator[Callable[[int], None]]:
        """A progress bar over ``total`` units that starts at the ``finished`` ones; yields ``advance(n)``."""
        with progress_bar(f"{self.name}: {label}", total, self.progress) as advance:
            advance(finished)
            yield advance

    def each(
        self, label: str, units: Mapping[str, T], fn: Callable[[T], dict[str, Any]], *, chained: bool = False
    ) -> dict[str, dict[str, Any]]:
        """``fn(unit)`` for every unit not finished yet, in order, each recorded as it finishes;
        returns every unit's values by key.

        ``chained``: a unit's tensors are the state the next unit starts from, so only the latest
        unit keeps them (a resumed run starts from the last finished unit's).
        """
        keys = list(units)
        previous = None
        with self.bar(label, len(keys), sum(key in self.done for key in keys)) as advance:
            for key in keys:
                if key not in self.done:
                    self.record.record(key, fn(units[key]))
                    advance(1)
                    if chained and previous is not None:
                        self.record.forget(previous)
                previous = key
        return {key: self.done[key] for key in keys}

    def seconds(self) -> float:
        """Seconds since this run started (a resumed run counts only its own time)."""
        return round(time.perf_counter() - self.started, 1)

    def save(self, artifact: T) -> T:
        """Write the artifact to ``output`` (when given) and return it."""
        if self.output is not None:
            artifact.save(self.output)  # type: ignore[attr-defined]
        return artifact
