"""Preflight: what `validate`, and `run` before the weights load, refuse, each with a message and exit code 2."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.recipe import RecipeError, load_recipe

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run inside an empty working tree."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recipe_file(folder: Path, text: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


GENERATE = "task: {kind: generate, prompts: [Hi], max_new_tokens: 2}\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('output: "runs/{model}"', "names {model}, which attnkit does not fill"),
        ('output: "runs/{oops"', "write a literal brace as {{ or }}"),
        ('output: ""', "output: Value error, empty; give a folder"),
        ("output: ../outside", "leaves the current folder"),
        ("output: runs/../../outside", "leaves the current folder"),
        ("output: .", "leaves the current folder"),
        ("name: ../../escape", "cannot name a folder"),
    ],
)
def test_output_placeholders_escapes_and_empty_are_refused_by_validate(workdir, line, message):
    result = invoke("validate", recipe_file(workdir, f"{line}\n{GENERATE}"), "--no-check-model")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_output_that_is_a_file_or_not_writable_is_refused(workdir):
    (workdir / "taken").write_text("a file")
    result = invoke("validate", recipe_file(workdir, f"output: taken\n{GENERATE}"), "--no-check-model")
    assert result.exit_code == 2 and "is an existing file, not a folder" in result.output
    locked = workdir / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who may write anywhere (root)")
    result = invoke("validate", recipe_file(workdir, f"output: locked/run\n{GENERATE}"), "--no-check-model")
    assert result.exit_code == 2 and "permission denied" in result.output


def test_run_refuses_a_bad_output_before_the_weights_load(workdir, model_dir, monkeypatch):
    import attnkit.tasks.runner

    loaded = []
    monkeypatch.setattr(attnkit.tasks.runner, "load", lambda recipe: loaded.append(recipe))
    (workdir / "taken").write_text("a file")
    text = f"model: {{name_or_path: {model_dir}}}\noutput: taken\n{GENERATE}"
    result = invoke("run", recipe_file(workdir, text), "--no-progress")
    assert result.exit_code == 2 and "is an existing file" in result.output
    assert loaded == []


def test_missing_or_broken_data_files_and_artifacts_are_found_by_validate(workdir):
    (workdir / "broken.jsonl").write_text('{"prompt": "a", "choices": [" a"], "answer": 0}\n{oops\n')
    (workdir / "empty.jsonl").write_text("\n")
    (workdir / "heads.json").write_text('{"not": "an artifact"}')
    cases = {
        "task: {kind: choice, data: nope.jsonl}": "task.data: 'nope.jsonl' not found",
        "task: {kind: choice, data: broken.jsonl}": "broken.jsonl:2: not valid JSON",
        "task: {kind: generate, prompts_file: empty.jsonl}": "holds no items",
        f"methods: [{{method: razor, heads: heads.json}}]\n{GENERATE}": "heads.json is not a head-list artifact",
        f"methods: [{{method: head_mask, heads: nope.json}}]\n{GENERATE}": "'nope.json' not found",
    }
    for text, message in cases.items():
        result = invoke("validate", recipe_file(workdir, text), "--no-check-model")
        assert result.exit_code == 2 and message in result.output, (text, result.output)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("methods: [{method: head_mask, heads: all, scale: .nan}]", "methods[0].scale"),
        ("methods: [{method: snapkv, budget: .nan}]", "methods[0].budget"),
        ("methods: [{method: snapkv, budget: .inf}]", "methods[0].budget"),
        ("methods: [{method: act, beta: -.inf}]", "methods[0].beta"),
        ("task: {kind: generate, prompts: [Hi], temperature: .inf}", "task.temperature"),
        ("task: {kind: needle, depths: [.nan]}", "task.depths[0]"),
        ("seed: .nan", "seed"),
    ],
)
def test_non_finite_numbers_are_refused_everywhere_in_the_schema(text, where):
    with pytest.raises(RecipeError) as caught:
        load_recipe(text + "\n")
    assert f"{where}: Input should be a finite number" in str(caught.value)


def test_non_finite_profiler_settings_are_refused():
    from attnkit.probes.configs import ActHeadsConfig, ProfileError, make_config

    with pytest.raises(ProfileError, match="--beta nan: Input should be a finite number"):
        make_config(ActHeadsConfig, option=True, data="d.jsonl", beta=float("nan"))


def test_needle_lengths_are_checked_against_the_configs_positions_by_validate(workdir, model_dir):
    text = f"model: {{name_or_path: {model_dir}}}\ntask: {{kind: needle, lengths: [300], haystack: r.yaml}}\n"
    result = invoke("validate", recipe_file(workdir, text))
    assert result.exit_code == 2 and "exceed the model's 256 positions" in result.output


def test_a_yaml_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = "\n".join(lines) + "\nmethods: [{method: head_mask, heads: {layers: *a9, heads: all}}]\n"
    assert len(bomb) < 800
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than 100000 values through its aliases"):
        load_recipe(bomb)
    assert time.perf_counter() - start < 2


def test_an_oversized_recipe_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n# " + "x" * 1_100_000 + "\n")
    with pytest.raises(RecipeError, match="larger than 1000000 bytes"):
        load_recipe(big)


@pytest.mark.parametrize("value", ["methods.0.scale=[1, 2", "methods.0.scale={a: b: c}", "task.prompts=[unclosed"])
def test_yaml_mistakes_inside_set_values_are_messages(value):
    result = invoke(
        "validate", Path(__file__).parent.parent / "recipes/quickstart.yaml", "--no-check-model", "--set", value
    )
    assert result.exit_code == 2, result.output
    assert f"--set {value.split('=')[0]}: not valid YAML" in result.output and "Traceback" not in result.output


@pytest.fixture
def remote_code_model(tmp_path) -> tuple[Path, Path]:
    """A model folder whose config class is its own Python file, which leaves a marker when it runs."""
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}})
    )
    (folder / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    return folder, marker


def test_remote_code_needs_the_flag_as_well_as_the_recipe_key(workdir, remote_code_model):
    folder, marker = remote_code_model
    text = f"model: {{name_or_path: {folder}, trust_remote_code: true}}\n{GENERATE}"
    for command in ("run", "validate"):
        result = invoke(command, recipe_file(workdir, text))
        assert result.exit_code == 2, result.output
        assert "trust_remote_code: true" in result.output and "--trust-remote-code" in result.output
    assert not marker.exists()


def test_validate_never_runs_model_code(workdir, remote_code_model):
    folder, marker = remote_code_model
    text = f"model: {{name_or_path: {folder}, trust_remote_code: true}}\n{GENERATE}"
    result = invoke("validate", recipe_file(workdir, text), "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert "validate never runs" in result.output and "ok:" in result.output
    assert not marker.exists()


YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)
)
KEYS = st.sampled_from(
    ["name", "methods", "task", "output", "baseline", "seed", "model", "method", "heads", "scale", "budget",
     "kind", "prompts", "beta", "layers", "window", "data", "0", "1"]
)  # fmt: skip
VALUES = st.recursive(
    YAML_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=20
)
METHODS = st.lists(
    st.fixed_dictionaries({"method": st.sampled_from(["act", "head_mask", "snapkv", "razor", "streaming", "bogus"])}).flatmap(
        lambda base: st.dictionaries(KEYS, VALUES, max_size=3).map(lambda extra: {**extra, **base})
    ),
    max_size=3,
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(top=st.dictionaries(KEYS, VALUES, max_size=5), methods=METHODS)
def test_fuzzed_recipes_load_or_raise_a_recipe_error(top, methods):
    """Whatever the YAML holds, reading it gives a Recipe or a RecipeError: never another exception."""
    try:
        load_recipe({**top, "methods": methods})
    except RecipeError as err:
        assert err.errors and all(isinstance(line, str) for line in err.errors)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzzed_yaml_text_loads_or_raises_a_recipe_error(text):
    try:
        load_recipe(text + "\n# fuzz\n")
    except RecipeError:
        pass
