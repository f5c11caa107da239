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
