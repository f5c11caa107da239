"""VAR against a plain float64 reference of the paper's formula, on tiny text models and a tiny LLaVA.

Random tiny models have no massive activations, so the tests make some: a few token embeddings
get a large value on one hidden dim (``SINK_DIM``), which the residual stream carries through the
layers, and ``tau`` is set below the resulting ``phi`` (about sqrt(hidden) = 8) but far above
every other token's (under 3).
"""

import pytest
import torch

import attnkit
from attnkit.compat import cache_argument
from attnkit.methods import Method, SinkRedistribute
from attnkit.methods.sink_redistribute import redistribute
from attnkit.recipe.methods import MethodConfig
from tests.factory import left_padded_batch, position_ids_from_mask, tiny_model

SINK_DIM = 5
SINK_TOKENS = (1, 61, 7, 104)  # BOS and three ordinary tokens made "massive"
TAU = 5.0
LAYERS = 5  # edited layers: 2 and 3 (0-1 and the last one are skipped)
SPAN = {"start": 2, "end": 9}
# Row 0: sinks at 0 (BOS, text), 2 and 5 (in the span 2-8), 10 (text, after the span).
# Row 1: sinks at 0 (BOS) and 3 (in the span); shorter, so it is left-padded in a batch.
SEQS = [[1, 20, 61, 21, 22, 7, 23, 24, 25, 26, 104, 27, 28, 29], [1, 30, 31, 61, 32, 33, 34, 35, 36, 37, 38]]
ARCHS = ["llama-gqa", "qwen2-gqa", "qwen3-gqa", "mistral-gqa", "gemma3-gqa", "phi3-mha"]


# --------------------------------------------------------------------------------------------
# The reference: the reference code's loops, in float64, per batch row, head and query
# --------------------------------------------------------------------------------------------


def reference_rows(a, sinks, span, query_positions, p, rho, summ):
    """VAR on one head's probabilities ``a`` [queries, keys] (float64), plain loops.

    sinks, span: sets of key positions; query_positions: absolute position of each row.
    Returns the edited copy and how many rows were redistributed.
    """
    out = a.clone()
    kept = 0
    if not sinks & span:  # the reference skips a layer whose image holds no sink
        return out, kept
    end = max(span) + 1
    target = sorted(span - sinks)
    for i, pos in enumerate(query_positions):
        if pos < end:  # prefill: only the queries after the span (the text after the image)
            continue
        row = a[i].tolist()
        summation = sum(row[j] for j in span)
        portion = sum(row[j] for j in span & sinks) / sum(row[j] + 1e-6 for j in span)
        if not (portion <= rho and summation >= summ):
            continue
        denom = sum(row[j] for j in target)
        if denom == 0:
            continue
        budget = (1 - p) * sum(row[j] for j in sinks)
        for j in sinks:
            out[i, j] = p * row[j]
        for j in target:
            out[i, j] = row[j] + budget * row[j] / denom
        kept += 1
    return out, kept


def phi(x, dims):
    """max over dims of |x_d / rms(x)| for one token's hidden state (a float64 list)."""
    rms = (sum(v * v for v in x) / len(x) + 1e-6) ** 0.5
    return max(abs(x[d]) / rms for d in dims)


def text_layers(model):
    inner = model.model
    return getattr(inner, "language_model", inner).layers


