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
from attnkit.models import load_config, load_model, model_revision
from attnkit.recipe import Recipe, RecipeError
from attnkit.tasks.choice import paired_comparison, run_choice
from attnkit.tasks.conflict import context_rows, run_conflict
from attnkit.tasks.folder import ReportFolder, claimed
from attnkit.tasks.generate import run_generate
from attnkit.tasks.needle import run_needle, run_passkey
from attnkit.tasks.preflight import preflight
from attnkit.tasks.report import rows_file, summarize
from attnkit.tasks.result import TaskResult
from attnkit.tasks.ruler import run_ruler
from attnkit.tasks.segments import run_segments

__all__ = ["run_recipe", "summarize"]

TASKS: dict[str, Callable[..., TaskResult]] = {
    "generate": run_generate,
    "choice": run_choice,
    "conflict": run_conflict,
    "needle": run_needle,
    "passkey": run_passkey,
    "segments": run_segments,
    "ruler": run_ruler,
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
        revision=spec.revision,
        **spec.from_pretrained,
    )


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attnkit": attnkit.__version__,
    }


def run_recipe(
    recipe: Recipe,
    *,
    out_dir: Path | None = None,
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``recipe``'s task (untouched first when ``recipe.baseline``, then under attnkit) and report it.

    Pass ``model`` and ``tokenizer`` to use an already loaded model instead of ``recipe.model``.
    Everything that can be checked without the weights is checked before they load
    (:func:`~attnkit.tasks.preflight.preflight`). The report goes into ``out_dir`` (default: the
    recipe's ``output``), a folder this run owns (:func:`~attnkit.tasks.folder.claimed`; one that
    holds files needs ``overwrite``): each run's rows as JSONL and ``report.json`` as soon as that
    run ends, then ``report.md``. On Ctrl-C what is done stays, and the ``KeyboardInterrupt`` says
    where. The attnkit handle is removed afterwards, also when the task fails, so the model is left
    as it was. Returns the report dict.
    """
    if recipe.task is None:
        problem = "task: this recipe has no task to run; add a `task:` section (kind: generate or choice)"
        raise RecipeError([problem], recipe.name)
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither to load the recipe's model")
    model_id = recipe.model.name_or_path if model is None else model.config.name_or_path or type(model).__name__
    config = (
        model.config
        if model is not None
        else load_config(
            recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
        )
    )
    folder = preflight(recipe, ModelShape.from_config(config, model_id), out_dir, overwrite)
    with claimed(folder, overwrite) as files:
        if model is None:
            model, tokenizer = load(recipe)
        report: dict[str, Any] = {
            "name": recipe.name,
            "model": model_id,
            "model_revision": model_revision(model_id, model),
            "task": recipe.task.kind,
            "runs": {},
            "comparison": None,
            "recipe": recipe.resolved(),
            "versions": versions(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "output_dir": str(folder),
        }
        try:
            run_phases(model, tokenizer, recipe, progress, report, files)
        except BaseException as err:
            files.stop(report, "interrupted" if isinstance(err, KeyboardInterrupt) else "failed", err)
            if isinstance(err, KeyboardInterrupt):
                raise KeyboardInterrupt(interrupted(report, folder)) from err
            raise
        report["comparison"] = compare(recipe, files.rows)
        files.finish(report)
    return report


def run_phases(
    model: Any, tokenizer: Any, recipe: Recipe, progress: bool, report: dict[str, Any], files: ReportFolder
) -> None:
    """The baseline (when asked for) and the attnkit run, each written into ``files`` as it ends."""
    if recipe.baseline:
        report["runs"]["baseline"], result = run_task(model, tokenizer, recipe, progress)
        files.phase(report, "baseline", result)
    with apply(model, recipe, allow_foreign_heads=recipe.allow_foreign_heads) as handle:
        entry, result = run_task(model, tokenizer, recipe, progress, handle.methods)
        entry["method_stats"] = handle.stats(total=True)
    report["runs"]["attnkit"] = entry
    files.phase(report, "attnkit", result)


def compare(recipe: Recipe, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The paired comparison of the attnkit run with the baseline, for tasks scored per item."""
    if "baseline" not in rows:
        return None
    if recipe.task.kind in ("choice", "segments"):
        return paired_comparison(rows["baseline"], rows["attnkit"])
    if recipe.task.kind == "conflict":
        metric, baseline_rows = context_rows(rows["baseline"])
        return {"metric": metric, **paired_comparison(baseline_rows, context_rows(rows["attnkit"])[1])}
    return None


def interrupted(report: dict[str, Any], folder: Path) -> str:
    """What an interrupted run kept, and where."""
    done = list(report["runs"])
    if not done:
        return "interrupted before any run finished; nothing was written"
    kept = ", ".join(f"{name} ({rows_file(name)})" for name in done)
    return f"interrupted; the finished runs are saved in {folder}: {kept}, and report.json (status: interrupted)"
