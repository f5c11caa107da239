"""``attnkit inspect``: look inside a model (attention sinks) or an artifact (head scores)."""

from __future__ import annotations

from pathlib import Path

import typer

from attnkit.catalog import DEFAULT_MODEL
from attnkit.cli.common import Model, fail, head_summary

app = typer.Typer(
    help="Look inside a model or a head-list artifact: attention sinks and head scores, as tables and plots.",
    no_args_is_help=True,
)


@app.command("sinks")
def inspect_sinks(
    model: Model = DEFAULT_MODEL,
    text: str | None = typer.Option(None, "--text", "-t", help="The text to inspect."),
    file: Path | None = typer.Option(
        None, "--file", "-f", help="Read the text from this file instead (trailing newlines dropped)."
    ),
    threshold: float = typer.Option(
        0.1, min=0.0, max=1.0, help="A token is a sink in a head when its causal column mean exceeds this."
    ),
    output: Path = typer.Option(
        Path("runs/inspect-sinks"), "--output", "-o", help="Folder for sinks.png and sinks.json."
    ),
) -> None:
    """Find the attention sinks of a text: which tokens every later query attends to, per layer and head."""
    from attnkit.models import load_model
    from attnkit.sink_report import sink_heatmap, sink_stats

    if (text is None) == (file is None):
        fail(
            f'pass {"either" if text is None else "only one of"} --text "..." or --file PATH, e.g. --text "The cat sat on the mat."'
        )
    if file is not None:
        if not file.is_file():
            fail(f"--file {file}: not found; pass an existing text file, or the text itself with --text")
        text = file.read_text().rstrip("\n")  # the file's final newline is not part of the text
    if not text or not text.strip():
        fail("the text is empty; pass some text with --text or a non-empty --file")
    loaded, tokenizer = load_model(model, attn_implementation="eager")
    report = sink_stats(loaded, tokenizer, text, threshold=threshold, name=model)
    output.mkdir(parents=True, exist_ok=True)
    report.to_json(output / "sinks.json")
    sink_heatmap(report, output / "sinks.png")
    typer.echo(report.table())
    typer.echo(f"plot: {output / 'sinks.png'}\njson: {output / 'sinks.json'}")


@app.command("heads")
def inspect_heads(
    artifact: Path = typer.Argument(..., help="A head-list artifact (JSON written by `attnkit profile`)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="PNG path (default: the artifact's path with .png)."
    ),
    top: int = typer.Option(10, min=1, help="How many of the best-scoring heads to list."),
) -> None:
    """Show a head-list artifact: a layers x heads map of its scores (selected heads outlined) and a summary."""
    from attnkit.heads import read_artifact
    from attnkit.plots import artifact_map

    loaded = read_artifact(artifact)
    output = output or artifact.with_suffix(".png")
    artifact_map(loaded, output)
    typer.echo(head_summary(loaded, top))
    typer.echo(f"rule: {loaded.selection.rule}\nplot: {output}")
