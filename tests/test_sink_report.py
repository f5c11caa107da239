"""Sink inspection (``attnkit.sink_report``, ``attnkit.plots``, ``attnkit inspect sinks``) on a tiny
random Llama with the offline character tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attnkit
import attnkit.models
from attnkit.cli import app
from attnkit.methods import HeadMask
from attnkit.plots import head_map
from attnkit.sink_report import SinkReport, sink_heatmap, sink_stats
from tests.factory import ARCHS, SUPPORTED_ATTN, tiny_model

TEXT = "The cat sat on the mat."


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def report(model, tokenizer):
    return sink_stats(model, tokenizer, TEXT)


def reference_column_mean(model, tokenizer, text: str) -> np.ndarray:
    """``s_j = sum_{i >= j} A_ij / (T - j)`` by loops in float64, from eager ``output_attentions``."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    maps = torch.stack([a[0] for a in attentions]).double()  # [layers, heads, T, T]
    t = maps.shape[-1]
    out = torch.zeros(maps.shape[:3], dtype=torch.float64)
    for j in range(t):
        out[..., j] = sum(maps[..., i, j] for i in range(j, t)) / (t - j)
    return out.numpy()


def test_column_mean_matches_float64_reference(model, tokenizer, report):
    expected = reference_column_mean(model, tokenizer, TEXT)
    config = model.config
    assert report.column_mean.shape == (config.num_hidden_layers, config.num_attention_heads, len(TEXT) + 1)
    assert report.column_mean.dtype == np.float32
    np.testing.assert_allclose(report.column_mean, expected, atol=1e-6)
    assert report.tokens == ["<s>", *TEXT] and report.token_ids == tokenizer(TEXT)["input_ids"]


def test_attention_implementation_is_restored(model, tokenizer, report):
    assert model.config._attn_implementation == "sdpa" and report.meta["attn_implementation"] == "sdpa"
    eager = tiny_model("llama-mha", attn_implementation="eager")
    sink_stats(eager, tokenizer, "Hi")
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture(arch, tokenizer):
    """Query heads (not KV heads) on every arch; column means of the first key are in [0, 1]."""
    before = "sdpa" if "sdpa" in SUPPORTED_ATTN[arch] else "eager"
    model = tiny_model(arch, attn_implementation=before)
    report = sink_stats(model, tokenizer, "Hi there")
    config = model.config
    assert report.column_mean.shape == (config.num_hidden_layers, config.num_attention_heads, 9)
    assert np.all((report.column_mean[..., 0] >= 0) & (report.column_mean[..., 0] <= 1 + 1e-6))
    assert model.config._attn_implementation == before


def test_implementation_restored_when_the_forward_fails(model):
    class Broken:
        def __call__(self, text, return_tensors=None):
            return {"input_ids": torch.tensor([[1, 10**6]])}  # out of the vocabulary

    with pytest.raises(IndexError):
        sink_stats(model, Broken(), "x")
    assert model.config._attn_implementation == "sdpa"


def test_refuses_a_model_with_an_attnkit_handle(model, tokenizer):
    with attnkit.apply(model, [HeadMask(heads={0: [1]})]):
        with pytest.raises(RuntimeError, match=r"remove it \(handle.remove\(\)\)"):
            sink_stats(model, tokenizer, TEXT)
    assert model.config._attn_implementation == "sdpa"


def test_sink_counts_and_tokens(report):
    layers, heads, _ = report.column_mean.shape
    above = report.column_mean > report.threshold
    assert report.sink_counts.shape == (layers, heads)
    np.testing.assert_array_equal(report.sink_counts, above.sum(-1))
    np.testing.assert_array_equal(report.initial_sink, above[..., 0])
    np.testing.assert_array_equal(report.later_sink_counts, above[..., 1:].sum(-1))
    np.testing.assert_array_equal(report.later_max, report.column_mean[..., 1:].max(-1))
    positions = [s.position for s in report.sinks]
    assert positions == [j for j in range(len(report.tokens)) if above[..., j].any()]
    for s in report.sinks:
        assert s.token == report.tokens[s.position]
        assert s.heads == above[..., s.position].sum()
        assert s.max_score == pytest.approx(report.column_mean[..., s.position].max())
    assert report.sinks and report.sinks[0].position == 0  # the BOS token of this tiny model is a sink
    table = report.table()
    assert repr(report) == table
    assert f"= {layers * heads} heads" in table and "'<s>'" in table
    assert f"{report.sinks[0].heads}/{layers * heads}" in table


def test_threshold_changes_the_sinks(model, tokenizer, report):
    strict = sink_stats(model, tokenizer, TEXT, threshold=0.99)
    np.testing.assert_array_equal(strict.column_mean, report.column_mean)
    assert strict.sink_counts.sum() < report.sink_counts.sum()
    assert "(no token exceeds the threshold in any head)" in sink_stats(model, tokenizer, TEXT, threshold=1.0).table()


def test_json_round_trip(report, tmp_path):
    path = tmp_path / "sinks.json"
    text = report.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert data["sinks"][0] == vars(report.sinks[0]) and data["sink_counts"] == report.sink_counts.tolist()
    for back in (SinkReport.from_json(path), SinkReport.from_json(text)):
        np.testing.assert_array_equal(back.column_mean, report.column_mean)  # bit for bit
        assert back.tokens == report.tokens and back.token_ids == report.token_ids
        assert back.threshold == report.threshold and back.model == report.model and back.meta == report.meta
        assert back.sinks == report.sinks


def test_png_written(report, tmp_path):
    sink_heatmap(report, tmp_path / "sinks.png")
    png = (tmp_path / "sinks.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    figure = head_map(
        report.later_max, tmp_path / "sub" / "heads.png", "later sinks", annotate=report.later_sink_counts
    )
    assert (tmp_path / "sub" / "heads.png").stat().st_size > 1_000
    assert figure.axes[0].get_title() == "later sinks"


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_inspect_sinks(fake_load, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["inspect", "sinks", "--model", "tiny", "--text", TEXT, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert fake_load == [("tiny", {"attn_implementation": "eager"})]
    assert (out / "sinks.png").stat().st_size > 10_000
    data = json.loads((out / "sinks.json").read_text())
    assert data["model"] == "tiny" and data["tokens"] == ["<s>", *TEXT] and data["threshold"] == 0.1
    assert "Sinks of tiny" in result.output and "'<s>'" in result.output
    assert f"plot: {out / 'sinks.png'}" in result.output

    text_file = tmp_path / "t.txt"
    text_file.write_text("Hello there.")
    result = runner.invoke(app, ["inspect", "sinks", "--file", str(text_file), "--threshold", "0.3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sinks.json").read_text())
    assert data["threshold"] == 0.3 and "".join(data["tokens"][1:]) == "Hello there."


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], 'pass either --text "..." or --file PATH'),
        (["--text", "a", "--file", "a.txt"], 'pass only one of --text "..." or --file PATH'),
        (["--file", "missing.txt"], "--file missing.txt: not found"),
        (["--text", "  "], "the text is empty"),
    ],
)
def test_cli_inspect_sinks_errors(fake_load, args, message):
    result = runner.invoke(app, ["inspect", "sinks", *args])
    assert result.exit_code == 2 and message in result.output
    assert fake_load == []


def test_cli_inspect_help():
    result = runner.invoke(app, ["inspect", "sinks", "--help"])
    assert result.exit_code == 0 and "--threshold" in result.output
