"""The command line: run (the real quickstart), validate, list, --set, and error messages."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnkit.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_quickstart_runs_on_real_smollm2(tmp_path):
    """The README's first command, on the embedded SmolLM2 (installed in CI: this never skips)."""
    result = invoke("run", ROOT / "recipes/quickstart.yaml", "--output", tmp_path, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "head_mask: heads=2" in result.output and "report:" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["runs"]) == {"baseline", "attnkit"}
    stats = report["runs"]["attnkit"]["method_stats"]["head_mask"]
    assert stats["head_outputs_scaled"] > 0 and stats["heads"] == 2
    baseline = [json.loads(line) for line in (tmp_path / "baseline_outputs.jsonl").read_text().splitlines()]
    assert "Paris" in baseline[0]["completion"]
    assert report["recipe"]["methods"][0]["method"] == "head_mask"
    for name in ("report.md", "outputs.jsonl", "recipe.yaml"):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_validate_checks_heads_against_the_real_model(tmp_path):
    assert invoke("validate", ROOT / "recipes/quickstart.yaml").exit_code == 0
    result = invoke("validate", ROOT / "recipes/quickstart.yaml", "--set", "methods.0.heads={40: [0]}")
    assert result.exit_code == 2
    assert "methods[0].heads: layer 40 does not exist, model has 30 layers" in result.output


def test_validate_reports_bad_recipe_without_loading_a_model(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  - method: head_mask\n    heads: all\n    scael: 1\n")
    result = invoke("validate", bad, "--no-check-model")
    assert result.exit_code == 2
    assert "methods[0].scael: unknown key" in result.output


def test_set_override_is_applied_and_checked(tmp_path):
    result = invoke("validate", ROOT / "recipes/quickstart.yaml", "--no-check-model", "--set", "methods.0.scale=oops")
    assert result.exit_code == 2 and "methods[0].scale" in result.output
    result = invoke("validate", ROOT / "recipes/quickstart.yaml", "--no-check-model", "--set", "methods.0.scale=0.5")
    assert result.exit_code == 0, result.output


def test_list_shows_methods_with_defaults():
    result = invoke("list")
    assert result.exit_code == 0
    assert "head_mask: heads=required, scale=0.0" in result.output


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["list"]])
def test_help_everywhere(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_run_missing_recipe_is_a_clear_error(tmp_path):
    result = invoke("run", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "not found" in result.output


def test_help_and_list_import_neither_torch_nor_transformers():
    """`attnkit --help`, `list` and every command's --help answer without the heavy imports."""
    import subprocess
    import sys

    script = """
import sys
from typer.testing import CliRunner
from attnkit.cli import app
runner = CliRunner()
group_commands = {"inspect": ["sinks", "heads"], "profile": sorted(c.name for c in __import__("attnkit.cli.profile", fromlist=["app"]).app.registered_commands)}
calls = [["--help"], ["list"], ["run", "--help"], ["validate", "--help"], ["list", "--help"]]
for group, names in group_commands.items():
    calls.append([group, "--help"])
    calls += [[group, name, "--help"] for name in names]
for args in calls:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(len(calls), "heavy:", heavy)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("heavy: []"), done.stdout
    assert int(done.stdout.split()[0]) >= 14


def test_model_option_is_the_same_everywhere():
    """-m/--model exists on every command that loads a model, with one default and one help text."""
    from attnkit.catalog import DEFAULT_MODEL
    from attnkit.cli import inspection, profile

    commands = [*inspection.app.registered_commands, *profile.app.registered_commands]
    seen = 0
    for command in commands:
        for param in typer_params(command.callback):
            if param.name == "model":
                seen += 1
                assert param.default == DEFAULT_MODEL, command.name
                assert {"--model", "-m"} <= set(param.opts), command.name
    assert seen >= 7


def typer_params(callback):
    import typer.main

    return typer.main.get_command_from_info(
        typer.models.CommandInfo(callback=callback), pretty_exceptions_short=True, rich_markup_mode=None
    ).params


def all_commands():
    from attnkit.cli import app, inspection, profile

    yield from ((c.callback.__name__, c.callback) for c in app.registered_commands)
    for group in (inspection.app, profile.app):
        yield from ((c.name, c.callback) for c in group.registered_commands)


def test_every_option_has_help_text():
    missing = [
        f"{name} {param.opts[0]}"
        for name, callback in all_commands()
        for param in typer_params(callback)
        if not getattr(param, "help", None)
    ]
    assert not missing, missing


def test_notes_go_through_the_attnkit_logger_and_the_cli_shows_them(capsys):
    """Library diagnostics are log records under "attnkit"; the CLI prints them as `attnkit: ...`,
    and --quiet keeps only warnings."""
    import logging

    from attnkit.cli.common import configure_logging

    logger = logging.getLogger("attnkit")
    before = (list(logger.handlers), logger.level)
    try:
        configure_logging(quiet=False)
        configure_logging(quiet=False)  # once per process, however often the app runs
        logging.getLogger("attnkit.data").info("downloading something (once)")
        configure_logging(quiet=True)
        logging.getLogger("attnkit.models").info("converted")
        logging.getLogger("attnkit.models").warning("tokenizer eos differs")
    finally:
        logger.handlers[:], logger.level = before
    err = capsys.readouterr().err
    assert err.splitlines() == ["attnkit: downloading something (once)", "attnkit: tokenizer eos differs"]
