"""Head profilers for KV compression: razor-heads (echo / induction), retrieval-heads (copy-paste),
and ``attnkit inspect heads``; scores checked against plain float64 loops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.heads import HeadArtifact, ModelShape, resolve_heads
from attnkit.probes import razor_heads
from attnkit.probes.configs import RazorHeadsConfig, RetrievalHeadsConfig, make_config
from attnkit.probes.razor_heads import (
    RazorProfileError,
    echo_induction,
    kv_max,
    razor_input,
    top_count,
    top_union,
)
from tests.factory import tiny_model

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")  # sdpa; the profilers switch to eager and back


# ----------------------------------------------------------------------------- razor: scores


def loop_echo_induction(probs: np.ndarray, block: int, repeats: int, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's definition, position by position, in float64."""
    heads = probs.shape[0]
    echo, induction = np.zeros(heads), np.zeros(heads)
    positions = 0
    for copy in range(1, repeats):
        for offset in range(block):
            i = prefix + copy * block + offset
            positions += 1
            for k in range(1, copy + 1):
                echo += probs[:, i, i - k * block]
                induction += probs[:, i, i - k * block + 1]
    return echo / positions, induction / positions


def causal_rows(rng: np.random.Generator, heads: int, length: int) -> np.ndarray:
    logits = rng.normal(size=(heads, length, length)) * 3
    logits[:, np.triu_indices(length, 1)[0], np.triu_indices(length, 1)[1]] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


@pytest.mark.parametrize("prefix", [0, 1])
def test_echo_and_induction_on_built_attention(prefix):
    block, repeats = 5, 3
    length = prefix + block * repeats
    probs = causal_rows(np.random.default_rng(0), 4, length)
    for i in range(prefix + block, length):
        probs[0, i] = 0.0
        probs[0, i, i - block] = 1.0  # echo head: looks at the same token one copy back
        probs[1, i] = 0.0
        probs[1, i, i - block + 1] = 1.0  # induction head: at the token that followed it
    echo, induction = echo_induction(torch.tensor(probs, dtype=torch.float32), block, repeats, prefix)
    assert echo.dtype == torch.float64 and echo.shape == (4,)
    assert echo[0] == pytest.approx(1.0) and induction[0] == pytest.approx(0.0)
    assert induction[1] == pytest.approx(1.0) and echo[1] == pytest.approx(0.0)
    ref_echo, ref_induction = loop_echo_induction(probs, block, repeats, prefix)
    np.testing.assert_allclose(echo.numpy(), ref_echo, atol=1e-6)
    np.testing.assert_allclose(induction.numpy(), ref_induction, atol=1e-6)
    assert 0 < ref_echo[2] < 0.9 and 0 < ref_induction[3] < 0.9  # the random heads are neither


def test_echo_induction_rejects_a_wrong_length():
    with pytest.raises(ValueError, match="expected 1 \\+ 5 x 3"):
        echo_induction(torch.zeros(2, 15, 15), 5, 3, 1)


def test_kv_max_and_top_union():
    scores = np.array([[0.1, 0.5, 0.2, 0.0], [0.3, 0.3, 0.9, 0.1]])
    np.testing.assert_array_equal(kv_max(scores, 2), [[0.5, 0.2], [0.3, 0.9]])
    assert top_count(0.14, 90) == 13 and top_count(0.01, 90) == 1 and top_count(0.0, 90) == 0
    assert top_count(0.14, 6) == 1 and top_count(1.0, 6) == 6
    induction = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.0]])
    echo = np.array([[0.0, 0.0, 0.1], [0.0, 0.0, 0.05]])
    selected, facts = top_union(induction, echo, 0.34, 0.17)  # 2 by induction, 1 by echo
    assert selected == {0: [0, 2], 1: [0]}
    assert facts == {"n_induction": 2, "induction_cutoff": 0.8, "n_echo": 1, "echo_cutoff": 0.1, "n_selected": 3}
    selected, facts = top_union(induction, echo, 0.34, 0.0)
    assert selected == {0: [0], 1: [0]} and facts["n_echo"] == 0


