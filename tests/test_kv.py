"""KV compression (snapkv, streaming, razor) against plain float64 references.

The references here are independent of attnkit's code: selection scores from the model's own
eager attention weights, and decoding through a test-only attention function that attends to the
kept keys only (masking, no cache surgery) and adds RazorAttention's compensation token by its
formula.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnkit
from attnkit.compat import cache_argument, output_cache
from attnkit.engine.kvcache import CompressedLayer, KVCacheError, cache_bytes, compensation, compensation_bias
from attnkit.methods import HeadMask, Razor, SnapKV, Streaming
from attnkit.recipe import RecipeError, load_recipe
from tests.factory import left_padded_batch, tiny_inputs, tiny_model

ARCHS = ["llama-mha", "llama-gqa", "llama-mqa", "qwen3-gqa", "gemma3-gqa", "phi3-mha"]


def generate(model, inputs, steps=4, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
    )


def kept_columns(cache) -> dict[int, dict[int, list[int]]]:
    """layer -> KV head -> kept prefill columns (row 0), compensation slots excluded."""
    out = {}
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, CompressedLayer):
            heads = {}
            for group in layer.groups:
                for i, head in enumerate(group.heads):
                    cols = group.columns[0, i][group.bias[0, i] == 0]
                    heads[head] = cols.tolist()
            out[index] = heads
    return out


# --- an independent reference: attention restricted to kept keys, by masking ---------------------

REFERENCE: dict = {}


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Float64 eager attention. Prefill: full causal. Decode: each KV head reads only its kept
    prefill columns and the new tokens; a head with a compensation entry adds
    N_d * exp(q.k_mean) terms to numerator and denominator (RazorAttention Eq. 5)."""
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    groups = h // kv
    scaling = scaling if scaling is not None else d**-0.5
    k = key.repeat_interleave(groups, 1).double()
    v = value.repeat_interleave(groups, 1).double()
    scores = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if kwargs.get("softcap"):
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    length = key.shape[2]
    allowed = torch.ones(b, h, q_len, length, dtype=torch.bool)
    allowed &= torch.arange(length)[None, :] <= torch.arange(length - q_len, length)[:, None]
    if attention_mask is not None:
        allowed &= attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
    kept = REFERENCE.get("kept", {}).get(module.layer_idx)
    comp_num = torch.zeros(b, h, q_len, d, dtype=torch.float64)
    comp_den = torch.zeros(b, h, q_len, dtype=torch.float64)
    if kept is not None and q_len < length:
        prompt = REFERENCE["prompt_length"]
        for head in range(h):
            cols = kept[head // groups]
            if cols is None:
                continue
            dropped = [c for c in range(prompt) if c not in cols]
            allowed[:, head, :, [c for c in dropped]] = False
            if REFERENCE.get("compensation") and dropped:
                k_mean = k[:, head, dropped].mean(1)
                v_mean = v[:, head, dropped].mean(1)
                logit = torch.einsum("bqd,bd->bq", query[:, head].double(), k_mean) * scaling
                if kwargs.get("softcap"):
                    logit = torch.tanh(logit / kwargs["softcap"]) * kwargs["softcap"]
                weight = len(dropped) * torch.exp(logit)
                comp_den[:, head] = weight
                comp_num[:, head] = weight[..., None] * v_mean[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - top)
    scale = torch.exp(-top)
    out = (torch.matmul(weights, v) + comp_num * scale) / (weights.sum(-1) + comp_den * scale[..., 0])[..., None]
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


AttentionInterface.register("kvref", reference_attention)
AttentionMaskInterface.register("kvref", sdpa_mask)


@contextlib.contextmanager
def reference_backend(model, kept, prompt_length, compensation=False):
    """The model runs the float64 reference attention, restricted to ``kept`` (layer -> kv head -> columns)."""
    original = model.config._attn_implementation
    REFERENCE.update(kept=kept, prompt_length=prompt_length, compensation=compensation)
    try:
        model.set_attn_implementation("kvref")
        yield
    finally:
        REFERENCE.clear()
        model.set_attn_implementation(original)


def reference_logits(model, inputs, kept, steps, compensation=False):
    """Decode logits with attention restricted to ``kept``."""
    with reference_backend(model, kept, inputs["input_ids"].shape[1], compensation):
        return torch.stack(generate(model, inputs, steps).logits, 1)


def full_kept(kept: dict, model) -> dict:
    """Kept sets for every layer; layers attnkit left whole read everything."""
    kv = model.config.num_key_value_heads
    return {
        layer: {h: kept.get(layer, {}).get(h) for h in range(kv)} for layer in range(model.config.num_hidden_layers)
    }


# --- selection -------------------------------------------------------------------------------------


def snapkv_reference_scores(model, inputs, window, kernel, pooling, reduction="mean"):
    """layer -> [kv heads, prefix] SnapKV scores, from the eager model's own attention weights (float64)."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    kv = model.config.num_key_value_heads
    scores = {}
    for layer, attn in enumerate(out.attentions):
        length = attn.shape[-1]
        summed = attn[0, :, -window:, : length - window].sum(1)  # [heads, prefix]
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        pooled = pool(summed[None], kernel, stride=1, padding=kernel // 2)[0]
        grouped = pooled.view(kv, -1, pooled.shape[-1])
        scores[layer] = {"mean": grouped.mean(1), "max": grouped.amax(1), "sum": grouped.sum(1)}[reduction]
    return scores


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling,reduction", [("max", "mean"), ("avg", "max"), ("avg", "sum")])
def test_snapkv_keeps_reference_top_k(arch, pooling, reduction):
    """Kept prefix = a top-(budget - window) set of the reference score (max pooling makes ties,
    so any tie order is accepted), plus the whole window."""
    model = tiny_model(arch, attn_implementation="eager", dtype=torch.float64)
    inputs = tiny_inputs(model, length=40)
    window, budget = 6, 16
    reference = snapkv_reference_scores(model, inputs, window=window, kernel=5, pooling=pooling, reduction=reduction)
    model.set_attn_implementation("sdpa")
    with attnkit.apply(
        model, [SnapKV(budget=budget, window=window, kernel=5, pooling=pooling, reduction=reduction)]
    ) as handle:
        out = generate(model, inputs, steps=1)
        stats = handle.stats(total=True)["snapkv"]
    got = kept_columns(output_cache(out))
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    full_layers = [i for i, t in enumerate(types) if t == "full_attention"]
    assert sorted(got) == full_layers
    for layer in full_layers:
        for head, cols in got[layer].items():
            assert len(cols) == budget
            assert cols[-window:] == list(range(40 - window, 40))
            score = reference[layer][head]
            kept = torch.tensor(cols[:-window])
            dropped = torch.tensor([c for c in range(40 - window) if c not in cols])
            assert score[kept].min() >= score[dropped].max(), (layer, head)
    assert stats["layers_compressed"] == len(full_layers)


@pytest.mark.parametrize("arch", ARCHS + ["gemma2-gqa"])  # gemma 2: softcapped logits, eager only
@pytest.mark.parametrize("method", ["snapkv", "streaming", "razor"])
def test_decoding_from_compressed_cache_equals_masked_reference(arch, method):
    # Gemma 2's own eager kernel takes its softmax in float32 even in a float64 model, hence 1e-5
    # there; a small softcap makes the capping matter far beyond that tolerance.
    gemma2 = arch == "gemma2-gqa"
    extra = dict(attn_implementation="eager", attn_logit_softcapping=1.0) if gemma2 else {}
    model = tiny_model(arch, dtype=torch.float64, **extra)
    inputs = tiny_inputs(model, length=36)
    kv = model.config.num_key_value_heads
    chosen = {
        "snapkv": SnapKV(budget=14, window=4, kernel=3),
        "streaming": Streaming(budget=12, sink=2),
        "razor": Razor(heads={0: [0], 2: [kv - 1]}, sink=2, local=6, ratio=None),
    }[method]
    with attnkit.apply(model, [chosen]) as handle:
        out = generate(model, inputs, steps=4)
        assert handle.stats(total=True)[method]["layers_compressed"] >= 1
    got = torch.stack(out.logits, 1)
    kept = full_kept(kept_columns(output_cache(out)), model)
    expected = reference_logits(model, inputs, kept, steps=4, compensation=method == "razor")
    tolerance = 1e-5 if gemma2 else 1e-9
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    if method == "streaming":
        for heads in kept_columns(output_cache(out)).values():
            assert all([c for c in cols if c < 36] == [0, 1] + list(range(26, 36)) for cols in heads.values())


@pytest.mark.parametrize("method", ["snapkv", "razor"])
def test_several_new_tokens_at_once_equal_masked_reference(method):
    """A forward of several tokens over a compressed cache (the backend path with the slots'
    mask, not the one-token decode path) equals the masked reference too."""
    model = tiny_model("llama-gqa", dtype=torch.float64)
    inputs = tiny_inputs(model, length=36)
    more = torch.randint(0, model.config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(5))
    chosen = (
        SnapKV(budget=14, window=4, kernel=3)
        if method == "snapkv"
        else Razor(heads={0: [0]}, sink=2, local=6, ratio=None)
    )

    def continue_with():
        """(logits of the three tokens fed at once after the prompt, the prompt's cache)"""
        with torch.no_grad():
            cache = output_cache(model(**inputs, use_cache=True))
            return model(input_ids=more, **cache_argument(model, cache), use_cache=True).logits, cache

    with attnkit.apply(model, [chosen]):
        got, cache = continue_with()
    with reference_backend(model, full_kept(kept_columns(cache), model), 36, compensation=method == "razor"):
        expected, _ = continue_with()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_razor_compensation_weighting_matters():
    """Eq. 5's N_d weight is what the reference checks: counting the token once differs."""
    model = tiny_model("llama-gqa", dtype=torch.float64)
    inputs = tiny_inputs(model, length=36)
    logits = {}
    for mode in ("weighted", "plain", "none"):
        with attnkit.apply(model, [Razor(heads={0: [0]}, sink=2, local=6, ratio=None, compensation=mode)]):
            logits[mode] = torch.stack(generate(model, inputs, steps=2).logits, 1)
    assert not torch.allclose(logits["weighted"], logits["plain"])
    assert not torch.allclose(logits["plain"], logits["none"])


def test_compensation_token_formula():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 10, 4, dtype=torch.float64), torch.randn(2, 3, 10, 4, dtype=torch.float64)
    dropped = torch.zeros(2, 3, 10, dtype=torch.bool)
    dropped[0, 0, 2:7] = True
    dropped[1, 2, [1, 4, 8]] = True
    key, value, count, column = compensation(keys, values, dropped)
    torch.testing.assert_close(key[0, 0], keys[0, 0, 2:7].mean(0))
    torch.testing.assert_close(value[1, 2], values[1, 2, [1, 4, 8]].mean(0))
    assert count.tolist() == [[5, 0, 0], [0, 0, 3]]
    assert column[0, 0] == 6 and column[1, 2] == 8
    bias = compensation_bias(count)
    assert bias[0, 0].item() == pytest.approx(math.log(5)) and bias[0, 1].item() == float("-inf")
    # the weighted token's softmax share equals that of N_d copies of the mean key
    q = torch.randn(4, dtype=torch.float64)
    others = torch.randn(6, 4, dtype=torch.float64)
    k_mean = keys[0, 0, 2:7].mean(0)
    with_bias = torch.softmax(torch.cat([others @ q, (k_mean @ q + bias[0, 0].double())[None]]), 0)[-1]
    copies = torch.softmax(torch.cat([others @ q, (k_mean @ q).repeat(5)]), 0)[-5:].sum()
    torch.testing.assert_close(with_bias, copies)


# --- identity, batches, positions, state ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-gqa"])
@pytest.mark.parametrize(
    "method", [SnapKV(budget=64, window=4), Streaming(budget=0.999999), Razor(heads={0: [0]}, local=64)]
)
def test_budget_covering_the_prompt_is_bit_identical(arch, method):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, length=30)
    base = generate(model, inputs)
    with attnkit.apply(model, [method]) as handle:
        out = generate(model, inputs)
        assert handle.stats(total=True)[method.name]["layers_untouched"] >= 1
    assert torch.equal(out.sequences, base.sequences)
    for a, b in zip(out.logits, base.logits):
        assert torch.equal(a, b)
    assert all(type(layer) is not CompressedLayer for layer in output_cache(out).layers)


