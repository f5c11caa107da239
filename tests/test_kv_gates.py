"""``attnkit profile kv-gates``: gated attention against razor and a float64 loop; training; errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attnkit
from attnkit.cli import app
from attnkit.compat import cache_argument, output_cache
from attnkit.engine.plan import AttentionCall
from attnkit.engine.state import CallState
from attnkit.methods import Razor
from attnkit.primitives import causal_keep, last_queries, repeat_kv
from attnkit.probes import kv_gates
from attnkit.probes.configs import KVGatesConfig
from attnkit.probes.kv_gates import Gates, KVGatesError
from attnkit.probes.razor_heads import top_count
from attnkit.probes.retrieval_heads import NeedleData
from tests.factory import tiny_model
from tests.test_kv_profilers import HAY, NEEDLES

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")


@pytest.mark.parametrize(
    "arch, whole", [("llama-gqa", {0: [0], 2: [1]}), ("llama-mqa", {1: [0]}), ("gemma3-gqa", {2: [1]})]
)
def test_zero_one_gates_equal_razor_without_compensation(arch, whole):
    """Heads with gate 1 read the whole cache, heads with gate 0 the sinks and buffer: exactly razor
    with those heads whole and no compensation token (sliding layers untouched in both)."""
    model = tiny_model(arch, dtype=torch.float64)
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    reply = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    razor = Razor(heads=whole, sink=2, local=6, ratio=None, compensation="none")
    with attnkit.apply(model, [razor]) as handle, torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
        expected = model(input_ids=reply, **cache_argument(model, cache), use_cache=True).logits
        assert handle.stats(total=True)["razor"]["layers_compressed"] > 0
    gated = Gates(KVGatesConfig(sink=2, local=6, ratio=None), model.config)
    gated.fixed = gated.zero_one([(layer, head) for layer, heads in whole.items() for head in heads])
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
        with attnkit.apply(model, [gated]):
            got = model(input_ids=reply, **cache_argument(model, cache), use_cache=True).logits
        untouched = model(
            input_ids=reply, **cache_argument(model, output_cache(model(input_ids=ids, use_cache=True)))
        ).logits
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    assert (got - untouched).abs().max() > 1e-3, (
        "the layout must change this model's logits for the test to mean anything"
    )
    gated.fixed = torch.ones_like(gated.logits).detach()  # every head whole: the untouched model
    with torch.no_grad(), attnkit.apply(model, [gated]):
        whole_cache = model(
            input_ids=reply, **cache_argument(model, output_cache(model(input_ids=ids, use_cache=True)))
        ).logits
    torch.testing.assert_close(whole_cache, untouched, atol=1e-10, rtol=0)
    assert model.config._attn_implementation in ("eager", "sdpa")


class Layer(torch.nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.layer_idx = index


def test_soft_gates_mix_whole_and_buffer_attention_like_a_float64_loop():
    config = tiny_model("llama-gqa").config  # 4 query heads, 2 KV heads
    gated = Gates(KVGatesConfig(sink=1, local=3, ratio=4.0), config)
    with torch.no_grad():
        gated.logits[1] = torch.tensor([0.7, -1.2])
    # a reply after 20 cached tokens: buffer max(3, ceil(20 / 4)) = 5, columns 0 and 15-19 of the prompt, then the new ones
    state = CallState("extend", 20, 3, None)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 23, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 23, 16, generator=gen, dtype=torch.float64)
    full = torch.nn.functional.scaled_dot_product_attention(  # the backend's whole-cache output
        q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=causal_keep(last_queries(3, 23, None), 23), scale=0.25
    ).transpose(1, 2)
    out = gated.mix(AttentionCall(Layer(1), 1, q, k, v, None, state, scaling=0.25), full)
    expected = np.zeros((1, 3, 4, 16))
    for h in range(4):
        g = float(torch.sigmoid(gated.logits[1, h // 2].detach()))  # the gates are float32 parameters
        for i in range(3):
            seen = range(20 + i + 1)
            kept = [j for j in seen if j < 1 or j >= 15]
            for g_part, cols in ((g, seen), (1 - g, kept)):
                s = np.array([float(q[0, h, i] @ k[0, h // 2, j]) * 0.25 for j in cols])
                p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                expected[0, i, h] += g_part * sum(p[n] * v[0, h // 2, j].numpy() for n, j in enumerate(cols))
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-12)
    out.sum().backward()  # the gates get a gradient
    assert gated.logits.grad[1].abs().min() > 0 and gated.logits.grad[0].abs().max() == 0


def test_only_full_attention_layers_are_gated():
    config = tiny_model("gemma3-gqa", attn_implementation="eager").config
    assert Gates(KVGatesConfig(sink=4, local=8, ratio=None), config).gated == [False, False, True]


def test_profile_trains_gates_selects_the_top_and_restores_the_model(model, tokenizer, tmp_path):
    ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    grads = [p.requires_grad for p in model.parameters()]
    out = tmp_path / "gates.json"
    config = KVGatesConfig(lengths=[100], depths=[0.2, 0.8], sink=2, local=8, ratio=None, fraction=0.25, steps=3,
                           reply_tokens=6, min_recall=-1.0, chat=False)  # fmt: skip
    artifact = kv_gates.profile(model, tokenizer, config, NeedleData(HAY, tuple(NEEDLES)), model_id="tiny", output=out,
                                progress=False)  # fmt: skip
    assert model.config._attn_implementation == "sdpa" and [p.requires_grad for p in model.parameters()] == grads
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
    assert artifact.method == "kv-gates" and artifact.level == "kv" and artifact.samples == 2
    scores = np.array(artifact.scores)
    assert scores.shape == (3, 2) and not np.allclose(scores, 1 / (1 + math.exp(-3.0)))  # the gates moved
    chosen = [(layer, head) for layer, heads in artifact.selected.items() for head in heads]
    assert len(chosen) == top_count(0.25, 6) == 2
    assert min(scores[c] for c in chosen) >= max(scores[l, h] for l in range(3) for h in range(2) if (l, h) not in chosen)  # noqa: E741  # fmt: skip
    params = artifact.parameters
    assert len(params["history"]) == 3 and set(params["answer_nll"]) == {"selected", "none_whole", "all_whole"}
    assert json.loads(out.read_text())["method"] == "kv-gates"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction": 0.0}, "fraction=0.0: give the share of KV heads"),
        ({"ratio": 1.0}, "ratio=1.0: the buffer is max\\(local, N / ratio\\)"),
        ({"depths": [1.5]}, "depth 1.5 is outside \\[0, 1\\]"),
        (
            {"lengths": [250]},
            "length 250 \\+ reply_tokens 16 exceeds the model's 256 positions \\(max_position_embeddings\\); use lengths up to 240",
        ),
        ({"steps": 0}, "use steps >= 1"),
        ({"min_recall": 0.5}, "the model recalled none of the 1 needle prompts"),
    ],
)
def test_profile_errors(model, tokenizer, kwargs, message):
    with pytest.raises(KVGatesError, match=message):
        kv_gates.profile(model, tokenizer, KVGatesConfig(chat=False, **{"lengths": [100], "depths": [0.5], **kwargs}),
                         NeedleData(HAY, tuple(NEEDLES)), model_id="tiny", progress=False)  # fmt: skip


def test_cli_profile_kv_gates(fake_load, tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text(HAY)
    needles = tmp_path / "needles.jsonl"
    needles.write_text(
        json.dumps({"needle": "The key is red.", "question": "What is the key?", "answer": "red"}) + "\n"
    )
    out = tmp_path / "gates.json"
    args = [
        "profile",
        "kv-gates",
        "-m",
        "tiny",
        "-o",
        str(out),
        "--lengths",
        "100",
        "--depths",
        "0.5",
        "--haystack",
        str(hay),
        "--needles",
        str(needles),
        "--steps",
        "2",
        "--reply-tokens",
        "4",
        "--local",
        "8",
        "--no-progress",
    ]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "recalled none of the 1 needle prompts" in refused.output and not out.exists()
    result = runner.invoke(app, [*args, "--min-recall", "-1"])
    assert result.exit_code == 0, result.output
    assert "answer NLL: all heads whole" in result.output and "method: kv-gates" in result.output
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
