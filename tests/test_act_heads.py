"""The act-heads profiler: exact scores from layer tails, the selection rule, resuming."""

import json

import pytest
import torch

import attnkit
from attnkit.heads import ModelShape, resolve_heads
from attnkit.methods import ACT
from attnkit.probes import act_heads
from attnkit.probes.act_heads import last_logits, make_batches, tail_supported
from attnkit.probes.configs import ActHeadsConfig
from tests.factory import tiny_model
from tests.test_tasks import char_tokenizer


@pytest.fixture
def setup(tmp_path):
    model = tiny_model("llama-gqa", num_hidden_layers=5)
    tokenizer = char_tokenizer()
    items = [{"prompt": f"Text {i}: {'ab' * (i % 5)} so", "choices": [" x", " y"], "answer": i % 2} for i in range(12)]
    data = tmp_path / "dev.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    return model, tokenizer, str(data)


def test_layer_tail_equals_the_whole_model(setup):
    model, tokenizer, data = setup
    assert tail_supported(model)
    batch = make_batches(tokenizer, data, 12, 5)[1]
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
        )
        batch.hidden = {layer: out.hidden_states[layer] for layer in range(5)}
        with attnkit.apply(model, [ACT(heads={2: [1, 3]}, threshold=0.05)]) as handle:
            whole = last_logits(model, batch, None, None)
            tail = last_logits(model, batch, 2, handle)
            assert handle.stats()["act"]["sinks_found"] > 0
    torch.testing.assert_close(tail, whole, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole, out.logits[:, -1], atol=1e-4), "calibration must change the logits"


def test_profile_selects_heads_that_beat_the_baseline_and_resumes(setup, tmp_path, monkeypatch):
    model, tokenizer, data = setup
    out = tmp_path / "heads.json"
    artifact = act_heads.profile(
        model,
        tokenizer,
        ActHeadsConfig(data=data, limit=12, threshold=0.05, fine_layers=2, batch_size=5),
        model_id="tiny",
        output=out,
        progress=False,
    )
    params = artifact.parameters
    assert sorted(params["layer_accuracy"]) == ["2", "3"]  # layers 2 to L-2 of 5
    assert artifact.samples == 12 and "beats the uncalibrated" in artifact.selection.rule
    for layer, heads in artifact.selected.items():
        for head in heads:
            assert artifact.scores[layer][head] > 0
    for layer in map(int, params["evaluated_heads"]):
        for head in range(4):
            if head not in artifact.selected.get(layer, []):
                assert artifact.scores[layer][head] <= 0
    # a second run reads every score from the progress file and evaluates nothing
    monkeypatch.setattr(act_heads.attnkit, "apply", lambda *a, **k: pytest.fail("re-evaluated a finished candidate"))
    again = act_heads.profile(
        model,
        tokenizer,
        ActHeadsConfig(data=data, limit=12, threshold=0.05, fine_layers=2, batch_size=5),
        model_id="tiny",
        output=out,
        progress=False,
    )
    assert again.scores == artifact.scores and again.selected == artifact.selected
    # the artifact is usable as a head set for this model
    shape = ModelShape.from_config(model.config, "tiny")
    if artifact.selected:
        assert len(resolve_heads(str(out), shape)) == sum(map(len, artifact.selected.values()))


def test_single_head_scores_equal_a_direct_evaluation(setup, tmp_path):
    model, tokenizer, data = setup
    artifact = act_heads.profile(
        model,
        tokenizer,
        ActHeadsConfig(data=data, limit=12, threshold=0.05, search="full", batch_size=4),
        model_id="tiny",
        output=tmp_path / "h.json",
        progress=False,
    )
    from attnkit.recipe.tasks import ChoiceTask
    from attnkit.tasks import run_choice

    baseline = run_choice(model, tokenizer, ChoiceTask(data=data, scoring="label_word"), progress=False)
    assert artifact.parameters["baseline_accuracy"] == pytest.approx(baseline.metrics["accuracy"])
    with attnkit.apply(model, [ACT(heads={3: [2]}, threshold=0.05)]):
        direct = run_choice(model, tokenizer, ChoiceTask(data=data, scoring="label_word"), progress=False)
    assert artifact.scores[3][2] == pytest.approx(direct.metrics["accuracy"] - baseline.metrics["accuracy"])


def test_cli_writes_artifact_and_plot(setup, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import attnkit.models
    from attnkit.cli import app

    model, tokenizer, data = setup
    monkeypatch.setattr(attnkit.models, "load_model", lambda name: (model, tokenizer))
    out = tmp_path / "act.json"
    result = CliRunner().invoke(
        app,
        [
            "profile",
            "act-heads",
            "--data",
            data,
            "-o",
            str(out),
            "--limit",
            "12",
            "--threshold",
            "0.05",
            "--batch-size",
            "4",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 0
    assert "baseline accuracy" in result.output and "heads selected" in result.output
    bad = CliRunner().invoke(app, ["profile", "act-heads", "--data", data, "--search", "random"])
    assert bad.exit_code == 2 and "coarse-to-fine or full" in bad.output
