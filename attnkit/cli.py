"""The ``attnkit`` command: run, validate and list."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Training-free attention interventions for Hugging Face models, from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)

SET_HELP = "Override a recipe field, e.g. --set methods.0.scale=0.5 (repeatable; the value is read as YAML)."


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


def _load(recipe: Path, overrides: list[str]) -> Any:
    from attnkit.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides)
    except RecipeError as err:
        fail(str(err))


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default: the recipe's `output`)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Load the model, apply the recipe, run its task and write a report."""
    from attnkit.heads import HeadSetError
    from attnkit.models import ModelLoadError
    from attnkit.recipe import RecipeError
    from attnkit.tasks import TaskDataError
    from attnkit.tasks.runner import run_recipe, summarize

    loaded = _load(recipe, set_)
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

    loaded = _load(recipe, set_)
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
    from attnkit.registry import METHODS, get_method

    get_method("head_mask")  # imports the built-in methods
    for name, cls in sorted(METHODS.items()):
        typer.echo(f"{name}: {describe(cls.config_class)}  -- {first_line(cls.__doc__)}")


def describe(config_class: Any) -> str:
    parts = []
    for name, field in config_class.model_fields.items():
        if name == "method":
            continue
        default = "required" if field.is_required() else repr(field.default)
        parts.append(f"{name}={default}")
    return ", ".join(parts)


def first_line(doc: Optional[str]) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""



# ----------------------------------------------------------------------------- inspect

inspect_app = typer.Typer(help="Look inside a model: attention sinks as tables and plots.", no_args_is_help=True)
app.add_typer(inspect_app, name="inspect")


@inspect_app.command("sinks")
def inspect_sinks(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Embedded alias, local folder, .gguf file or HF id."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="The text to inspect."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the text from this file instead (trailing newlines dropped)."),
    threshold: float = typer.Option(0.1, min=0.0, max=1.0, help="A token is a sink in a head when its causal column mean exceeds this."),
    output: Path = typer.Option(Path("runs/inspect-sinks"), "--output", "-o", help="Folder for sinks.png and sinks.json."),
) -> None:
    """Find the attention sinks of a text: which tokens every later query attends to, per layer and head."""
    from attnkit.inspect import sink_stats
    from attnkit.models import ModelLoadError, load_model
    from attnkit.plots import sink_heatmap

    if (text is None) == (file is None):
        fail(f"pass {'either' if text is None else 'only one of'} --text \"...\" or --file PATH, e.g. --text \"The cat sat on the mat.\"")
    if file is not None:
        if not file.is_file():
            fail(f"--file {file}: not found; pass an existing text file, or the text itself with --text")
        text = file.read_text().rstrip("\n")  # the file's final newline is not part of the text
    if not text or not text.strip():
        fail("the text is empty; pass some text with --text or a non-empty --file")
    try:
        loaded, tokenizer = load_model(model, attn_implementation="eager")
    except ModelLoadError as err:
        fail(str(err))
    report = sink_stats(loaded, tokenizer, text, threshold=threshold, name=model)
    output.mkdir(parents=True, exist_ok=True)
    report.to_json(output / "sinks.json")
    sink_heatmap(report, output / "sinks.png")
    typer.echo(report.table())
    typer.echo(f"plot: {output / 'sinks.png'}\njson: {output / 'sinks.json'}")


profile_app = typer.Typer(help="Find the heads (or dimensions) a method needs; writes an artifact.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")


if __name__ == "__main__":
    app()
