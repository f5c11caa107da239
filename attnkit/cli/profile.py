"""``attnkit profile NAME``: find the heads (or dimensions) a method needs and write an artifact.

Every command is built from its profiler's config (:mod:`attnkit.probes.configs`), as ``attnkit
list`` reads the method configs: one option per field, with the field's type, default and
description (a ``Literal``'s choices shown by ``--help``; lists written comma-separated), plus the
options every profiler shares (``-m/--model``, ``-o/--output``, ``--dtype`` where the profiler
reads attention maps, ``--plot``, ``--progress``). The config checks the values, so a mistake reads
the same on the command line and in Python. Building the commands imports neither torch nor
transformers; a command imports its profiler when it runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from attnkit.catalog import DEFAULT_MODEL
from attnkit.cli.common import (
    DType,
    DTypeOption,
    Model,
    Progress,
    default_output,
    head_summary,
    output_option,
    show_artifact,
)
from attnkit.probes.configs import make_config
from attnkit.probes.registry import PROFILERS, Profiler

app = typer.Typer(help="Find the heads (or dimensions) a method needs; writes an artifact.", no_args_is_help=True)

PLOT_HELP = "Also write the plot next to the artifact (.png)."


@dataclass(frozen=True)
class Done:
    """A profiler command that finished: its settings and where it wrote."""

    config: Any
    model: str
    output: Path
    plot: bool

    @property
    def png(self) -> Path:
        return self.output.with_suffix(".png")


@dataclass(frozen=True)
class Command:
    """What the command line adds to a profiler: its report, where its artifact goes by default
    (``heads/<prefix>-<model>.json``; None: it writes into an artifact it is given), whether it
    loads the model with eager attention in ``--dtype``, and a logger whose warnings the report
    repeats (held back while it runs)."""

    report: Callable[[Any, Done], None]
    prefix: str | None = None
    eager: bool = False
    repeats_log: str | None = None


def option_type(annotation: Any, optional: bool) -> Any:
    """The command-line type of a config field: a Literal as text (its choices in the help), a list
    as comma-separated text, ``X | None`` as X (Optional when its default is None)."""
    if get_origin(annotation) in (Union, UnionType):
        inner = next(a for a in get_args(annotation) if a is not type(None))
        return option_type(inner, False) | None if optional else option_type(inner, False)
    if get_origin(annotation) in (Literal, list):
        return str
    return annotation


def choices(annotation: Any) -> list[str]:
    """The values a Literal field (or a list of them, or an optional one) allows; [] for other fields."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return [c for a in get_args(annotation) for c in choices(a)]


def field_option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The option of one config field, its help the field's description. A Literal's choices are
    its metavar; the config checks the value, so the message is the one Python callers get."""
    flag = name.replace("_", "-")
    kind = option_type(field.annotation, field.default is None)
    default = ... if field.is_required() else field.default
    if isinstance(default, list):
        default = ",".join(map(str, default))
    decls = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
    allowed = choices(field.annotation)
    metavar = f"[{'|'.join(allowed)}]" if allowed else None
    return keyword(name, kind, typer.Option(default, *decls, help=field.description, metavar=metavar))


def keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def options(profiler: Profiler, command: Command) -> list[inspect.Parameter]:
    """The command's options: the shared ones around the config's fields."""
    shared = [keyword("model", Model, DEFAULT_MODEL)]
    if command.prefix:
        shared.append(keyword("output", Path | None, output_option(f"heads/{command.prefix}-<model>.json")))
    fields = [field_option(name, field) for name, field in profiler.config.model_fields.items()]
    tail = [keyword("dtype", DTypeOption, DType.float32)] if command.eager else []
    if command.prefix:
        tail.append(keyword("plot", bool, typer.Option(True, "--plot/--no-plot", help=PLOT_HELP)))
    return [*shared, *fields, *tail, keyword("progress", Progress, True)]


def command_for(profiler: Profiler, command: Command) -> Callable[..., None]:
    """The typer callback of one profiler: its options from the config, its help the config's doc."""

    def callback(**values: Any) -> None:
        run(profiler, command, values)

    params = options(profiler, command)
    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__name__ = f"profile_{profiler.name.replace('-', '_')}"
    callback.__doc__ = profiler.config.__doc__
    return callback


def run(profiler: Profiler, command: Command, values: dict[str, Any]) -> None:
    """Check the settings, read the data, load the model, profile, report."""
    from attnkit.models import load_model

    model, progress, dtype = values.pop("model"), values.pop("progress"), values.pop("dtype", None)
    output = default_output(values.pop("output"), command.prefix, model) if command.prefix else None
    plot = values.pop("plot", False)
    written = {"output": output} if command.prefix else {}
    config = make_config(profiler.config, option=True, **values)
    code = profiler.code()
    inputs = {"data": code.read(config)} if profiler.reads else {}
    loaded, tokenizer = (
        load_model(model, dtype=dtype.value, attn_implementation="eager") if command.eager else load_model(model)
    )
    try:
        with held_back(command.repeats_log):
            result = code.profile(loaded, tokenizer, config, **inputs, model_id=model, progress=progress, **written)
    except KeyboardInterrupt as err:
        raise KeyboardInterrupt(
            "interrupted; every finished unit is kept in the progress file beside the artifact (*.progress.jsonl): "
            "rerun the same command to resume"
        ) from err
    command.report(result, Done(config, model, output or config.heads, plot))