@pytest.mark.parametrize("method", ["snapkv", "streaming", "razor"])
def test_left_padded_batch_equals_single_rows(method):
    model = tiny_model("llama-gqa", dtype=torch.float64)  # float64: greedy tokens of a random model have near-ties
    config = model.config
    seqs = [tiny_inputs(model, length=n, seed=n)["input_ids"][0].tolist() for n in (40, 28, 33)]
    make = {
        "snapkv": lambda: SnapKV(budget=0.5, window=4, kernel=3),
        "streaming": lambda: Streaming(budget=0.4, sink=2),
        "razor": lambda: Razor(heads={1: [1]}, sink=2, local=4, ratio=4),
    }[method]
    batch = left_padded_batch(seqs, config.pad_token_id)
    with attnkit.apply(model, [make()]):
        out = generate(model, batch, steps=3)
        cache = output_cache(out)
        for layer in cache.layers:
            for group in layer.groups:
                pads = (batch["attention_mask"] == 0).sum(-1)
                for row, pad in enumerate(pads.tolist()):
                    cols = group.columns[row][group.bias[row] > float("-inf")]
                    assert bool((cols >= pad).all()), "a padding position was kept"
        singles = [generate(model, {"input_ids": torch.tensor([s])}, steps=3) for s in seqs]
    for row, single in enumerate(singles):
        assert torch.equal(out.sequences[row, -3:], single.sequences[0, -3:])
        torch.testing.assert_close(
            torch.stack(out.logits, 1)[row], torch.stack(single.logits, 1)[0], rtol=1e-9, atol=1e-9
        )


