"""The ``ruler`` task: RULER's synthetic families at prompt lengths in the model's tokens, scored as RULER scores.

Every (task, length, sample) cell is one seeded prompt (:mod:`attnkit.tasks.ruler_families`). Its
haystack is the largest RULER builds that keeps the prompt (chat template and answer prefix
included) within ``length`` tokens, so a prompt falls short of its length by at most one haystack
unit (a noise sentence, an essay word, a list item). The model continues RULER's answer prefix
greedily, with RULER's reply budget per task unless ``max_new_tokens`` says otherwise. A reply
scores as in RULER's evaluation (``string_match_all``: the share of the references it contains,
case-insensitive, x 100). Metrics: each task and the average over tasks (RULER's summary),
overall and per length. Figures: tasks x lengths, and depth x length for the single-needle tasks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnkit.heads import ModelShape
from attnkit.plots import score_heatmap
from attnkit.recipe.tasks import RulerTask
from attnkit.tasks.needle import generate_replies, mean, read_haystack
from attnkit.tasks.result import TaskDataError, TaskResult, chat_prompt, progress_bar, uses_chat_template
from attnkit.tasks.ruler_families import FAMILIES, Family, Sample, essay_words

__all__ = [
    "RulerPrompt",
    "check_lengths",
    "fit",
    "match_all",
    "match_part",
    "postprocess",
    "run_ruler",
    "string_match_all",
    "string_match_part",
]

# ----------------------------------------------------------------------------- scoring (RULER's evaluate.py)


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a reply: control characters to newlines, outer whitespace stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def match_all(prediction: str, references: list[str]) -> float:
    """The share of ``references`` found in ``prediction``, case-insensitive (one item of string_match_all)."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is found in ``prediction``, case-insensitive (one item of string_match_part)."""
    return float(any(r.lower() in prediction.lower() for r in references))


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's metric for its synthetic tasks: mean share of references found, x 100, rounded to 2 places."""
    return round(sum(map(match_all, predictions, references)) / len(predictions) * 100, 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's metric for its QA tasks: share of predictions holding any reference, x 100, rounded to 2 places."""
    return round(sum(map(match_part, predictions, references)) / len(predictions) * 100, 2)


# ----------------------------------------------------------------------------- prompts


@dataclass
class RulerPrompt:
    """One cell's prompt as the model sees it."""

    family: str
    length: int
    index: int
    sample: Sample
    text: str
    input_ids: list[int]
    units: int
    """Haystack units RULER's builder used (sentences, essay words, list items or coded words)."""


class Renderer:
    """Prompt text and ids for one tokenizer: chat template around the user message, then the answer prefix."""

    def __init__(self, tokenizer: Any, chat: bool, system: str | None):
        self.tokenizer, self.chat, self.system = tokenizer, chat, system

    def text(self, sample: Sample) -> str:
        user = chat_prompt(self.tokenizer, sample.user, self.system) if self.chat else sample.user
        return user + sample.answer_prefix

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.chat, verbose=False)["input_ids"]


def fit(
    make: Callable[[int], Sample], renderer: Renderer, length: int, what: str
) -> tuple[Sample, str, list[int], int]:
    """(sample, text, ids, units) with the most haystack units whose prompt stays within ``length`` tokens.

    Prompt tokens grow about linearly with ``units``, so the search guesses by interpolation
    inside a bracket [fits, too long] and halves the bracket when a guess does not; each try is
    one tokenisation. The same seed gives the same needles at every size; only the haystack grows.
    """

    def build(units: int) -> tuple[Sample, str, list[int], int]:
        sample = make(units)
        text = renderer.text(sample)
        return sample, text, renderer.ids(text), units

    low = build(0)
    if len(low[2]) > length:
        raise TaskDataError(
            f"task.lengths: {length} tokens is too short for {what}: its template alone takes {len(low[2])}; "
            f"use lengths above {len(low[2]) + 64}"
        )
    high: tuple[Sample, str, list[int], int] | None = None
    step = 16
    while high is None:  # bracket: grow from an interpolated guess until the prompt is too long
        probe = build(low[3] + step)
        if len(probe[2]) > length:
            high = probe
        else:
            per_unit = max((len(probe[2]) - len(low[2])) / step, 1e-3)
            low, step = probe, max(1, int((length - len(probe[2])) / per_unit * 1.05) + 1)
    bisect = False
    while high[3] - low[3] > 1:
        span = high[3] - low[3]
        if bisect:
            guess = low[3] + span // 2
        else:
            share = (length - len(low[2])) / max(len(high[2]) - len(low[2]), 1)
            guess = low[3] + int(share * span)
        guess = min(max(guess, low[3] + 1), high[3] - 1)
        built = build(guess)
        if len(built[2]) <= length:
            low = built
        else:
            high = built
        bisect = not bisect and high[3] - low[3] > span // 2  # a guess that did not halve: bisect next
    return low


