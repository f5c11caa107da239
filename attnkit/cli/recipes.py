"""``attnkit run``, ``validate`` and ``list``: recipes and the methods they name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from attnkit.cli.common import SET_HELP, Progress, fail
from attnkit.recipe.methods import method_configs

app = typer.Typer()


OVERWRITE_HELP = "Replace the report already in the output folder (without it, a folder holding files is refused)."
TRUST_HELP = (
    "Allow the model's own Python code (from its folder or hub repo) to run, when the recipe also sets "
    "model.trust_remote_code: true; both are needed. `validate` never runs it."
)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Report folder (default: the recipe's `output`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    progress: Progress = True,
) -> None:
    """Load the model, apply the recipe, run its task and write a report (checked first, as `validate` does)."""
    from attnkit.recipe import load_recipe
    from attnkit.tasks.runner import run_recipe, summarize

    loaded = load_recipe(recipe, set_)
    require_consent(loaded, trust_remote_code)
    report = run_recipe(loaded, out_dir=output, progress=progress, overwrite=overwrite)
    typer.echo(summarize(report))


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Report folder `run` would use (default: the recipe's `output`)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    check_model: bool = typer.Option(
        True, help="Also check head sets and lengths against the model's config (no weights)."
    ),
) -> None:
    """Check a recipe without running it: types and ranges, the output folder, data files, artifacts, and
    head indices and prompt lengths against the model's config. Never runs the model's own code."""
    from attnkit.heads import ModelShape
    from attnkit.models import ModelLoadError, load_config
    from attnkit.recipe import load_recipe
    from attnkit.tasks.preflight import preflight

    loaded = load_recipe(recipe, set_)
    require_consent(loaded, trust_remote_code)
    shape = None
    if check_model:
        spec = loaded.model
        try:
            shape = ModelShape.from_config(load_config(spec.name_or_path), spec.name_or_path)
        except ModelLoadError as err:
            if not spec.trust_remote_code:
                raise
            typer.echo(f"note: model checks skipped; its config needs its own code, which validate never runs ({err})")
    folder = preflight(loaded, shape, output, overwrite)
    methods = ", ".join(m.method for m in loaded.methods) or "no methods"
    task = loaded.task.kind if loaded.task else "no task"
    typer.echo(f"ok: {recipe} ({methods}; task: {task}; model: {loaded.model.name_or_path}; report: {folder})")


def require_consent(recipe: Any, flag: bool) -> None:
    """Remote code runs only with the recipe's key and the command line's flag together."""
    if recipe.model.trust_remote_code and not flag:
        fail(
            "the recipe sets model.trust_remote_code: true, which runs Python code shipped with the model; "
            "to allow it, pass --trust-remote-code as well (both are needed), or set the key to false"
        )


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
