"""What every task shares: its result type, its JSONL input, its data errors, its progress bar."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.errors import UserError
from attnkit.tasks.progress import progress_bar as progress_bar  # every task's bar (terminal, notebook, log)


@dataclass
class TaskResult:
    """One task run: aggregate ``metrics``, one row per input, and the wall time it took."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    write_files: Callable[[Path, str], list[str]] | None = field(default=None, repr=False)
    """Optional: writes this run's extra files (figures) into a folder, given the run's name
    ("baseline", "attnkit"), and returns their names; the runner lists them in the report."""


class TaskDataError(UserError, ValueError):
    """Task input that cannot be used; the message names the file, the line and the fix."""


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    ``what`` names the recipe field the path came from, so a missing file points back to it.
    Relative paths are read from the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(
            f"{what}: {str(path)!r} not found (relative paths are read from the current directory "
            f"{str(Path.cwd())!r}); fix the path in the recipe"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TaskDataError(
            f"{what}: {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"not valid JSON ({err.msg}); write one JSON object per line"
            raise TaskDataError(f"{path}:{number}: {problem}") from None
        if not isinstance(item, dict):
            raise TaskDataError(f"{path}:{number}: expected a JSON object, got {type(item).__name__}")
        items.append((number, item))
    if not items:
        raise TaskDataError(f"{what}: {path} holds no items (no JSON lines); give a file with at least one")
    return items


def checked_rows(
    path: str | Path, what: str, problem: Callable[[dict[str, Any]], str | None], example: str
) -> list[tuple[str, dict[str, Any]]]:
    """``("file:line", object)`` for each line of a JSONL file that ``problem`` accepts.

    Every bad line is reported at once, each with what is wrong, then the expected shape.
    """
    rows, problems = [], []
    for number, raw in read_jsonl(path, what):
        where = f"{path}:{number}"
        issue = problem(raw)
        if issue:
            problems.append(f"{where}: {issue}")
        else:
            rows.append((where, raw))
    if problems:
        raise TaskDataError("\n".join(problems) + f"\neach line must look like {example}")
    return rows


def uses_chat_template(tokenizer: Any, setting: bool | str) -> bool:
    """Resolve a task's ``chat_template`` setting (True, False or "auto") against the tokenizer."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has_template:
        raise TaskDataError("task.chat_template: true, but the tokenizer has no chat template; set it to false or auto")
    return has_template if setting == "auto" else bool(setting)


def chat_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """``prompt`` as a user turn in the tokenizer's chat template, ready for the assistant's reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