def cells(task: RulerTask, renderer: Renderer, essay: list[str]) -> list[RulerPrompt]:
    """Every (task, length, sample) prompt, in task order then length, cut to ``task.limit``."""
    keys = [(f, n, i) for f in task.families for n in task.lengths for i in range(task.samples)][: task.limit]
    out = []
    for name, length, index in keys:
        family = FAMILIES[name]
        depth = task.depths[index % len(task.depths)] if family.single_needle else None
        seed = f"{task.seed}/{name}/{length}/{index}"

        def make(
            units: int, family: Family = family, depth: float | None = depth, seed: str = seed, length: int = length
        ) -> Sample:
            return family.build(seed, units, depth, length, essay)

        sample, text, ids, units = fit(make, renderer, length, name)
        out.append(RulerPrompt(name, length, index, sample, text, ids, units))
    return out


def reply_budget(task: RulerTask, family: str) -> int:
    return task.max_new_tokens or FAMILIES[family].tokens_to_generate


def check_lengths(limit: int | None, task: RulerTask) -> None:
    """Every prompt plus its reply budget must fit the model's ``limit`` positions (None: not checked)."""
    if limit is None:
        return
    budget = max(reply_budget(task, f) for f in task.families)
    for length in task.lengths:
        if length + budget > limit:
            raise TaskDataError(
                f"task.lengths: {length} tokens + a reply of {budget} exceed the model's {limit} positions "
                f"(max_position_embeddings); use lengths up to {limit - budget}"
            )


def load_essay(task: RulerTask) -> tuple[list[str], str]:
    """(essay words, where they came from) when a chosen task needs them, else ([], "")."""
    if not any(FAMILIES[f].essay for f in task.families):
        return [], ""
    text, source = read_haystack(task.haystack, "task.haystack")
    return essay_words(text), source


# ----------------------------------------------------------------------------- running


def run_ruler(model: Any, tokenizer: Any, task: RulerTask, *, progress: bool = True) -> TaskResult:
    """RULER's tasks over ``task.lengths``; see the module docstring."""
    check_lengths(ModelShape.from_config(model.config).max_positions, task)
    essay, source = load_essay(task)
    renderer = Renderer(tokenizer, uses_chat_template(tokenizer, task.chat_template), task.system)
    prompts = cells(task, renderer, essay)
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i].family, len(prompts[i].input_ids)))
    results: dict[int, dict[str, Any]] = {}
    start = time.perf_counter()
    with torch.no_grad(), progress_bar(task.kind, len(prompts), progress) as advance:
        for batch in batches(order, prompts, task.batch_size):
            began = time.perf_counter()
            budget = reply_budget(task, prompts[batch[0]].family)
            replies = generate_replies(model, tokenizer, [prompts[i].input_ids for i in batch], budget, task.decode)
            seconds = (time.perf_counter() - began) / len(batch)
            for i, (reply, n) in zip(batch, replies):
                results[i] = row(prompts[i], reply, n, seconds, source)
            advance(len(batch))
    rows = [results[i] for i in range(len(prompts))]
    metrics = summary(rows)
    return TaskResult(
        metrics=metrics, rows=rows, seconds=time.perf_counter() - start, write_files=figure_writer(rows, metrics)
    )