def test_new_tokens_continue_from_the_prompt_length():
    model = tiny_model("llama-gqa", dtype=torch.float64)
    inputs = tiny_inputs(model, length=30)
    with attnkit.apply(model, [SnapKV(budget=12, window=4)]):
        out = generate(model, inputs, steps=3)
        cache = output_cache(out)
        assert cache.get_seq_length() == 32  # 30 prompt + 2 fed-back tokens
        group = cache.layers[0].groups[0]
        columns = group.slot_columns(cache.get_seq_length())
        assert group.keys.shape[2] == 14 and columns[0, 0, -2:].tolist() == [30, 31]
        # an explicit forward with positions continuing from 32 matches the generate step
        step = model(input_ids=out.sequences[:, -1:], **cache_argument(model, cache), use_cache=True)
        assert step.logits.shape[1] == 1


def test_nothing_leaks_between_inputs():
    model = tiny_model("llama-gqa")
    a, b = tiny_inputs(model, length=40, seed=1), tiny_inputs(model, length=24, seed=2)
    with attnkit.apply(model, [SnapKV(budget=12, window=4)]):
        generate(model, a)
        after_a = generate(model, b)
    with attnkit.apply(model, [SnapKV(budget=12, window=4)]):
        fresh = generate(model, b)
    for x, y in zip(after_a.logits, fresh.logits):
        assert torch.equal(x, y)


