"""Run a recipe end to end: load the model, run its task untouched and under attnkit, write a report."""

from __future__ import annotations

import platform
import resource
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

import attnkit
from attnkit.handle import apply
from attnkit.heads import ModelShape
from attnkit.models import load_model
from attnkit.recipe import Recipe, RecipeError, check_against_model
from attnkit.tasks.choice import paired_comparison, run_choice
from attnkit.tasks.conflict import context_rows, run_conflict
from attnkit.tasks.generate import run_generate
from attnkit.tasks.needle import run_needle, run_passkey
from attnkit.tasks.report import summarize, write_report
from attnkit.tasks.result import TaskResult
from attnkit.tasks.segments import run_segments

__all__ = ["run_recipe", "summarize"]

TASKS: dict[str, Callable[..., TaskResult]] = {
    "generate": run_generate,
    "choice": run_choice,
    "conflict": run_conflict,
    "needle": run_needle,
    "passkey": run_passkey,
    "segments": run_segments,
}
GIVEN_METHODS = {"segments"}
"""Tasks that get the applied methods (``methods=``): ``segments`` hands PINE each batch's segment ids."""


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory, labelled: CUDA's max allocated since the last reset, else the process's peak RSS.

    The RSS peak covers the whole process (model loading included) and cannot be reset, so on CPU
    it is an upper bound for each run rather than a per-run figure.
    """
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "measure": "cuda_max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": rss if sys.platform == "darwin" else rss * 1024, "measure": "process_peak_rss"}


def run_task(
    model: Any, tokenizer: Any, recipe: Recipe, progress: bool, methods: list[Any] | None = None
) -> tuple[dict[str, Any], TaskResult]:
    """One seeded run of the recipe's task on ``model`` as it is now: its report entry and its result.

    ``methods``: the method objects applied to ``model`` (none for the baseline), for the tasks that
    drive a method themselves (:data:`GIVEN_METHODS`)."""
    torch.manual_seed(recipe.seed)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    extra = {"methods": methods or []} if recipe.task.kind in GIVEN_METHODS else {}
    result = TASKS[recipe.task.kind](model, tokenizer, recipe.task, progress=progress, **extra)
    entry = {"metrics": result.metrics, "seconds": result.seconds, "memory": peak_memory(model.device)}
    return entry, result


def load(recipe: Recipe) -> tuple[Any, Any]:
    """The recipe's model and tokenizer, loaded as its ``model`` section says."""
    spec = recipe.model
    return load_model(
        spec.name_or_path,
        dtype=spec.dtype,
        attn_implementation=spec.attn_implementation,
        device=spec.device,
        device_map=spec.device_map,
        trust_remote_code=spec.trust_remote_code,
    )


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attnkit": attnkit.__version__,
    }


def run_recipe(
    recipe: Recipe, *, out_dir: Path | None = None, progress: bool = True, model: Any = None, tokenizer: Any = None
) -> dict[str, Any]:
    """Run ``recipe``'s task (untouched first when ``recipe.baseline``, then under attnkit) and report it.

    Pass ``model`` and ``tokenizer`` to use an already loaded model instead of ``recipe.model``.
    Writes report.json, report.md, the rows of each run as JSONL and the resolved recipe.yaml into
    ``out_dir`` (default: the recipe's ``output``) and returns the report dict. The attnkit handle
    is removed afterwards, also when the task fails, so the model is left as it was.
    """
    if recipe.task is None:
        problem = "task: this recipe has no task to run; add a `task:` section (kind: generate or choice)"
        raise RecipeError([problem], recipe.name)
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither to load the recipe's model")
    if model is None:
        model, tokenizer = load(recipe)
        model_id = recipe.model.name_or_path
    else:
        model_id = model.config.name_or_path or type(model).__name__
    check_against_model(recipe, ModelShape.from_config(model.config, model_id))
    runs: dict[str, dict[str, Any]] = {}
    results: dict[str, TaskResult] = {}
    if recipe.baseline:
        runs["baseline"], results["baseline"] = run_task(model, tokenizer, recipe, progress)
    with apply(model, recipe, allow_foreign_heads=recipe.allow_foreign_heads) as handle:
        runs["attnkit"], results["attnkit"] = run_task(model, tokenizer, recipe, progress, handle.methods)
        runs["attnkit"]["method_stats"] = handle.stats(total=True)
    out_dir = Path(out_dir) if out_dir is not None else recipe.output_dir()
    rows = {name: result.rows for name, result in results.items()}
    for name, result in results.items():
        if result.write_files is not None:  # figures and other per-run files a task hands over
            out_dir.mkdir(parents=True, exist_ok=True)
            runs[name]["files"] = result.write_files(out_dir, name)
    comparison = None
    if recipe.task.kind in ("choice", "segments") and "baseline" in rows:
        comparison = paired_comparison(rows["baseline"], rows["attnkit"])
    elif recipe.task.kind == "conflict" and "baseline" in rows:
        metric, baseline_rows = context_rows(rows["baseline"])
        comparison = {"metric": metric, **paired_comparison(baseline_rows, context_rows(rows["attnkit"])[1])}
    report = {
        "name": recipe.name,
        "model": model_id,
        "task": recipe.task.kind,
        "runs": runs,
        "comparison": comparison,
        "recipe": recipe.resolved(),
        "versions": versions(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str(out_dir),
    }
    write_report(out_dir, report, rows)
    return report