def test_razor_input_layout(tokenizer, model):
    data = razor_input(tokenizer, model.config, block=20, repeats=3, seed=5)
    ids = data.input_ids[0].tolist()
    assert len(ids) == 61 and ids[0] == tokenizer.bos_token_id and data.prefix == 1 and data.shrunk is None
    chunk = ids[1:21]
    assert ids[1:] == chunk * 3 and len(set(chunk)) == 20
    assert not set(chunk) & set(tokenizer.all_special_ids)
    assert max(chunk) < model.config.vocab_size
    assert razor_input(tokenizer, model.config, block=20, repeats=3, seed=5).input_ids.equal(data.input_ids)
    assert not razor_input(tokenizer, model.config, block=20, repeats=3, seed=6).input_ids.equal(data.input_ids)


def test_razor_input_shrinks_to_the_model_positions(tokenizer, model):
    data = razor_input(tokenizer, model.config, block=2500, repeats=4, seed=0)  # 10,001 > 256 positions
    assert data.block == 63 and data.block_requested == 2500 and data.input_ids.shape == (1, 253)
    assert (
        data.shrunk == "1 + 2500 x 4 = 10001 tokens exceed the model's max_position_embeddings 256; block shrunk to 63"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block": 20, "repeats": 1}, "repeats=1: echo and induction need at least 2 copies"),
        ({"block": 1, "repeats": 3}, "block=1: use a block of at least 2 tokens"),
        ({"block": 126, "repeats": 2}, "block=126 exceeds the 125 non-special token ids"),
        ({"block": 20, "repeats": 300}, "positions leave no room for 300 repeats"),
    ],
)
def test_razor_input_errors(tokenizer, model, kwargs, message):
    with pytest.raises(RazorProfileError, match=message):
        razor_input(tokenizer, model.config, seed=0, **kwargs)


def test_razor_profile_matches_a_float64_loop_on_a_tiny_model(model, tokenizer, tmp_path):
    block, repeats = 16, 3
    artifact = razor_heads.profile(
        model,
        tokenizer,
        RazorHeadsConfig(block=block, repeats=repeats, induction_ratio=0.34, echo_ratio=0.17),
        model_id="tiny",
        output=tmp_path / "r.json",
        progress=False,
    )
    assert model.config._attn_implementation == "sdpa", "eager only while profiling"
    ids = razor_input(tokenizer, model.config, block=block, repeats=repeats, seed=0).input_ids
    reference = tiny_model("llama-gqa", attn_implementation="eager", dtype=torch.float64)
    with torch.no_grad():
        maps = reference(ids, output_attentions=True).attentions
    echo = np.stack([loop_echo_induction(a[0].numpy(), block, repeats, 1)[0] for a in maps])
    induction = np.stack([loop_echo_induction(a[0].numpy(), block, repeats, 1)[1] for a in maps])
    params = artifact.parameters
    np.testing.assert_allclose(params["echo_query"], echo, atol=2e-6)
    np.testing.assert_allclose(params["induction_query"], induction, atol=2e-6)
    np.testing.assert_allclose(params["induction_kv"], kv_max(induction, 2), atol=2e-6)
    np.testing.assert_allclose(params["echo_kv"], kv_max(echo, 2), atol=2e-6)
    # the artifact: KV level, L x H_kv scores, the union of the two cuts, >= 1 exactly there
    assert artifact.level == "kv" and artifact.method == "razor" and artifact.samples == 1
    scores = np.array(artifact.scores)
    assert scores.shape == (3, 2)
    expected, _ = top_union(kv_max(induction, 2), kv_max(echo, 2), 0.34, 0.17)
    assert artifact.selected == expected
    chosen = {(layer, head) for layer, heads in expected.items() for head in heads}
    for (layer, head), value in np.ndenumerate(scores):
        assert (value >= 1 - 1e-6) == ((layer, head) in chosen)
    assert params["tokens"] == 1 + block * repeats and params["block_shrunk"] is None
    on_disk = HeadArtifact.model_validate_json((tmp_path / "r.json").read_text())
    assert on_disk.selected == artifact.selected and on_disk.level == "kv"
    shape = ModelShape.from_config(model.config, "tiny")
    heads = resolve_heads(str(tmp_path / "r.json"), shape, level="kv")
    assert heads.level == "kv" and len(heads) == len(chosen)