def test_removal_restores_and_stale_cache_refuses():
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model, length=30)
    before = model(**inputs).logits
    with attnkit.apply(model, [Razor(heads={0: [0]}, local=4, ratio=None)]):
        out = generate(model, inputs, steps=2)
    assert torch.equal(model(**inputs).logits, before)
    with pytest.raises(KVCacheError, match="no longer active"):
        model(input_ids=out.sequences[:, -1:], **cache_argument(model, output_cache(out)))


@pytest.mark.parametrize("method", ["snapkv", "razor"])
def test_a_copied_compressed_cache_decodes_as_the_original(method):
    """A branch of a conversation: a deep copy of a compressed cache decodes the same tokens to the
    same logits under the handle that compressed it (razor's layers hold several head groups, which
    a decode step must read as such, not as one layer's keys)."""
    import copy

    model = tiny_model("llama-gqa", dtype=torch.float64)
    inputs = tiny_inputs(model, length=30)
    kv = model.config.num_key_value_heads
    chosen = {"snapkv": SnapKV(budget=14, window=4, kernel=3), "razor": Razor(heads={0: [0]}, local=4, ratio=None)}
    with torch.no_grad(), attnkit.apply(model, [chosen[method]]) as handle:
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        assert handle.stats(total=True)[method]["layers_compressed"] >= 1
        assert kv > 1 and (method != "razor" or len(cache.layers[0].groups) > 1)
        branch = copy.deepcopy(cache)
        token = out.logits[:, -1:].argmax(-1)
        logits = []
        for held in (cache, branch):
            step = model(input_ids=token, attention_mask=torch.ones(1, 31, dtype=torch.long), use_cache=True,
                         **cache_argument(model, held))  # fmt: skip
            logits.append(step.logits)
    assert torch.equal(logits[0], logits[1])


