"""``attnkit run``, ``validate`` and ``list``: recipes and the methods they name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from attnkit.cli.common import SET_HELP, Progress, fail, load_recipe_or_fail
from attnkit.recipe.methods import method_configs

app = typer.Typer()


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Report folder (default: the recipe's `output`)."),
    progress: Progress = True,
) -> None:
    """Load the model, apply the recipe, run its task and write a report."""
    from attnkit.heads import HeadSetError
    from attnkit.models import ModelLoadError
    from attnkit.recipe import RecipeError
    from attnkit.tasks import TaskDataError
    from attnkit.tasks.runner import run_recipe, summarize

    loaded = load_recipe_or_fail(recipe, set_)
    try:
        report = run_recipe(loaded, out_dir=output, progress=progress)
    except (RecipeError, ModelLoadError, HeadSetError, TaskDataError) as err:
        fail(str(err))
    typer.echo(summarize(report))


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    check_model: bool = typer.Option(True, help="Also check head sets against the model's config."),
) -> None:
    """Check a recipe without running it: types, ranges, and head indices against the model."""
    from attnkit.heads import ModelShape
    from attnkit.models import ModelLoadError, load_config
    from attnkit.recipe import RecipeError, check_against_model

    loaded = load_recipe_or_fail(recipe, set_)
    if check_model:
        spec = loaded.model
        try:
            config = load_config(spec.name_or_path, trust_remote_code=spec.trust_remote_code)
            check_against_model(loaded, ModelShape.from_config(config, spec.name_or_path))
        except (RecipeError, ModelLoadError) as err:
            fail(str(err))
    methods = ", ".join(m.method for m in loaded.methods) or "no methods"
    task = loaded.task.kind if loaded.task else "no task"
    typer.echo(f"ok: {recipe} ({methods}; task: {task}; model: {loaded.model.name_or_path})")


@app.command("list")
def list_methods() -> None:
    """List the methods, their parameters and defaults, one line each."""
    for name, config in method_configs().items():
        typer.echo(f"{name}: {describe(config)}  -- {first_line(config.__doc__)}")


def describe(config_class: Any) -> str:
    parts = []
    for name, field in config_class.model_fields.items():
        if name == "method":
            continue
        default = "required" if field.is_required() else repr(field.default)
        parts.append(f"{name}={default}")
    return ", ".join(parts)


def first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""
