"""The ``attnkit`` command. ``--help`` and ``list`` answer without importing torch or transformers."""

from __future__ import annotations

import typer

from attnkit.cli import inspection, profile, recipes
from attnkit.cli.common import GuardedGroup, configure_logging

app = typer.Typer(
    cls=GuardedGroup,
    help="Training-free attention interventions for Hugging Face models, from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Print results and errors only, no notes on downloads or conversions."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an unexpected error (put it before the command)."
    ),
) -> None:
    """Training-free attention interventions for Hugging Face models, from YAML recipes."""
    configure_logging(quiet)


app.registered_commands.extend(recipes.app.registered_commands)
app.add_typer(inspection.app, name="inspect")
app.add_typer(profile.app, name="profile")

__all__ = ["app"]

if __name__ == "__main__":
    app()