class ReferenceVAR(Method):
    """VAR done by the loops above: sinks from its own pre-hooks on the decoder layers (float64),
    the span given as explicit absolute positions per batch row, the edit in the eager stage."""

    name, config_class = "reference_var", MethodConfig

    def __init__(self, spans, dims=(SINK_DIM,), tau=TAU, p=0.6, rho=0.5, summ=0.2, prompt_rows=None):
        super().__init__(MethodConfig(method="reference_var"))
        self.spans = [set(s) for s in spans]
        self.dims, self.tau, self.p, self.rho, self.summ, self.prompt_rows = dims, tau, p, rho, summ, prompt_rows
        self.kept = 0

    def attach(self, at):
        layers = text_layers(at.model)
        for layer in range(2, len(layers) - 1):
            at.hooks.append(layers[layer].register_forward_pre_hook(self.detect(layer, at.plan), with_kwargs=True))
            at.prob_edit(layer, self.edit(layer))

    def detect(self, layer, plan):
        def hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None).double()
            mask = plan.state.attention_mask
            found = []
            for row in range(hidden.shape[0]):
                n = self.prompt_rows or hidden.shape[1]
                found.append(
                    {
                        t
                        for t in range(n)
                        if (mask is None or mask[row, t]) and phi(hidden[row, t].tolist(), self.dims) > self.tau
                    }
                )
            plan.state.scratch.setdefault("reference_var", {})[layer] = found

        return hook

    def edit(self, layer):
        def run(probs, call):
            sinks = call.state.scratch["reference_var"][layer]
            mask = call.state.attention_mask
            out = probs.clone()
            b, h, q, k = probs.shape
            for row in range(b):
                # absolute position of each query row; a padding row gets -1, so it is never edited
                positions = [k - q + i if mask is None or mask[row, k - q + i] else -1 for i in range(q)]
                for head in range(h):
                    edited, kept = reference_rows(
                        probs[row, head].double(), sinks[row], self.spans[row], positions, self.p, self.rho, self.summ
                    )
                    out[row, head] = edited.to(probs.dtype)
                    self.kept += kept
            return out

        return run


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def with_sinks(model):
    """Give SINK_TOKENS a massive activation on SINK_DIM."""
    with torch.no_grad():
        for token in SINK_TOKENS:
            model.get_input_embeddings().weight[token, SINK_DIM] = 30.0
    return model


def text_model(arch, attn="sdpa", layers=LAYERS, dtype=torch.float64, **overrides):
    return with_sinks(tiny_model(arch, attn_implementation=attn, dtype=dtype, num_hidden_layers=layers, **overrides))


def declared_positions(mask, start, end):
    """Absolute span positions per row for a span counted from the first real token."""
    spans = []
    for row in mask.tolist():
        first = row.index(1)
        spans.append({first + i for i in range(start, end) if first + i < len(row)})
    return spans


def run(model, methods, **inputs):
    with torch.no_grad(), attnkit.apply(model, methods) as handle:
        return model(**inputs).logits, handle.stats()


def var(**params):
    return SinkRedistribute(**{"sink_dims": [SINK_DIM], "tau": TAU, "span": SPAN, **params})


# --------------------------------------------------------------------------------------------
# The formula on random probabilities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p,rho,summ", [(0.6, 0.5, 0.2), (0.0, 0.3, 0.1), (0.9, 0.8, 0.3)])
def test_redistribute_equals_reference_on_random_probabilities(seed, p, rho, summ):
    gen = torch.Generator().manual_seed(seed)
    b, h, n = 3, 4, 14
    causal = torch.ones(n, n).tril().bool()
    logits = torch.randn(b, h, n, n, generator=gen, dtype=torch.float64) * 2.5
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    sinks = torch.rand(b, n, generator=gen) < 0.3
    sinks[:, 0] = True
    span = torch.zeros(b, n, dtype=torch.bool)
    for row, (lo, hi) in enumerate([(2, 8), (1, 5), (4, 11)]):
        span[row, lo:hi] = True
    sinks[2, 4:11] = False  # row 2: no sink in the span, so it is never edited
    end = torch.tensor([8, 5, 11])
    rows = torch.arange(n)[None, :] >= end[:, None]
    out, kept, budget = redistribute(probs, sinks, span, rows, p, rho, summ)

    expected = probs.clone()
    count = 0
    for row in range(b):
        s = set(torch.nonzero(sinks[row]).flatten().tolist())
        t = set(torch.nonzero(span[row]).flatten().tolist())
        for head in range(h):
            expected[row, head], k = reference_rows(probs[row, head], s, t, list(range(n)), p, rho, summ)
            count += k
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert int(kept.sum()) == count > 0
    assert not kept[2].any() and kept[0].sum() < h * (n - 8), "some rows must also fail the test"
    torch.testing.assert_close(out.sum(-1), torch.ones(b, h, n, dtype=torch.float64))
    on_sinks = kept[..., None] & sinks[:, None, None, :]
    torch.testing.assert_close(out[on_sinks], p * probs[on_sinks])
    outside = kept[..., None] & ~sinks[:, None, None, :] & ~span[:, None, None, :]
    assert torch.equal(out[outside], probs[outside]), "only sinks and span tokens change"
    moved = (budget * kept).sum()
    assert torch.isclose(moved, (probs - out).clamp(min=0).sum())


