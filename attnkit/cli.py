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


@profile_app.command("act-heads")
def profile_act_heads_cmd(
    data: Path = typer.Option(..., help="Labelled dev set: choice JSONL (prompt, choices, answer), label-word scored."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model alias, folder, .gguf or HF id."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/act-<model>.json)."),
    limit: int = typer.Option(200, help="Use the first N items."),
    beta: float = typer.Option(0.4),
    threshold: float = typer.Option(0.1),
    search: str = typer.Option("coarse-to-fine", help="coarse-to-fine (whole layers, then heads of the best) or full."),
    fine_layers: int = typer.Option(2, help="Layers whose heads are searched one by one (coarse-to-fine)."),
    coarse_every: int = typer.Option(2, help="Rank whole layers on every N-th (length-sorted) batch."),
    batch_size: int = typer.Option(16),
    progress: bool = typer.Option(True),
) -> None:
    """Find ACT's heads: calibrate one candidate at a time, keep those that beat the uncalibrated model."""
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.act_heads import profile_act_heads
    from attnkit.tasks import TaskDataError

    if search not in ("coarse-to-fine", "full"):
        fail(f"--search {search!r}: use coarse-to-fine or full")
    output = output or Path("heads") / f"act-{Path(model).stem}.json"
    try:
        loaded, tokenizer = load_model(model)
        artifact = profile_act_heads(
            loaded, tokenizer, str(data), model_id=model, output=output, limit=limit, beta=beta, threshold=threshold,
            search=search, fine_layers=fine_layers, coarse_every=coarse_every, batch_size=batch_size,
            progress=progress,
        )
    except (ModelLoadError, TaskDataError) as err:
        fail(str(err))
    params = artifact.parameters
    plot_act_heads(artifact, output.with_suffix(".png"), model)
    count = sum(map(len, artifact.selected.values()))
    typer.echo(
        f"baseline accuracy {params['baseline_accuracy']:.4f} on {artifact.samples} items; "
        f"{count} heads selected in {params['seconds']} s\n{artifact.selection.rule}\n"
        f"artifact: {output}\nplot: {output.with_suffix('.png')}"
    )


@profile_app.command("sink-dims")
def profile_sink_dims_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Embedded alias, local folder, .gguf file or HF id."),
    texts: Optional[Path] = typer.Option(None, "--texts", help="Text file, one text per line (default: the builtin English texts)."),
    samples: int = typer.Option(30, min=1, help="Use the first N texts."),
    top: int = typer.Option(4, min=1, help="Keep at most this many sink dims (those consistent across layers)."),
    tau: float = typer.Option(20.0, min=0.0, help="Validate phi(x) = max over dims |x_d/rms(x)| > tau against attention sinks."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default heads/sink-dims-<model>.json); the plot goes next to it (.png)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 | auto"),
    plot: bool = typer.Option(True, help="Also write the heatmap / tau plot."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Find VAR's sink dims: hidden dims that are massive on attention-sink tokens, checked by precision/recall."""
    from attnkit.models import ModelLoadError, load_model
    from attnkit.probes.sink_dims import SinkDimsError, find_sink_dims, read_texts

    output = output or Path("heads") / f"sink-dims-{Path(model).stem}.json"
    try:
        items = read_texts(texts) if texts is not None else None
        data = f"{texts}: first {min(samples, len(items))} of {len(items)} non-blank lines" if items is not None else None
        loaded, tokenizer = load_model(model, dtype=dtype, attn_implementation="eager")
    except (ModelLoadError, ValueError) as err:  # ValueError: a bad --dtype; SinkDimsError: a bad --texts
        fail(str(err))
    try:
        result = find_sink_dims(loaded, tokenizer, items, top=top, tau=tau, samples=samples, name=model, data=data, progress=progress)
    except SinkDimsError as err:
        fail(str(err))
    result.save(output)
    typer.echo(result.summary())
    typer.echo(f"artifact: {output}")
    if plot:
        result.plot(output.with_suffix(".png"))
        typer.echo(f"plot: {output.with_suffix('.png')}")


def plot_act_heads(artifact: Any, path: Path, model: str) -> None:
    """Accuracy gain of each head evaluated alone; blank where a head was not evaluated."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    from attnkit.plots import head_map

    scores = np.full((len(artifact.scores), len(artifact.scores[0])), np.nan)
    for layer, heads in artifact.parameters["evaluated_heads"].items():
        for head in heads:
            scores[int(layer), head] = artifact.scores[int(layer)][head]
    bound = max(1e-3, float(np.nanmax(np.abs(scores))) if np.isfinite(scores).any() else 1e-3)
    head_map(scores, path, title=f"ACT head search, {model}\naccuracy gain per head (blank: not searched)",
             cbar_label="accuracy gain", norm=TwoSlopeNorm(0.0, -bound, bound), cmap="RdBu")


if __name__ == "__main__":
    app()