# --- memory accounting ------------------------------------------------------------------------------


def test_bytes_are_measured_per_layer_and_really_shrink():
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model, length=40)
    full = output_cache(generate(model, inputs, steps=1))
    full_bytes = cache_bytes(full)
    with attnkit.apply(model, [Razor(heads={1: [0]}, sink=2, local=6, ratio=None)]) as handle:
        out = generate(model, inputs, steps=1)
        stats = handle.stats()["razor"]
    per_layer = stats["kv_bytes"]
    assert set(per_layer) == {0, 1, 2}
    layer_full = full_bytes // 3
    assert all(before == layer_full for before, _ in per_layer.values())
    # layer 1: one head of two keeps 40 tokens, the other 2 + 6 + 1 compensation slot
    head_bytes = layer_full // 2 // 40
    assert per_layer[1][1] == head_bytes * (40 + 9)
    assert per_layer[0][1] == head_bytes * 2 * 9
    assert cache_bytes(output_cache(out)) == sum(after for _, after in per_layer.values())
    assert stats["kv_bytes_after"] < stats["kv_bytes_before"]


def test_byte_totals_count_layers_left_whole():
    """A layer whose heads are all retrieval heads stays whole; the totals still count it, so
    after / before is the fraction of the whole cache kept."""
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model, length=40)
    full_bytes = cache_bytes(output_cache(generate(model, inputs, steps=1)))
    with attnkit.apply(model, [Razor(heads={1: [0, 1]}, sink=2, local=6, ratio=None)]) as handle:
        out = generate(model, inputs, steps=1)
        stats = handle.stats()["razor"]
    assert stats["layers_untouched"] == 1 and stats["layers_compressed"] == 2
    assert stats["kv_bytes_before"] == full_bytes
    assert stats["kv_bytes_after"] == cache_bytes(output_cache(out))


# --- composition and errors --------------------------------------------------------------------------


def test_composes_with_head_mask():
    model = tiny_model("llama-gqa", dtype=torch.float64)
    inputs = tiny_inputs(model, length=36)
    with attnkit.apply(model, [HeadMask(heads={1: [2]}), SnapKV(budget=14, window=4, kernel=3)]) as handle:
        out = generate(model, inputs, steps=3)
        stats = handle.stats(total=True)
    assert stats["head_mask"]["head_outputs_scaled"] > 0 and stats["snapkv"]["layers_compressed"] == 3
    kept = full_kept(kept_columns(output_cache(out)), model)
    model.set_attn_implementation("kvref")
    REFERENCE.update(kept=kept, prompt_length=36)
    try:
        with attnkit.apply(model, [HeadMask(heads={1: [2]})]):
            expected = torch.stack(generate(model, inputs, steps=3).logits, 1)
    finally:
        REFERENCE.clear()
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, rtol=1e-9, atol=1e-9)


def test_refuses_kv_and_probability_edits_on_one_layer():
    from attnkit.methods import ACT

    model = tiny_model("llama-gqa")
    with pytest.raises(ValueError, match="not supported yet"):
        attnkit.apply(model, [ACT(heads={1: [0]}), SnapKV(budget=16, window=4)])
    assert model.config._attn_implementation == "sdpa"


def test_refuses_models_with_only_sliding_layers():
    model = tiny_model("mistral-gqa")
    with pytest.raises(ValueError, match="no full-attention layer"):
        attnkit.apply(model, [SnapKV(budget=16, window=4)])


