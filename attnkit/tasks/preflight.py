"""Check a recipe run for everything that can fail without the model's weights, before they load.

``attnkit validate`` runs these checks, and ``attnkit run`` runs them again before loading the
weights, so a mistake in the output path, the data or an artifact never costs a finished baseline:
the report folder (placeholders, ``..`` escapes, writable, not holding another report unless
``--overwrite``), the task's data files (present, parseable, not empty), the head sets and
artifacts (against the model's config when it is known, else parseable), prompt lengths
against the model's positions where they are known from the config, and the backend: flash-attn
installed and a GPU present where the recipe asks for them, and no method a flash backend cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnkit import models
from attnkit.errors import UserError
from attnkit.files import checked_output
from attnkit.heads import ModelShape, read_artifact
from attnkit.recipe import Recipe, RecipeError, check_against_model
from attnkit.recipe.tasks import GridTask, RulerTask
from attnkit.tasks import choice, conflict, generate, needle, ruler, segments
from attnkit.tasks.folder import check_folder


def haystack_file(task: Any) -> None:
    """A needle task's own haystack file (the default essays are downloaded when the task runs)."""
    if task.haystack is not None:
        needle.read_haystack(task.haystack, "task.haystack")


DATA: dict[str, Callable[[Any], Any]] = {
    "generate": generate.load_prompts,
    "choice": choice.load_items,
    "conflict": conflict.load_conflict_items,
    "segments": segments.load_items,
    "needle": haystack_file,
    "ruler": haystack_file,
}
"""Each task's reader of its data files (a task absent here reads none)."""


def preflight(
    recipe: Recipe, shape: ModelShape | None, out_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Check ``recipe`` without weights (``shape``: the model's config, None when not loaded) and
    return its report folder; every problem found is raised at once as a :class:`RecipeError`."""
    errors: list[str] = []
    folder = None
    try:
        folder = checked_output(out_dir if out_dir is not None else recipe.output_dir(), output_name(out_dir))
        check_folder(folder, overwrite)
    except UserError as err:
        errors.append(str(err))
    if recipe.task is not None and recipe.task.kind in DATA:
        try:
            DATA[recipe.task.kind](recipe.task)
        except UserError as err:
            errors.append(str(err))
    errors += head_problems(recipe, shape)
    errors += backend_problems(recipe)
    if shape is not None and isinstance(recipe.task, (GridTask, RulerTask)):
        check = ruler.check_lengths if isinstance(recipe.task, RulerTask) else needle.check_lengths
        try:
            check(shape.max_positions, recipe.task)
        except UserError as err:
            errors.append(str(err))
    if errors:
        raise RecipeError(errors, recipe.name)
    assert folder is not None
    return folder


def backend_problems(recipe: Recipe) -> list[str]:
    """The recipe's backend and placement on this machine (flash-attn installed, a GPU present), and
    methods whose per-head masks its flash backend cannot take; each with the fix."""
    spec = recipe.model
    problems = models.backend_problems(spec.attn_implementation, spec.device, spec.device_map)
    if "flash" in spec.attn_implementation:
        for i, config in enumerate(recipe.methods):
            if config.needs_masks:
                problems.append(
                    f"methods[{i}] ({config.method}): {config.needs_masks} reads per-head masks, which "
                    f"model.attn_implementation: {spec.attn_implementation} cannot take; use sdpa or eager"
                )
    return problems


def output_name(out_dir: str | Path | None) -> str:
    return "--output" if out_dir is not None else "output"


def head_problems(recipe: Recipe, shape: ModelShape | None) -> list[str]:
    """Head sets against the model (``shape``), or, without it, each artifact read and checked in itself."""
    if shape is not None:
        try:
            check_against_model(recipe, shape)
        except RecipeError as err:
            return err.errors
        return []
    problems = []
    for i, config in enumerate(recipe.methods):
        heads = getattr(config, "heads", None)
        if isinstance(heads, str) and heads != "all":
            try:
                read_artifact(heads)
            except UserError as err:
                problems.append(f"methods[{i}].heads: {err}")
    return problems