def test_razor_profile_rejects_bad_ratios(model, tokenizer):
    with pytest.raises(RazorProfileError, match="induction_ratio=1.5: use a fraction"):
        razor_heads.profile(
            model, tokenizer, RazorHeadsConfig(block=8, repeats=2, induction_ratio=1.5), model_id="tiny", progress=False
        )


def test_cli_profile_razor_heads_and_inspect(fake_load, tmp_path):
    out = tmp_path / "razor.json"
    result = runner.invoke(
        app,
        ["profile", "razor-heads", "-m", "tiny", "-o", str(out), "--block", "100", "--repeats", "4", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert fake_load == [("tiny", {"dtype": "float32", "attn_implementation": "eager"})]
    assert (
        "note: 1 + 100 x 4 = 401 tokens exceed the model's max_position_embeddings 256; block shrunk to 63"
        in result.output
    )
    assert "selected: 2 of 6 KV heads" in result.output and "method: razor" in result.output
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(out.read_text())["parameters"]["block"] == 63

    shown = runner.invoke(app, ["inspect", "heads", str(out), "-o", str(tmp_path / "map.png"), "--top", "3"])
    assert shown.exit_code == 0, shown.output
    assert "selected: 2 of 6 KV heads in" in shown.output and "top 3 by score: L" in shown.output
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_cli_razor_heads_bad_ratio(fake_load, tmp_path):
    result = runner.invoke(
        app,
        [
            "profile",
            "razor-heads",
            "-m",
            "tiny",
            "-o",
            str(tmp_path / "r.json"),
            "--echo-ratio",
            "-0.5",
            "--block",
            "8",
            "--no-progress",
        ],
    )
    assert result.exit_code == 2 and "echo_ratio=-0.5: use a fraction of all KV heads in [0, 1]" in result.output


def test_cli_inspect_heads_errors(tmp_path):
    result = runner.invoke(app, ["inspect", "heads", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "nope.json' not found; run `attnkit profile`" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"scores": []}')
    result = runner.invoke(app, ["inspect", "heads", str(bad)])
    assert result.exit_code == 2 and "is not a head-list artifact" in result.output


# ----------------------------------------------------------------------------- retrieval heads

from dataclasses import replace  # noqa: E402

from attnkit.probes import retrieval_heads  # noqa: E402
from attnkit.probes.retrieval_heads import (  # noqa: E402
    Needle,
    NeedleData,
    RetrievalProfileError,
    Sample,
    aggregate,
    copy_paste_step,
    read_needles,
    sample_scores,
)
from attnkit.tasks.needle import PromptBuilder  # noqa: E402

HAY = " ".join(f"Sentence {i} is about the {w} river." for i, w in enumerate(["wide", "slow", "cold", "old"] * 8))
NEEDLES = [Needle("The key is red.", "What is the key?", "red")]


def test_copy_paste_step_by_hand():
    prompt = torch.tensor([5, 7, 9, 7, 3, 8])
    span = (1, 4)  # tokens 7 9 7
    argmax = torch.tensor([[1, 2, 3], [4, 0, 9]])  # [layers, heads]; 9 is a generated token's position
    step = copy_paste_step(argmax, prompt, span, 7)
    assert step.dtype == torch.float64
    np.testing.assert_allclose(step.numpy(), [[1 / 3, 0, 1 / 3], [0, 0, 0]])
    # over three steps: 7 (above), then 9, then 3 (outside the span: never credited)
    total = step + copy_paste_step(argmax, prompt, span, 9) + copy_paste_step(argmax, prompt, span, 3)
    np.testing.assert_allclose(total.numpy(), [[1 / 3, 1 / 3, 1 / 3], [0, 0, 0]])


def test_aggregate_keeps_samples_above_the_recall():
    def sample(value, rec):
        return Sample("k", 10, 0.5, 0, [[value, 0.0]], "", rec, 10, 1)

    samples = [sample(0.9, 1.0), sample(0.6, 0.5), sample(0.0, 0.2)]
    scores, kept = aggregate(samples, 0.5)
    assert kept == samples[:1] and scores.tolist() == [[0.9, 0.0]]  # recall must exceed 0.5, as in the paper
    scores, kept = aggregate(samples, None)
    assert len(kept) == 3 and scores[0, 0] == pytest.approx(0.5)
    scores, kept = aggregate(samples, 1.0)
    assert kept == [] and scores.tolist() == [[0.0, 0.0]]


def test_sample_scores_match_a_float64_full_forward_reference(tokenizer):
    """Prefill + cached eager decode (the profiler) against recomputing the whole sequence each step."""
    model = tiny_model("llama-gqa", dtype=torch.float64)
    shape = ModelShape.from_config(model.config, "tiny")
    prompt = PromptBuilder(tokenizer, HAY, question=NEEDLES[0].question).build(120, 0.5, NEEDLES[0].needle, "red")
    prompt = replace(prompt, answer_span=(1, len(prompt.input_ids)))  # the whole prompt: copying is common
    trace: list = []
    scores, reply, steps = sample_scores(model, tokenizer, prompt, 6, shape, trace)
    assert model.config._attn_implementation == "sdpa"
    eager = tiny_model("llama-gqa", dtype=torch.float64, attn_implementation="eager")
    ids = list(prompt.input_ids)
    expected = np.zeros((3, 4))
    prompt_ids = torch.tensor(prompt.input_ids)
    for argmax, token in trace:
        with torch.no_grad():
            out = eager(torch.tensor([ids]), output_attentions=True)
        ref_argmax = torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions])
        assert torch.equal(argmax, ref_argmax) and token == int(out.logits[0, -1].argmax())
        for layer in range(3):
            for head in range(4):
                pos = int(ref_argmax[layer, head])
                if 1 <= pos < len(prompt_ids) and int(prompt_ids[pos]) == token:
                    expected[layer, head] += 1 / (len(prompt_ids) - 1)
        ids.append(token)
    assert len(trace) >= steps and steps >= 1
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    assert expected.sum() > 0, "the check needs at least one copy"


def test_profile_retrieval_heads_artifact_levels_and_resume(model, tokenizer, tmp_path, monkeypatch):
    settings = dict(lengths=[100, 150], depths=[0.0, 1.0], max_new_tokens=5, chat=False, min_recall=None, threshold=0.0)
    kwargs = dict(model_id="tiny", progress=False)
    data = NeedleData(HAY, tuple(NEEDLES))
    out = tmp_path / "ret.json"
    query = retrieval_heads.profile(model, tokenizer, RetrievalHeadsConfig(**settings), data, output=out, **kwargs)
    assert model.config._attn_implementation == "sdpa"
    params = query.parameters
    assert query.level == "query" and query.method == "retrieval" and np.shape(query.scores) == (3, 4)
    assert params["samples_total"] == 4 == params["samples_kept"] == query.samples
    assert "over all 4 needle prompts" in query.selection.rule
    chosen = {(l, h) for l, hs in query.selected.items() for h in hs}  # noqa: E741
    assert chosen == {(l, h) for (l, h), v in np.ndenumerate(np.array(query.scores)) if v > 0.0}  # noqa: E741
    assert (tmp_path / "ret.progress.jsonl").is_file() and out.is_file()
    # a second run (KV level) reads every sample from the progress file
    monkeypatch.setattr(retrieval_heads, "sample_scores", lambda *a, **k: pytest.fail("re-ran a finished prompt"))
    kv = retrieval_heads.profile(
        model, tokenizer, RetrievalHeadsConfig(**settings, level="kv"), data, output=out, **kwargs
    )
    assert kv.level == "kv" and np.shape(kv.scores) == (3, 2)
    np.testing.assert_allclose(kv.scores, kv_max(np.array(params["query_scores"]), 2), atol=1e-6)
    assert HeadArtifact.model_validate_json(out.read_text()).level == "kv"
    # the paper's rule keeps only answered prompts; a random model answers none
    strict = retrieval_heads.profile(
        model, tokenizer, RetrievalHeadsConfig(**{**settings, "min_recall": 0.5}), data, output=out, **kwargs
    )
    assert strict.parameters["samples_kept"] == 0 and strict.selected == {}
    assert (
        "over the 0 of 4 needle prompts whose reply's ROUGE-1 recall of the answer is above 0.5"
        in strict.selection.rule
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depths": [1.5]}, "depth 1.5 is outside \\[0, 1\\]"),
        ({"lengths": [250]}, "length 250 \\+ max_new_tokens 8 exceeds the model's 256 positions.*up to 248"),
        ({"threshold": 2.0}, "threshold=2.0: a copy-paste score lies in \\[0, 1\\]"),
        ({"level": "layer"}, "level 'layer': use query or kv"),
    ],
)
def test_profile_retrieval_heads_errors(model, tokenizer, kwargs, message):
    with pytest.raises(RetrievalProfileError, match=message):
        retrieval_heads.profile(
            model,
            tokenizer,
            make_config(
                RetrievalHeadsConfig,
                RetrievalProfileError,
                max_new_tokens=8,
                chat=False,
                **{"lengths": [100], **kwargs},
            ),
            NeedleData(HAY, tuple(NEEDLES)),
            model_id="tiny",
            progress=False,
        )