def test_row_with_no_target_mass_is_left_alone():
    probs = torch.tensor([[[[0.5, 0.5, 0.0, 0.0]]]], dtype=torch.float64)
    sinks = torch.tensor([[True, False, True, False]])
    span = torch.tensor([[False, False, True, True]])
    out, kept, _ = redistribute(probs, sinks, span, torch.tensor([[True]]), 0.6, 1.0, 0.0)
    assert not kept.any() and torch.equal(out, probs)


# --------------------------------------------------------------------------------------------
# Tiny text models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_var_equals_float64_reference(arch, attn):
    model = text_model(arch, attn)
    # transformers' eager attention turns left padding into NaN in float64 (fully masked padding
    # rows, then 0 * NaN values), in the untouched model too: eager gets rows of equal length.
    batch = left_padded_batch(SEQS if attn == "sdpa" else [SEQS[0][:11], SEQS[1]], 0)
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    reference_method = ReferenceVAR(declared_positions(batch["attention_mask"], SPAN["start"], SPAN["end"]))
    reference, _ = run(model, [reference_method], **batch)
    logits, stats = run(model, [var()], **batch)
    s = stats["sink_redistribute"]
    # per edited layer (2): row 0 has span sinks at 2, 5 and text sinks at 0, 10; row 1 has 3 and 0
    assert (s["span_sinks"], s["text_sinks"], s["span_tokens"]) == (2 * 3, 2 * 3, 7 + 7)
    assert s["rows_redistributed"] == reference_method.kept > 0 and s["heads_redistributed"] > 0
    assert s["layer_calls"] == 2 and 0 < s["mean_budget_moved"] < 1
    untouched = model(**batch).logits
    rows = batch["attention_mask"].bool()
    assert (reference - untouched)[rows].abs().max() > 1e-3, "the test must redistribute something"
    torch.testing.assert_close(logits[rows], reference[rows], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-gqa", "gemma3-gqa"])
def test_decode_redistributes_against_prefill_sinks(arch):
    """Cached decoding equals recomputing the whole sequence with the prefill's sink set."""
    from transformers import DynamicCache

    model = text_model(arch)
    ids = torch.tensor([[1, 20, 61, 21, 22, 7, 23, 24, 25, 26, 30, 104, 31, 32, 33]])  # 104 at 11: after prefill
    cache, steps = DynamicCache(config=model.config), []  # as generate() makes it (sliding layers)
    with torch.no_grad(), attnkit.apply(model, [var()]) as handle:
        steps.append(model(input_ids=ids[:, :10], **cache_argument(model, cache), use_cache=True).logits[0, -1])
        prefill = handle.stats()["sink_redistribute"]
        for t in range(10, 15):
            steps.append(
                model(input_ids=ids[:, t : t + 1], **cache_argument(model, cache), use_cache=True).logits[0, -1]
            )
        total = handle.stats(total=True)["sink_redistribute"]
    assert prefill["span_sinks"] == 2 * 2 and prefill["text_sinks"] == 2 * 1
    assert total["layer_calls"] == 2 * 6 and total["text_sinks"] == prefill["text_sinks"], "decode finds no new sinks"
    assert total["rows_redistributed"] > prefill["rows_redistributed"], "decode rows are redistributed too"
    span = declared_positions(torch.ones_like(ids), SPAN["start"], SPAN["end"])
    reference, _ = run(model, [ReferenceVAR(span, prompt_rows=10)], input_ids=ids)
    recomputed, _ = run(model, [var()], input_ids=ids)
    for step, logits in enumerate(steps):
        torch.testing.assert_close(logits, reference[0, 9 + step], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(recomputed[0, -1], reference[0, -1]), "a re-prefill also finds the sink at 11"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-gqa", "phi3-mha"])
def test_p_one_is_bit_identical(arch, attn):
    model = text_model(arch, attn, dtype=torch.float32)  # float32: eager's left padding is NaN-free
    batch = left_padded_batch(SEQS, 0)
    before = model(**batch).logits
    with torch.no_grad(), attnkit.apply(model, [var(p=1.0)]) as handle:
        assert handle._attachment.plan.layers == {} and handle._attachment.hooks, "nothing but the call hooks"
        assert torch.equal(model(**batch).logits, before)
    assert torch.equal(model(**batch).logits, before)


class Probe(Method):
    """Records the probabilities a layer's later probability edits receive."""

    name, config_class = "probe", MethodConfig

    def __init__(self, layers):
        super().__init__(MethodConfig(method="probe"))
        self.layers, self.seen = layers, {}

    def attach(self, at):
        for layer in self.layers:
            at.prob_edit(layer, self.record(layer))

    def record(self, layer):
        def run(probs, call):
            self.seen[layer] = probs.clone()
            return probs

        return run


def test_rows_sum_to_one_and_only_later_rows_change():
    model = text_model("llama-gqa")
    batch = left_padded_batch(SEQS, 0)
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    plain, edited = Probe([2, 3]), Probe([2, 3])
    run(model, [plain], **batch)
    _, stats = run(model, [var(), edited], **batch)  # the probe sees VAR's output (edits in list order)
    assert stats["sink_redistribute"]["rows_redistributed"] > 0
    # layers 0-1 are untouched, so layer 2's probabilities before VAR are the same in both runs
    after, before = edited.seen[2], plain.seen[2]
    rows = batch["attention_mask"].bool()
    sums = after.sum(-1)
    torch.testing.assert_close(sums.permute(0, 2, 1)[rows], torch.ones_like(sums.permute(0, 2, 1)[rows]))
    changed = (after - before).abs().amax(-1) > 0  # [b, h, q]
    assert changed.any()
    first = [row.index(1) for row in batch["attention_mask"].tolist()]
    for row, start in enumerate(first):
        span_end = start + SPAN["end"]
        assert not changed[row, :, :span_end].any(), "queries up to the span's end are never edited"


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-gqa"])
@pytest.mark.parametrize("target", ["span", "markers"])
def test_left_padded_batch_equals_single_rows(arch, target):
    model = text_model(arch)
    seqs = [[1, 20, 90, 61, 21, 22, 7, 23, 91, 24, 104, 27, 28], [1, 30, 31, 90, 61, 33, 34, 91, 36, 37]]
    method = [var(span=None, span_markers=[90, 91])] if target == "markers" else [var(span={"start": 3, "end": 8})]
    batch = left_padded_batch(seqs, 0)
    together, stats = run(model, method, **batch, position_ids=position_ids_from_mask(batch["attention_mask"]))
    assert stats["sink_redistribute"]["rows_redistributed"] > 0 and stats["sink_redistribute"]["rows_without_span"] == 0
    for row, seq in enumerate(seqs):
        alone, _ = run(model, method, input_ids=torch.tensor([seq]))
        torch.testing.assert_close(together[row, -len(seq) :], alone[0], rtol=1e-9, atol=1e-9)


class StubTokenizer:
    vocab = {"<ctx>": [90, 91], "</ctx>": [92]}

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return self.vocab[text]


def test_span_markers_equal_the_declared_span():
    model = text_model("llama-gqa")
    #           0   1   2   3   4   5   6   7   8   9  10   11  12  13
    seq = [1, 20, 90, 91, 61, 21, 22, 7, 23, 92, 26, 104, 27, 28]  # span 4-8 between <ctx> and </ctx>
    without = [1, 20, 61, 21, 22, 7, 23, 24, 25, 26, 104, 27, 28, 29]
    batch = left_padded_batch([seq, without], 0)
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    by_span, s_span = run(model, [var(span={"start": 4, "end": 9})], input_ids=torch.tensor([seq]))
    by_ids, s_ids = run(model, [var(span=None, span_markers=[[90, 91], 92])], **batch)
    by_text, _ = run(
        model,
        [SinkRedistribute(sink_dims=[SINK_DIM], tau=TAU, span_markers=["<ctx>", "</ctx>"], tokenizer=StubTokenizer())],
        **batch,
    )
    assert s_ids["sink_redistribute"]["rows_without_span"] == 1 and s_ids["sink_redistribute"]["span_tokens"] == 5
    assert s_span["sink_redistribute"]["rows_redistributed"] == s_ids["sink_redistribute"]["rows_redistributed"] > 0
    torch.testing.assert_close(by_ids[0], by_span[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(by_text, by_ids)
    untouched = model(**batch).logits
    assert torch.equal(by_ids[1], untouched[1]), "a row without the markers is left alone"


def test_default_layers_are_2_to_l_minus_2():
    model = text_model("llama-gqa", layers=6)
    with attnkit.apply(model, [var()]) as handle:
        assert sorted(handle._attachment.plan.layers) == [2, 3, 4]
        assert handle.stats()["sink_redistribute"]["layers"] == "2-4"
    with attnkit.apply(model, [var(except_last_layer=False, first_layer=1)]) as handle:
        assert sorted(handle._attachment.plan.layers) == [1, 2, 3, 4, 5]


def test_untouched_layers_keep_their_backend():
    from attnkit.engine import attention

    model = text_model("llama-gqa")
    used = []
    original = attention.edited_attention

    def spy(call, layer):
        used.append(call.layer)
        return original(call, layer)

    attention.edited_attention = spy
    try:
        run(model, [var()], input_ids=torch.tensor([SEQS[0]]))
    finally:
        attention.edited_attention = original
    assert used == [2, 3]


def test_config_and_apply_errors():
    from attnkit.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"methods\[0\]\.sink_dims: Field required"):
        load_recipe({"methods": [{"method": "sink_redistribute", "span": {"start": 0, "end": 4}}]})
    with pytest.raises(RecipeError, match="either span or span_markers"):
        load_recipe(
            {
                "methods": [
                    {
                        "method": "sink_redistribute",
                        "sink_dims": [1],
                        "span": {"start": 0, "end": 4},
                        "span_markers": [3, 4],
                    }
                ]
            }
        )
    with pytest.raises(RecipeError, match="span end"):
        load_recipe({"methods": [{"method": "sink_redistribute", "sink_dims": [1], "span": {"start": 4, "end": 4}}]})
    recipe = load_recipe(
        {"methods": [{"method": "sink_redistribute", "sink_dims": [2533, 1415], "span_markers": ["<ctx>", "</ctx>"]}]}
    )
    assert recipe.methods[0].p == 0.6 and recipe.methods[0].tau == 20 and recipe.methods[0].summ == 0.2

    model = text_model("llama-gqa")
    with pytest.raises(ValueError, match=r"sink_dims \[64\] out of range"):
        attnkit.apply(model, [SinkRedistribute(sink_dims=[64], span=SPAN)])
    with pytest.raises(ValueError, match="no target span"):
        attnkit.apply(model, [SinkRedistribute(sink_dims=[5])])
    with pytest.raises(ValueError, match="no tokenizer"):
        attnkit.apply(model, [SinkRedistribute(sink_dims=[5], span_markers=["<a>", "</a>"])])
    with pytest.raises(ValueError, match="no layer to edit"):
        attnkit.apply(text_model("llama-gqa", layers=3), [var()])
    assert model.config._attn_implementation == "sdpa", "a failed apply leaves nothing behind"
    attnkit.apply(model, [var()]).remove()


# --------------------------------------------------------------------------------------------
# A tiny LLaVA: the image tokens are the span
# --------------------------------------------------------------------------------------------

IMAGE = 127
PATCHES = 16


def tiny_llava():
    """LLaVA with a 2-layer CLIP tower (16 patches of 4x4 pixels) and a 5-layer Llama.

    Massive activations: the BOS embedding (a text sink), and the projector's output on SINK_DIM
    scaled up, so that a few image patches cross ``tau`` (measured: about 4 of 16 at layer 2).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        image_seq_length=PATCHES,
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).to(torch.float64).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[1, SINK_DIM] = 30.0
        model.model.multi_modal_projector.linear_2.weight[SINK_DIM] *= 20
    model.generation_config.pad_token_id = 0
    return model


def llava_inputs():
    ids = torch.tensor([[1, 5, 6] + [IMAGE] * PATCHES + [7, 8, 9, 10, 11]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"input_ids": ids, "pixel_values": pixels}


def test_llava_end_to_end():
    model = tiny_llava()
    inputs = llava_inputs()
    untouched = model(**inputs).logits
    image = [set(range(3, 3 + PATCHES))]
    reference_method = ReferenceVAR(image, tau=5.7)
    reference, _ = run(model, [reference_method], **inputs)
    handle = attnkit.apply(model, [SinkRedistribute(sink_dims=[SINK_DIM], tau=5.7)])
    assert model.config.text_config._attn_implementation == "attnkit"
    assert model.config.vision_config._attn_implementation == "sdpa", "the vision tower keeps its backend"
    with torch.no_grad():
        logits = model(**inputs).logits
    s = handle.stats()["sink_redistribute"]
    assert s["target"] == f"image tokens (id {IMAGE})" and s["span_tokens"] == PATCHES
    assert s["span_sinks"] > 0 and s["text_sinks"] == 2, "BOS is a text sink in layers 2 and 3"
    assert s["rows_redistributed"] == reference_method.kept > 0
    assert (logits - untouched).abs().max() > 1e-3
    torch.testing.assert_close(logits, reference, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    total = handle.stats(total=True)["sink_redistribute"]
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    assert total["layer_calls"] == 2 * (1 + 1 + 3) and total["span_tokens"] == 2 * PATCHES
    handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, untouched)


def test_llava_p_one_is_bit_identical():
    model = tiny_llava()
    inputs = llava_inputs()
    before = model(**inputs).logits
    logits, stats = run(model, [SinkRedistribute(sink_dims=[SINK_DIM], tau=5.7, p=1.0)], **inputs)
    assert torch.equal(logits, before) and stats["sink_redistribute"]["target"] == f"image tokens (id {IMAGE})"


@pytest.mark.parametrize("arch", ["mistral-gqa", "gemma3-gqa"])
def test_decode_on_a_sliding_layer_whose_window_has_left_the_span_sinks(arch):
    """The span's sink at 2 drops out of the sliding window at decode, its other tokens and the
    text sink at 9 stay in: a row is still judged on the whole span, as a full recomputation is."""
    from transformers import DynamicCache

    model = text_model(arch)
    ids = torch.tensor([[1, 20, 61, 21, 22, 23, 24, 25, 26, 7, 30, 31, 32, 33, 34]])
    span = {"start": 2, "end": 5}
    cache, steps = DynamicCache(config=model.config), []  # sliding layers keep only the last keys
    with torch.no_grad(), attnkit.apply(model, [var(span=span, summ=0.05)]) as handle:
        steps.append(model(input_ids=ids[:, :10], **cache_argument(model, cache), use_cache=True).logits[0, -1])
        for t in range(10, 15):
            steps.append(
                model(input_ids=ids[:, t : t + 1], **cache_argument(model, cache), use_cache=True).logits[0, -1]
            )
        assert handle.stats(total=True)["sink_redistribute"]["rows_redistributed"] > 0
    reference_method = ReferenceVAR([{2, 3, 4}], prompt_rows=10, summ=0.05)
    reference, _ = run(model, [reference_method], input_ids=ids)
    assert reference_method.kept > 0
    for step, logits in enumerate(steps):
        torch.testing.assert_close(logits, reference[0, 9 + step], rtol=1e-9, atol=1e-9)