@contextmanager
def held_back(logger: str | None) -> Iterator[None]:
    """Hold back ``logger``'s records while the block runs (the report prints them itself)."""
    if logger is None:
        yield
        return
    target = logging.getLogger(logger)
    target.addFilter(reject)
    try:
        yield
    finally:
        target.removeFilter(reject)


def reject(_record: logging.LogRecord) -> bool:
    return False


def show(artifact: Any, done: Done) -> None:
    """A head-list artifact's summary and paths (and its head map, unless ``--no-plot``)."""
    if done.plot:
        show_artifact(artifact, done.output)
    else:
        typer.echo(f"{head_summary(artifact)}\nartifact: {done.output}")


def plot_line(done: Done) -> str:
    return f"\nplot: {done.png}" if done.plot else ""


def report_act_heads(artifact: Any, done: Done) -> None:
    from attnkit.probes.act_heads import plot_act_heads

    params = artifact.parameters
    if done.plot:
        plot_act_heads(artifact, done.png, done.model)
    count = sum(map(len, artifact.selected.values()))
    typer.echo(
        f"baseline accuracy {params['baseline_accuracy']:.4f} on {artifact.samples} items; "
        f"{count} heads selected in {params['seconds']} s\n{artifact.selection.rule}\n"
        f"artifact: {done.output}{plot_line(done)}"
    )


def report_sink_dims(result: Any, done: Done) -> None:
    typer.echo(result.summary())
    typer.echo(f"artifact: {done.output}")
    if done.plot:
        result.plot(done.png)
        typer.echo(f"plot: {done.png}")


def report_conflict_heads(artifact: Any, done: Done) -> None:
    from attnkit.probes.conflict_heads import plot_conflict_heads

    params = artifact.parameters
    what = "path patching" if done.config.mode == "path" else "ablation (approximation)"
    if done.plot:
        title = f"PH3 conflict heads, {done.model}\n{what}, {artifact.samples} items (red: memory, blue: context)"
        plot_conflict_heads(artifact, done.png, title)
    top = lambda ranking: ", ".join(f"L{l}H{h} ({s:+.3f})" for l, h, s in ranking[:5]) or "none"  # noqa: E731, E741
    typer.echo(
        f"{artifact.samples} items ({params['items_skipped'] or 'none'} skipped), mean clean LD {params['ld_clean_mean']:+.3f}, "
        f"{params['seconds']} s\nmemory heads ({len(params['memory_heads'])}): {top(params['memory_heads'])}\n"
        f"context heads ({len(params['context_heads'])}): {top(params['context_heads'])}\n"
        f"artifact: {done.output}{plot_line(done)}"
    )


def report_ph3_sweep(sweep: dict[str, Any], done: Done) -> None:
    base = sweep["results"]["untouched"]
    lines = [
        f"untouched: context rate {base['context_rate']:.4f}, memory rate {base['memory_rate']:.4f} (n={sweep['n']})"
    ]
    for steer, k in sweep["chosen"].items():
        tried = ", ".join(f"k={key}: {r[f'{steer}_rate']:.4f}" for key, r in sweep["results"][steer].items())
        lines.append(f"steer {steer}: chose k={k}  ({steer} rate {tried})")
    typer.echo("\n".join(lines) + f"\nwritten into {done.output} (parameters.sweep), {sweep['seconds']} s")


def report_razor_heads(artifact: Any, done: Done) -> None:
    params = artifact.parameters
    if params["block_shrunk"]:
        typer.echo(f"note: {params['block_shrunk']}")
    typer.echo(f"{artifact.selection.rule}\n{params['tokens']} tokens in {params['seconds']} s")
    show(artifact, done)


def report_retrieval_heads(artifact: Any, done: Done) -> None:
    params = artifact.parameters
    typer.echo(
        f"{artifact.selection.rule}\n{params['samples_total']} prompts in {params['seconds']} s "
        f"(mean recall {params['mean_recall']:.3f})"
    )
    if not params["samples_kept"]:
        typer.echo(
            f"warning: no reply reached recall {done.config.min_recall}, so every score is 0: the model did not "
            "retrieve the needles; use shorter --lengths or other --needles"
        )
    show(artifact, done)


def report_kv_gates(artifact: Any, done: Done) -> None:
    params = artifact.parameters
    nll = params["answer_nll"]
    typer.echo(
        f"{artifact.selection.rule}\n{artifact.samples} prompts answered by the full cache, {done.config.steps} "
        f"steps in {params['seconds']} s"
    )
    typer.echo(
        f"answer NLL: all heads whole {nll['all_whole']:.3f}, selected whole {nll['selected']:.3f}, "
        f"none whole {nll['none_whole']:.3f}"
    )
    show(artifact, done)


COMMANDS: dict[str, Command] = {
    "act-heads": Command(report_act_heads, "act"),
    "sink-dims": Command(report_sink_dims, "sink-dims", eager=True),
    "conflict-heads": Command(report_conflict_heads, "conflict"),
    "ph3-sweep": Command(report_ph3_sweep),
    "razor-heads": Command(report_razor_heads, "razor", eager=True, repeats_log="attnkit.probes.razor_heads"),
    "retrieval-heads": Command(report_retrieval_heads, "retrieval"),
    "kv-gates": Command(report_kv_gates, "kv-gates"),
}

for _name, _profiler in PROFILERS.items():
    app.command(_name)(command_for(_profiler, COMMANDS[_name]))