def test_read_needles(tmp_path):
    good = tmp_path / "n.jsonl"
    good.write_text('{"needle": "The code is blue owl.", "question": "What is the code?", "answer": "blue owl"}\n')
    assert read_needles(good) == [Needle("The code is blue owl.", "What is the code?", "blue owl")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"needle": "The code is blue owl.", "question": "What is the code?", "answer": "red"}\n')
    with pytest.raises(RetrievalProfileError, match="bad.jsonl:1: the answer 'red' is not part of the needle"):
        read_needles(bad)
    bad.write_text('{"needle": "x"}\n')
    with pytest.raises(RetrievalProfileError, match='bad.jsonl:1: needs "needle", "question" and "answer"'):
        read_needles(bad)


def test_cli_profile_retrieval_heads(fake_load, tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text(HAY)
    needles = tmp_path / "needles.jsonl"
    needles.write_text(
        json.dumps({"needle": "The key is red.", "question": "What is the key?", "answer": "red"}) + "\n"
    )
    out = tmp_path / "ret.json"
    result = runner.invoke(
        app,
        [
            "profile",
            "retrieval-heads",
            "-m",
            "tiny",
            "-o",
            str(out),
            "--lengths",
            "100,140",
            "--depths",
            "0,1",
            "--haystack",
            str(hay),
            "--needles",
            str(needles),
            "--max-new-tokens",
            "4",
            "--level",
            "kv",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert fake_load == [("tiny", {})]
    assert "4 prompts in" in result.output and "warning: no reply reached recall 0.5" in result.output
    assert "method: retrieval" in result.output and "level: kv" in result.output
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    artifact = json.loads(out.read_text())
    assert artifact["parameters"]["depths"] == [0.0, 1.0] and artifact["level"] == "kv"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depths", "a,b"], "write lengths like 1000,2000 and depths as a count"),
        (["--level", "layer"], "--level 'layer': use query"),
        (["--haystack", "/nonexistent/hay.txt"], "not found; pass a text file"),
    ],
)
def test_cli_retrieval_heads_errors(fake_load, tmp_path, args, message):
    result = runner.invoke(app, ["profile", "retrieval-heads", "-m", "tiny", "-o", str(tmp_path / "r.json"), *args])
    assert result.exit_code == 2 and message in result.output