@pytest.mark.parametrize(
    "method,message",
    [
        ({"method": "snapkv", "budget": 32, "window": 32}, "methods[0]: .*budget 32 must be larger than window 32"),
        ({"method": "snapkv", "budget": 1.5}, "methods[0].budget: .*neither a whole token count nor a fraction"),
        ({"method": "snapkv", "budget": 0}, "methods[0].budget: .*must be positive"),
        ({"method": "snapkv", "budget": 100, "kernel": 4}, "kernel 4 must be odd"),
        ({"method": "streaming", "budget": 4, "sink": 4}, "budget 4 must be larger than sink 4"),
        ({"method": "razor"}, "methods[0].heads: .*required"),
        ({"method": "razor", "heads": {0: [0]}, "ratio": 1}, "methods[0].ratio"),
    ],
)
def test_bad_configs_name_the_problem(method, message):
    with pytest.raises(RecipeError) as err:
        load_recipe({"name": "t", "model": {"name_or_path": "x"}, "methods": [method]})
    parts = message.split(" .*")
    assert any(all(part.strip() in line for part in parts) for line in err.value.errors), err.value.errors


def test_right_padding_is_refused_with_the_fix():
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model, batch=2, length=30)
    inputs["attention_mask"][1, -5:] = 0
    with attnkit.apply(model, [SnapKV(budget=12, window=4)]):
        with pytest.raises(KVCacheError, match="padding_side = 'left'"):
            model(**inputs, use_cache=True)


def test_query_level_artifact_heads_become_kv_heads(tmp_path):
    from attnkit.heads import HeadArtifact, ModelShape, Selection, resolve_heads

    model = tiny_model("llama-gqa")  # 4 query heads, 2 KV heads
    shape = ModelShape.from_config(model.config)
    artifact = HeadArtifact(
        attnkit_version="0",
        model_id="tiny",
        config_fingerprint=shape.fingerprint,
        method="retrieval-heads",
        scores=[[0.0] * 4] * 3,
        selection=Selection(rule="test", heads={0: [1], 2: [2, 3]}),
    )
    path = artifact.save(tmp_path / "heads.json")
    assert resolve_heads(str(path), shape, level="kv").by_layer() == {0: [0], 2: [1]}
    with attnkit.apply(model, [Razor(heads=str(path), local=4, ratio=None)]) as handle:
        assert handle.stats()["razor"]["retrieval_kv_heads"] == 2


def test_report_shows_kv_bytes_per_layer():
    from attnkit.tasks.report import describe_stats, kv_table

    model = tiny_model("llama-gqa")
    with attnkit.apply(model, [SnapKV(budget=12, window=4)]) as handle:
        generate(model, tiny_inputs(model, length=40), steps=1)
        stats = handle.stats(total=True)
    lines = kv_table(stats)
    assert lines[1] == "## KV cache of `snapkv` (bytes summed over the run's prefills)"
    assert lines[-3:] == [f"| {i} | 10240 | 3072 | 0.300 |" for i in range(3)]
    assert "kv_kept=0.300" in describe_stats(stats["snapkv"]) and "{" not in describe_stats(stats["snapkv"])


def pyramid_reference(cap: int, window: int, length: int, beta: int, layer: int, layers: int) -> int:
    """PyramidKV's per-layer capacity (window included), written out from its reference code."""
    low = (cap - window) // beta
    high = (cap - window) * 2 - low
    if high >= length - window:
        high = length - window
        low = (cap - window) * 2 - high
    step = (high - low) // (layers - 1)
    if length < (cap - window) * 2:
        return cap
    return high - layer * step + window


@pytest.mark.parametrize("cap,length", [(20, 200), (20, 33), (40, 90), (64, 4000)])
def test_pyramid_budgets_match_pyramidkv(cap, length):
    from attnkit.methods.snapkv import pyramid_budgets

    for layer in range(30):
        got = pyramid_budgets(torch.tensor([cap]), torch.tensor([length]), 8, 20, layer, 30)
        assert got.item() == pyramid_reference(cap, 8, length, 20, layer, 30)


def test_pyramid_schedule_keeps_more_below_and_the_same_on_average():
    model = tiny_model("llama-gqa", num_hidden_layers=5)
    with attnkit.apply(model, [SnapKV(budget=20, window=4, schedule="pyramid", pyramid_beta=4)]):
        cache = output_cache(generate(model, tiny_inputs(model, length=60), steps=1))
    kept = [int((layer.groups[0].columns[0, 0] < 60).sum()) for layer in cache.layers]
    assert kept == sorted(kept, reverse=True) and kept[0] > 20 > kept[-1]
    assert abs(sum(kept) / len(kept) - 20) <= 2
