"""Sink-dims profiler (``attnkit.probes.sink_dims``, ``attnkit profile sink-dims``) on a tiny random
Qwen2 with a planted sink mechanism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attnkit
import attnkit.models
from attnkit.cli import app
from attnkit.heads import config_fingerprint
from attnkit.methods import HeadMask
from attnkit.probes import sink_dims
from attnkit.probes.configs import SinkDimsConfig
from attnkit.probes.sink_dims import (
    BUILTIN_TEXTS,
    SinkDimsArtifact,
    SinkDimsError,
    Texts,
    load_sink_dims,
    read_texts,
)
from attnkit.sinks import massive_activation
from tests.factory import BOS_ID, HEAD_DIM, tiny_model

PLANTED = 41
LAYERS = 6
SAMPLES = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_model(dim: int, tokens: tuple[int, ...] = (BOS_ID,), seed: int = 0, attn: str = "sdpa"):
    """A tiny Qwen2 whose ``tokens`` carry a massive activation on ``dim``, wired the way real models
    make sinks: the massive dim feeds a key component that every query's (bias) component matches.

    The embedding of each planted token gets 100 on ``dim`` (others are ~0.1). In every layer, each
    query head gets a constant bias on the slowest rotary pair (its rotation over a few hundred
    positions is negligible), and the key projection reads ``dim`` into that pair. So a token is
    a sink in every head of every layer exactly while its hidden state carries the massive value.
    """
    model = tiny_model("qwen2-gqa", num_hidden_layers=LAYERS, seed=seed, attn_implementation=attn)
    slow = HEAD_DIM // 2 - 1
    with torch.no_grad():
        for token in tokens:
            model.model.embed_tokens.weight[token, dim] = 100.0
        for layer in model.model.layers:
            attn_ = layer.self_attn
            sign = torch.sign(layer.input_layernorm.weight[dim])
            for head in range(model.config.num_attention_heads):
                attn_.q_proj.bias[head * HEAD_DIM + slow] = 3.0
            for head in range(model.config.num_key_value_heads):
                attn_.k_proj.weight[head * HEAD_DIM + slow, dim] = 3.0 * sign
    return model


@pytest.fixture(scope="module")
def model():
    return planted_model(PLANTED)


@pytest.fixture(scope="module")
def result(model, tokenizer):
    return sink_dims.profile(
        model, tokenizer, SinkDimsConfig(samples=SAMPLES, tau=5.0), model_id="planted", progress=False
    )


# ----------------------------------------------------------------------------- finding the dims


def test_planted_dim_is_found(result, model):
    a = result.artifact
    assert a.dims == [PLANTED] and a.ranked[0].dim == PLANTED
    top = a.ranked[0]
    assert top.score == 1.0 and top.layer_fraction == 1.0 and top.consistent
    assert top.sink_mean > 7.0 and top.ordinary_mean < 1.0  # sqrt(64) = 8 is the ceiling
    assert all(not r.consistent for r in a.ranked[1:])
    assert a.layers == list(range(2, LAYERS)) and a.hidden_size == model.config.hidden_size
    # the BOS is a sink in every layer of every sample, and nothing else is
    assert a.sink_instances == a.first_token_instances == SAMPLES * (LAYERS - 2)
    assert a.validation.precision == a.validation.recall == 1.0 and a.tau_ok
    assert a.recommended_tau == 5.0
    assert a.samples == SAMPLES and a.model_id == "planted" and "BUILTIN_TEXTS" in a.data
    assert result.hit_rate.shape == result.sink_mean.shape == (LAYERS - 2, model.config.hidden_size)
    assert np.asarray(a.sink_mean).shape == (LAYERS - 2, len(a.ranked))
    assert (
        "note: only 1 dim(s) consistent" in result.summary()
        and "no attention sinks and no detections" in result.summary()
    )


@pytest.mark.parametrize("dim", [5, 60])
def test_other_planted_dims_and_later_sinks(dim, tokenizer):
    """Plant on BOS and '.': later sinks appear, are counted per token, and are detected too."""
    dot = tokenizer.convert_tokens_to_ids(".")
    result = sink_dims.profile(
        planted_model(dim, (BOS_ID, dot), seed=1), tokenizer, SinkDimsConfig(samples=8, tau=5.0), progress=False
    )
    a = result.artifact
    assert a.dims == [dim]
    assert a.sink_tokens and a.sink_tokens[0][0] == "."
    assert a.validation_later.true_positives > 0
    assert a.validation_later.precision == a.validation_later.recall == 1.0


def test_validation_matches_massive_activation(model, tokenizer, result):
    """The reported counts are those of attnkit.sinks.massive_activation on the hidden states."""
    tp = fp = 0
    for text in BUILTIN_TEXTS[:SAMPLES]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        count = ids.shape[1]
        for layer in range(2, LAYERS):
            phi = massive_activation(hidden[layer], [PLANTED])[0]
            eligible = torch.arange(count) <= count - 5  # seen by >= min_queries = 5 queries
            tp += int((phi[eligible][:1] > 5.0).sum())
            fp += int((phi[eligible][1:] > 5.0).sum())
    assert (result.artifact.validation.true_positives, result.artifact.validation.false_positives) == (tp, fp)


def test_tau_too_high_for_the_model_gives_the_best_tau(model, tokenizer):
    a = sink_dims.profile(model, tokenizer, SinkDimsConfig(samples=4), progress=False).artifact  # tau 20 > sqrt(64)
    assert a.tau == 20.0 and a.validation.recall == 0.0 and not a.tau_ok
    assert 0.0 < a.best.tau < 8.0 and a.best.f1 == 1.0 and a.recommended_tau == a.best.tau
    assert any("sqrt(hidden_size) = 8.00" in note for note in a.notes)
    sweep = np.asarray(a.tau_sweep)
    assert sweep[:, 0].max() <= 8.0 and sweep[:, 3].max() == a.best.f1


def test_attention_implementation_is_restored(tokenizer):
    model = planted_model(PLANTED, attn="sdpa")
    sink_dims.profile(
        model, tokenizer, SinkDimsConfig(), Texts(("Hello there, general.",), builtin=False), progress=False
    )
    assert model.config._attn_implementation == "sdpa"
    with attnkit.apply(model, [HeadMask(heads={0: [1]})]):
        with pytest.raises(RuntimeError, match=r"remove it \(handle.remove\(\)\)"):
            sink_dims.profile(model, tokenizer, SinkDimsConfig(), Texts(("Hello",), builtin=False), progress=False)


def test_bad_inputs(model, tokenizer, tmp_path):
    with pytest.raises(SinkDimsError, match="no texts"):
        sink_dims.profile(model, tokenizer, SinkDimsConfig(), Texts(("", "  "), builtin=False), progress=False)
    with pytest.raises(SinkDimsError, match="not found"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(SinkDimsError, match="no non-blank lines"):
        read_texts(tmp_path / "blank.txt")


# ----------------------------------------------------------------------------- the artifact


def test_artifact_round_trip_and_foreign_refusal(result, model, tmp_path):
    path = result.save(tmp_path / "sub" / "dims.json")
    back = load_sink_dims(path, model.config)
    assert back == result.artifact
    assert load_sink_dims(path, model) == back  # a model works as well as its config
    data = json.loads(path.read_text())
    assert data["method"] == "sink-dims" and data["attnkit_version"] == attnkit.__version__
    assert data["config_fingerprint"] == config_fingerprint(model.config) and data["seed"] is None
    assert data["parameters"]["tau"] == 5.0 and data["parameters"]["top"] == 4

    other = tiny_model("llama-mha").config
    with pytest.raises(SinkDimsError, match=r"was made for 'planted' .* pass allow_foreign=True"):
        load_sink_dims(path, other)
    with pytest.warns(UserWarning, match="was made for 'planted'"):
        assert load_sink_dims(path, other, allow_foreign=True).dims == [PLANTED]


def test_load_errors(tmp_path, model):
    with pytest.raises(SinkDimsError, match="run `attnkit profile sink-dims`"):
        load_sink_dims(tmp_path / "none.json", model.config)
    (tmp_path / "heads.json").write_text('{"scores": []}')
    with pytest.raises(SinkDimsError, match="is not a sink-dims artifact"):
        load_sink_dims(tmp_path / "heads.json", model.config)


def test_dims_beyond_the_hidden_size_are_refused(result, model, tmp_path):
    data = result.artifact.model_dump()
    data["dims"] = [500]
    path = SinkDimsArtifact(**data).save(tmp_path / "bad.json")
    with pytest.raises(SinkDimsError, match=r"dims \[500\] do not exist"):
        load_sink_dims(path, model.config)


def test_plot(result, tmp_path):
    figure = result.plot(tmp_path / "dims.png")
    png = (tmp_path / "dims.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert len(figure.axes) >= 3


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_profile_sink_dims(fake_load, tmp_path):
    out = tmp_path / "dims.json"
    args = [
        "profile",
        "sink-dims",
        "--model",
        "tiny",
        "--samples",
        "6",
        "--tau",
        "5",
        "--output",
        str(out),
        "--no-progress",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert fake_load == [("tiny", {"dtype": "float32", "attn_implementation": "eager"})]
    artifact = json.loads(out.read_text())
    assert artifact["dims"] == [PLANTED] and artifact["samples"] == 6 and artifact["model_id"] == "tiny"
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "Sink dims of tiny" in result.output and f"Chosen dims [{PLANTED}], tau 5" in result.output
    assert f"artifact: {out}" in result.output and f"plot: {out.with_suffix('.png')}" in result.output

    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat.\n\nA dog barked at the moon all night long.\n")
    result = runner.invoke(
        app, ["profile", "sink-dims", "--texts", str(texts), "-o", str(out), "--no-plot", "--top", "2"]
    )
    assert result.exit_code == 0, result.output
    artifact = json.loads(out.read_text())
    assert artifact["samples"] == 2 and artifact["data"] == f"{texts}: first 2 of 2 non-blank lines"
    assert artifact["parameters"]["top"] == 2 and "plot:" not in result.output


def test_cli_default_output_name(fake_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["profile", "sink-dims", "-m", "some/org/model-x", "--samples", "2", "--no-plot"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "heads" / "sink-dims-model-x.json").is_file()


def test_cli_errors(fake_load, tmp_path):
    result = runner.invoke(app, ["profile", "sink-dims", "--texts", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "not found" in result.output and fake_load == []
    result = runner.invoke(app, ["profile", "sink-dims", "--help"])
    assert result.exit_code == 0 and "--tau" in result.output and "--texts" in result.output