def batches(order: list[int], prompts: list[RulerPrompt], size: int) -> list[list[int]]:
    """Consecutive runs of ``order`` up to ``size`` long, never mixing tasks (each has its reply budget)."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < size and prompts[out[-1][0]].family == prompts[i].family:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def row(prompt: RulerPrompt, reply: str, n_new: int, seconds: float, source: str) -> dict[str, Any]:
    """One cell's report row: what was asked, at what size, the reply and its RULER score."""
    return {
        "family": prompt.family,
        "length": prompt.length,
        "sample": prompt.index,
        "depth": prompt.sample.depth,
        "prompt_tokens": len(prompt.input_ids),
        "haystack_units": prompt.units,
        **({"haystack": source} if FAMILIES[prompt.family].essay else {}),
        "expected": prompt.sample.answers,
        "output": reply,
        "n_new_tokens": n_new,
        "score": 100 * match_all(postprocess(reply), prompt.sample.answers),
        "seconds": round(seconds, 3),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``average`` (the mean over tasks, RULER's summary) and each task, overall and ``@length``; 0-100."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    per: dict[str, float] = {}
    for family in families:
        per[family] = mean(r["score"] for r in rows if r["family"] == family)
        for length in lengths:
            scores = [r["score"] for r in rows if r["family"] == family and r["length"] == length]
            if scores:
                per[f"{family}@{length}"] = mean(scores)
    metrics: dict[str, Any] = {"n": len(rows), "average": mean(per[f] for f in families)}
    for length in lengths:
        metrics[f"average@{length}"] = mean(per[key] for f in families if (key := family_key(f, length)) in per)
    return {**metrics, **per}


def family_key(family: str, length: int) -> str:
    return f"{family}@{length}"


def task_grid(metrics: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], list[int], np.ndarray]:
    """(tasks + "average", lengths, their scores) from ``metrics``; NaN where a cell did not run."""
    families = [*dict.fromkeys(r["family"] for r in rows), "average"]
    lengths = sorted({int(r["length"]) for r in rows})
    grid = np.array([[metrics.get(family_key(f, n), np.nan) for n in lengths] for f in families], dtype=float)
    return families, lengths, grid


def depth_grid(rows: list[dict[str, Any]]) -> tuple[list[float], list[int], np.ndarray]:
    """(depths, lengths, mean score) over the single-needle tasks' rows."""
    placed = [r for r in rows if r["depth"] is not None]
    depths = sorted({float(r["depth"]) for r in placed})
    lengths = sorted({int(r["length"]) for r in placed})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            scores = [r["score"] for r in placed if r["depth"] == depth and r["length"] == length]
            if scores:
                grid[i, j] = mean(scores)
    return depths, lengths, grid


def figure_writer(rows: list[dict[str, Any]], metrics: dict[str, Any]) -> Callable[[Path, str], list[str]]:
    """Writes ``ruler.png`` (tasks x lengths) and ``ruler_depth.png`` (depth x length, single-needle tasks)."""

    def write(out_dir: Path, run: str) -> list[str]:
        prefix = "" if run == "attnkit" else f"{run}_"
        families, lengths, grid = task_grid(metrics, rows)
        names = [f"{prefix}ruler.png"]
        score_heatmap(grid, families, [str(n) for n in lengths], Path(out_dir) / names[0], ylabel="task",
                      title=f"ruler ({run}): score per task and length, average {metrics['average']:.1f}")  # fmt: skip
        depths, lengths, grid = depth_grid(rows)
        if depths:
            names.append(f"{prefix}ruler_depth.png")
            score_heatmap(grid, [f"{d:.0%}" for d in depths], [str(n) for n in lengths], Path(out_dir) / names[1],
                          ylabel="needle depth", title=f"ruler ({run}): single-needle tasks, score per cell")  # fmt: skip
        return names

    return write
