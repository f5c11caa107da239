"""Nothing lost, nothing silent: crash-safe reports and progress, strict artifacts, plain error messages."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import attnkit
from attnkit.cli import app
from attnkit.files import LOCK_NAME, OutputPathError, folder_lock, write_atomic
from attnkit.heads import HeadArtifact, HeadSetError, ModelShape, Selection, load_artifact
from attnkit.probes.progress import Progress
from attnkit.recipe import load_recipe
from tests.factory import tiny_model
from tests.test_preflight import recipe_file, workdir  # noqa: F401 (fixtures)

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def generate_recipe(
    folder: Path, model: Path, *, baseline: bool = True, output: str = "runs/r", extra: str = ""
) -> Path:
    text = (
        f"model: {{name_or_path: {model}}}\nbaseline: {str(baseline).lower()}\noutput: {output}\n"
        f"task: {{kind: generate, prompts: [Hi, Yo], max_new_tokens: 2}}\n{extra}"
    )
    return recipe_file(folder, text)


# ----------------------------------------------------------------------------- crash-safe results


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = write_atomic(tmp_path / "report.json", "old")

    def torn(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", torn)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_every_report_file_is_written_by_rename(workdir, model_dir, monkeypatch):  # noqa: F811
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(Path(b).name), real(a, b)))
    result = invoke("run", generate_recipe(workdir, model_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    written = {p.name for p in (workdir / "runs/r").iterdir()}
    assert written == {"recipe.yaml", "baseline_outputs.jsonl", "outputs.jsonl", "report.json", "report.md"}
    assert written <= set(replaced)
    assert json.loads((workdir / "runs/r/report.json").read_text())["status"] == "complete"


def test_the_baseline_is_on_disk_when_the_attnkit_run_fails(workdir, model_dir, monkeypatch):  # noqa: F811
    import attnkit.tasks.runner

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in a method")

    monkeypatch.setattr(attnkit.tasks.runner, "apply", broken)
    result = invoke("run", generate_recipe(workdir, model_dir), "--no-progress")
    assert result.exit_code == 1 and "a bug in a method" in result.output
    folder = workdir / "runs/r"
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "failed" and list(report["runs"]) == ["baseline"]
    assert report["error"] == "RuntimeError: a bug in a method"
    assert len((folder / "baseline_outputs.jsonl").read_text().splitlines()) == 2
    assert not (folder / "report.md").exists()


def test_ctrl_c_keeps_what_is_done_says_where_and_exits_130(workdir, model_dir, monkeypatch):  # noqa: F811
    import attnkit.tasks.runner

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnkit.tasks.runner, "apply", interrupt)
    result = invoke("run", generate_recipe(workdir, model_dir), "--no-progress")
    assert result.exit_code == 130
    assert "interrupted; the finished runs are saved in runs/r: baseline (baseline_outputs.jsonl)" in result.output
    assert json.loads((workdir / "runs/r/report.json").read_text())["status"] == "interrupted"
    assert (workdir / "runs/r/baseline_outputs.jsonl").is_file()


def test_a_run_that_fails_before_any_phase_leaves_no_folder(workdir, model_dir):  # noqa: F811
    text = "methods: [{method: act, heads: {0: [0]}}, {method: act, heads: {0: [1]}}]\n"
    result = invoke("run", generate_recipe(workdir, model_dir, baseline=False, extra=text), "--no-progress")
    assert result.exit_code == 2, result.output
    assert not (workdir / "runs/r").exists()


def test_a_rerun_needs_overwrite_and_never_mixes_old_and_new_files(workdir, model_dir):  # noqa: F811
    assert invoke("run", generate_recipe(workdir, model_dir), "--no-progress").exit_code == 0
    again = generate_recipe(workdir, model_dir, baseline=False)
    result = invoke("run", again, "--no-progress")
    assert result.exit_code == 2 and "already holds files" in result.output and "--overwrite" in result.output
    result = invoke("run", again, "--no-progress", "--overwrite")
    assert result.exit_code == 0, result.output
    files = {p.name for p in (workdir / "runs/r").iterdir()}
    assert files == {"recipe.yaml", "outputs.jsonl", "report.json", "report.md"}  # the old baseline is gone


def test_overwrite_never_clears_a_folder_attnkit_did_not_write(workdir, model_dir):  # noqa: F811
    (workdir / "mine").mkdir()
    (workdir / "mine/thesis.tex").write_text("precious")
    result = invoke("run", generate_recipe(workdir, model_dir, output="mine"), "--overwrite", "--no-progress")
    assert result.exit_code == 2 and "holds files attnkit did not write (thesis.tex)" in result.output
    assert (workdir / "mine/thesis.tex").read_text() == "precious"


def test_concurrent_runs_cannot_share_a_folder(tmp_path):
    with folder_lock(tmp_path / "run"):
        with pytest.raises(OutputPathError, match=rf"another attnkit run \(process {os.getpid()}\) is writing"):
            with folder_lock(tmp_path / "run"):
                pass
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    (tmp_path / "run" / LOCK_NAME).write_text("999999999")  # left by a killed run
    with folder_lock(tmp_path / "run") as lock:
        assert lock.read_text() == str(os.getpid())


def test_report_json_stays_valid_json_with_a_nan_metric(tmp_path):
    from attnkit.tasks.folder import to_json

    text = to_json({"metrics": {"mean": float("nan"), "ok": 1.5, "ci": [float("inf"), 0.0]}})
    assert json.loads(text) == {"metrics": {"mean": None, "ok": 1.5, "ci": [None, 0.0]}}


# ----------------------------------------------------------------------------- crash-safe progress


def test_a_truncated_last_progress_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "x.progress.jsonl"
    Progress(path, {"a": 1}).record("u0", {"score": 1.0})
    with path.open("a") as f:
        f.write('{"key": "u1", "sco')  # cut short by a kill
    with caplog.at_level(logging.WARNING, logger="attnkit"):
        resumed = Progress(path, {"a": 1})
    assert list(resumed.done) == ["u0"] and "dropped 1 unreadable line" in caplog.text
    resumed.record("u1", {"score": 2.0})
    assert list(Progress(path, {"a": 1}).done) == ["u0", "u1"]  # the new line was not glued to the torn one


def test_an_option_change_keeps_the_old_progress_and_resumes_it_later(tmp_path, caplog):
    path = tmp_path / "x.progress.jsonl"
    first = Progress(path, {"a": 1})
    first.record("u0", {"hidden": torch.ones(2)})
    with caplog.at_level(logging.WARNING, logger="attnkit"):
        other = Progress(path, {"a": 2})
    assert other.done == {} and "holds progress for other settings; it will be kept as" in caplog.text
    other.record("v0", {"score": 0.0})
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == 3 and kept[2] == "x.progress.jsonl"  # the first setup's file and tensors, set aside
    assert kept[1] == kept[0] + ".jsonl"
    back = Progress(path, {"a": 1})
    assert list(back.done) == ["u0"] and torch.equal(back.done["u0"]["hidden"], torch.ones(2))
    assert list(Progress(path, {"a": 2}).done) == ["v0"]


def test_a_mistyped_data_path_leaves_the_progress_untouched(workdir, model_dir):  # noqa: F811
    progress = workdir / "heads/act-x.progress.jsonl"
    progress.parent.mkdir()
    progress.write_text('{"setup": {"a": 1}}\n{"key": "L2", "accuracy": 0.5}\n')
    before = progress.read_bytes()
    result = invoke("profile", "act-heads", "--data", "typo.jsonl", "-o", "heads/act-x.json", "-m", model_dir)
    assert result.exit_code == 2 and "not found" in result.output
    assert progress.read_bytes() == before and sorted(p.name for p in progress.parent.iterdir()) == [progress.name]


def test_progress_of_another_setup_is_not_touched_until_a_unit_finishes(tmp_path):
    path = tmp_path / "x.progress.jsonl"
    Progress(path, {"a": 1}).record("u0", {"score": 1.0})
    before = path.read_bytes()
    Progress(path, {"a": 2})  # a run that then stops on a bad input
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.progress.jsonl"]


# ----------------------------------------------------------------------------- strict artifacts


@pytest.fixture(scope="module")
def shape():
    return ModelShape.from_config(tiny_model("llama-gqa").config, "tiny")


def artifact(shape: ModelShape, **changes) -> HeadArtifact:
    fields = dict(
        attnkit_version="0", model_id="tiny", config_fingerprint=shape.fingerprint, method="test",
        scores=[[0.0] * shape.num_heads for _ in range(shape.num_layers)],
        selection=Selection(rule="test", heads={0: [1]}),
    )  # fmt: skip
    return HeadArtifact(**{**fields, **changes})


def test_an_artifact_whose_matrix_does_not_match_its_level_or_model_is_refused(tmp_path, shape):
    assert shape.num_kv_heads != shape.num_heads
    path = tmp_path / "a.json"
    artifact(shape).save(path)
    assert load_artifact(path, shape).selected == {0: [1]}
    artifact(shape, level="kv").save(path)  # a flipped level: the matrix still has query-head columns
    with pytest.raises(HeadSetError, match=r"score matrix at level 'kv'.*edited or damaged"):
        load_artifact(path, shape)
    artifact(shape, scores=[[0.0] * shape.num_heads]).save(path)  # one layer instead of all
    with pytest.raises(HeadSetError, match="edited or damaged"):
        load_artifact(path, shape)
    ragged = artifact(shape).model_dump()
    ragged["scores"][1] = [0.0]
    path.write_text(json.dumps(ragged))
    with pytest.raises(HeadSetError, match="damaged: its score matrix is empty or its rows differ in length"):
        load_artifact(path, shape)
    outside = artifact(shape, selection=Selection(rule="test", heads={0: [shape.num_heads]}))
    outside.save(path)
    with pytest.raises(HeadSetError, match="outside its"):
        load_artifact(path, shape)


def test_two_act_entries_on_one_layer_are_refused_with_the_fix():
    model = tiny_model("llama-gqa")
    recipe = load_recipe("methods: [{method: act, heads: {1: [0]}}, {method: act, heads: {1: [1], 2: [0]}}]\n")
    with pytest.raises(attnkit.engine.plan.ApplyError, match=r"methods\[0\] and methods\[1\] are both `act`.*layer 1"):
        attnkit.apply(model, recipe)
    assert model.config._attn_implementation == "sdpa"  # nothing left half-applied
    with attnkit.apply(model, "methods: [{method: act, heads: {1: [0]}}, {method: act, heads: {2: [0]}}]\n"):
        pass  # other layers: fine


# ----------------------------------------------------------------------------- plain messages, exit code 2


@pytest.mark.parametrize("name", ["[/bold]", "data/[v2]"])
def test_user_strings_are_printed_verbatim(workdir, name):  # noqa: F811
    missing = f"{name}/p.jsonl"
    result = invoke(
        "validate", recipe_file(workdir, f"task: {{kind: choice, data: '{missing}'}}\n"), "--no-check-model"
    )
    assert result.exit_code == 2 and f"'{missing}' not found" in result.output


def test_attnkits_own_bracketed_hints_show(workdir, model_dir):  # noqa: F811
    text = f"model: {{name_or_path: {model_dir}}}\nmethods: [{{method: head_mask, heads: [3]}}]\n"
    result = invoke("validate", recipe_file(workdir, text + "task: {kind: generate, prompts: [Hi]}\n"))
    assert result.exit_code == 2 and "list entries must be [layer, head] pairs, got 3" in result.output


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(workdir, monkeypatch):  # noqa: F811
    import attnkit.tasks.runner

    def bug(*_args, **_kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(attnkit.tasks.runner, "run_recipe", bug)
    path = recipe_file(workdir, "task: {kind: generate, prompts: [Hi]}\n")
    result = invoke("run", path)
    assert result.exit_code == 1 and "this is a bug: rerun with `attnkit --debug" in result.output
    assert "Traceback" not in result.output
    result = invoke("--debug", "run", path)
    assert isinstance(result.exception, ZeroDivisionError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('task: {kind: generate, prompts: [""]}', "prompts[0] is empty"),
        ("task: {kind: generate, prompts: []}", "`prompts` is an empty list"),
        ("task: {kind: generate, prompts: [Hi], limit: 0}", "task.limit: Input should be greater than or equal to 1"),
    ],
)
def test_empty_inputs_are_refused_instead_of_giving_n_0(workdir, text, message):  # noqa: F811
    result = invoke("validate", recipe_file(workdir, text + "\n"), "--no-check-model")
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0: Input should be greater than or equal to 1"),
        (["--coarse-every", "0"], "--coarse-every 0: Input should be greater than or equal to 1"),
        (["--limit", "0"], "--limit 0: Input should be greater than or equal to 1"),
    ],
)
def test_act_heads_zero_settings_are_messages(workdir, option, message):  # noqa: F811
    result = invoke("profile", "act-heads", "--data", "d.jsonl", *option)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_generate_prompt_longer_than_the_models_positions_is_refused(workdir, model_dir):  # noqa: F811
    text = (
        f"model: {{name_or_path: {model_dir}}}\ntask: {{kind: generate, prompts: ['{'x' * 300}'], max_new_tokens: 2}}\n"
    )
    result = invoke("run", recipe_file(workdir, text), "--no-progress")
    assert result.exit_code == 2 and "exceeds the model's 256 positions" in result.output
    assert not (workdir / "runs").exists()
