"""TidalDecode (tidaldecode) against a plain float64 reference of the reference code's masking simulation.

The reference (``reference_attention``) is a test-only attention function, independent of attnkit's
code: float64 eager attention with full logits at every layer; at a decode step the selection layer
ranks the earlier tokens per query head (or per KV head, for the variants) with plain Python loops,
and every sparse layer masks the logits outside that selection to ``finfo.min``, as the reference's
``llama_tidal_attention_forward`` does. attnkit instead reads the selected keys alone (gathered, or
in place by the decode kernel); the two must agree to 1e-9 in float64.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnkit
from attnkit import compat, kernels
from attnkit.engine.plan import PLANS
from attnkit.methods import ACT, HeadMask, SnapKV, TidalDecode, tidal
from attnkit.methods.base import Method
from attnkit.methods.tidal import Selection, gather_rows, layer_roles, select_columns
from attnkit.primitives import layer_window
from attnkit.recipe import RecipeError, load_recipe
from attnkit.recipe.methods import MethodConfig, TidalDecodeConfig
from tests.factory import PAD_ID, left_padded_batch, needs_triton, single_threaded, tiny_inputs, tiny_model
from tests.test_engine import zero_columns

SELECTIONS = ["query_head", "kv_head_union", "kv_head_sum"]
ARCHS = ["llama-mha", "llama-gqa", "llama-mqa", "qwen3-gqa", "gemma3-gqa", "phi3-mha"]
LAYERS = {"gemma3-gqa": 9}
"""Layers per tiny model: gemma3's pattern (sliding, sliding, full) needs 9 for full layers 2, 5, 8."""
SETTINGS = dict(budget=8, selection_layer=1, reselection_layer=3)
STEPS = 5


@pytest.fixture(autouse=True)
def one_thread():
    with single_threaded():
        yield


def model_of(arch: str, dtype: torch.dtype = torch.float64, **extra):
    return tiny_model(arch, dtype=dtype, num_hidden_layers=LAYERS.get(arch, 6), **extra)


# --- the reference: full logits, everything outside the selection masked ---------------------------

REFERENCE: dict = {}


def reference_selection(scores: torch.Tensor, allowed: torch.Tensor, cfg: TidalDecodeConfig, groups: int):
    """bool [b, heads, 1, keys]: the columns each query head reads at a decode step, by the definition
    of each selection rule, in plain loops over rows, KV heads and query heads."""
    b, heads, _, length = scores.shape
    current = length - 1
    recent = min(cfg.recent, current)
    count = cfg.budget - 1 - recent
    keep = torch.zeros_like(allowed)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    for row in range(b):
        pool = [c for c in range(current - recent) if allowed[row, 0, 0, c]]
        always = list(range(current - recent, current + 1))
        for kv in range(heads // groups):
            group = range(kv * groups, (kv + 1) * groups)
            ranked = {h: sorted(pool, key=lambda c, h=h: -scores[row, h, 0, c].item()) for h in group}
            if cfg.selection == "query_head":
                chosen = {h: ranked[h][:count] for h in group}
            elif cfg.selection == "kv_head_union":
                union: list[int] = []
                for rank in range(count):
                    for h in group:
                        if rank < len(ranked[h]) and ranked[h][rank] not in union and len(union) < count:
                            union.append(ranked[h][rank])
                chosen = dict.fromkeys(group, union)
            else:
                total = sum(probs[row, h, 0] for h in group)
                chosen = dict.fromkeys(group, sorted(pool, key=lambda c: -total[c].item())[:count])
            for h in group:
                keep[row, h, 0, chosen[h] + always] = True
    return keep


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Float64 eager attention; at decode steps TidalDecode's selection and masking (see the module docstring)."""
    b, heads, q_len, d = query.shape
    groups = heads // key.shape[1]
    scaling = scaling if scaling is not None else d**-0.5
    k = key.repeat_interleave(groups, 1).double()
    v = value.repeat_interleave(groups, 1).double()
    scores = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if kwargs.get("softcap"):
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    length = key.shape[2]
    allowed = torch.ones(b, heads, q_len, length, dtype=torch.bool)
    allowed &= torch.arange(length)[None, :] <= torch.arange(length - q_len, length)[:, None]
    if attention_mask is not None:
        allowed &= attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
    role = REFERENCE["roles"].get(module.layer_idx) if q_len == 1 and length > 1 else None
    cfg = REFERENCE["config"]
    if role == "select":
        REFERENCE["keep"] = reference_selection(scores, allowed, cfg, groups) if cfg.budget < length else None
    elif role == "sparse" and REFERENCE["keep"] is not None:
        allowed &= REFERENCE["keep"]
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float64).min)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


AttentionInterface.register("tidalref", reference_attention)
AttentionMaskInterface.register("tidalref", sdpa_mask)


def reference_roles(model, cfg: TidalDecodeConfig) -> dict[int, str]:
    """Select at the first full-attention layer at or after selection_layer and after the re-selection
    layer; every other full layer after the first selection is sparse (written out, not the method's)."""
    layers = model.config.num_hidden_layers
    full = [i for i in range(layers) if layer_window(model.config, i) is None]
    reselection = cfg.reselection_for(layers)
    firsts = [min(i for i in full if i >= cfg.selection_layer)]
    if reselection is not None and any(i >= reselection for i in full):
        firsts.append(min(i for i in full if i >= reselection))
    return {i: "select" if i in firsts else "sparse" for i in full if i >= firsts[0]}


@contextlib.contextmanager
def reference_backend(model, cfg: TidalDecodeConfig):
    original = model.config._attn_implementation
    REFERENCE.update(roles=reference_roles(model, cfg), config=cfg, keep=None)
    try:
        model.set_attn_implementation("tidalref")
        yield
    finally:
        REFERENCE.clear()
        model.set_attn_implementation(original)


def decode_logits(model, inputs, steps: int = STEPS, **kwargs) -> torch.Tensor:
    """The logits of ``steps`` generated tokens [b, steps, vocab] in the model's dtype, read from the
    forward calls (generate's own are cast to float32)."""
    seen = []
    hook = model.register_forward_hook(lambda _m, _a, output: seen.append(output.logits[:, -1].clone()))
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kwargs)
    finally:
        hook.remove()
    return torch.stack(seen, 1)


def reference_logits(model, inputs, cfg: TidalDecodeConfig, steps: int = STEPS) -> torch.Tensor:
    with reference_backend(model, cfg):
        return decode_logits(model, inputs, steps)


def tidal_logits(model, inputs, steps: int = STEPS, **settings) -> tuple[torch.Tensor, dict]:
    with attnkit.apply(model, [TidalDecode(**settings)]) as handle:
        return decode_logits(model, inputs, steps), handle.stats(total=True)["tidaldecode"]


# --- exact against the reference -------------------------------------------------------------------


@pytest.fixture(params=["gathered", pytest.param("in place", marks=needs_triton)])
def read(request, monkeypatch):
    """How the sparse layers read the selection: gathered (the path off CUDA), or in place by the
    decode kernel (CUDA's path; Triton's interpreter runs it here), never gathering."""
    if request.param == "in place":
        monkeypatch.setattr(kernels, "available", lambda query: True)
        monkeypatch.setattr(tidal, "gather", lambda *args: pytest.fail("the sparse layers gathered their keys"))
    return request.param


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_reads_equal_the_masked_reference(arch, selection, read):
    model = model_of(arch)
    inputs = tiny_inputs(model, length=30)
    settings = dict(SETTINGS, selection=selection)
    got, stats = tidal_logits(model, inputs, **settings)
    expected = reference_logits(model, inputs, TidalDecodeConfig(**settings))
    untouched = decode_logits(model, inputs)
    assert stats["selections"] == 2 * (STEPS - 1) and stats["keys_read"] < stats["keys_cached"]
    assert (expected - untouched).abs().max() > 1e-3, "the budget must change the logits, or this proves nothing"
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_recent_tokens_and_no_reselection_equal_the_reference(selection):
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, length=30)
    for settings in (dict(SETTINGS, recent=3), dict(SETTINGS, reselection_layer=None, budget=6, recent=1)):
        settings["selection"] = selection
        got, _ = tidal_logits(model, inputs, **settings)
        torch.testing.assert_close(
            got, reference_logits(model, inputs, TidalDecodeConfig(**settings)), rtol=1e-9, atol=1e-9
        )


def test_softcapped_model_equals_the_reference(read):
    """Gemma 2 (eager only): capped logits, sliding layers left alone. Its own eager kernel takes the
    softmax in float32 even in float64 (the untouched layers), hence 1e-5, as in tests/test_kv.py."""
    model = model_of("gemma2-gqa", attn_implementation="eager", attn_logit_softcapping=1.0)
    inputs = tiny_inputs(model, length=30)
    settings = dict(SETTINGS, reselection_layer=None)
    for selection in SELECTIONS:
        got, stats = tidal_logits(model, inputs, **settings, selection=selection)
        expected = reference_logits(model, inputs, TidalDecodeConfig(**settings, selection=selection))
        assert stats["selection_layers"] == [1] and stats["sparse_layers"] == 1  # full layers 1 and 4
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_left_padded_batch_equals_single_rows(selection, read):
    """Rows of 36 and 20 tokens: at budget 8 both select; at budget 24 the short row holds fewer real
    tokens than the budget, so its selection picks padding, which must stay masked."""
    model = model_of("llama-gqa")
    seqs = [
        tiny_inputs(model, length=36, seed=1)["input_ids"][0].tolist(),
        tiny_inputs(model, length=20)["input_ids"][0].tolist(),
    ]
    batch = left_padded_batch(seqs, pad_id=PAD_ID)
    for budget in (8, 24):
        settings = dict(SETTINGS, budget=budget, selection=selection)
        together, _ = tidal_logits(model, batch, **settings)
        for row, seq in enumerate(seqs):
            alone, _ = tidal_logits(model, {"input_ids": torch.tensor([seq])}, **settings)
            torch.testing.assert_close(together[row], alone[0], rtol=1e-9, atol=1e-9)
        expected = reference_logits(model, batch, TidalDecodeConfig(**settings))
        torch.testing.assert_close(together, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode kernel on a GPU")
@pytest.mark.parametrize("selection", SELECTIONS)
def test_on_cuda_the_in_place_read_equals_the_gathered_one(selection, monkeypatch):
    model = model_of("llama-gqa", dtype=torch.float32).cuda()
    batch = left_padded_batch([list(range(3, 39)), list(range(40, 60))], pad_id=PAD_ID)
    batch = {name: tensor.cuda() for name, tensor in batch.items()}
    settings = dict(SETTINGS, selection=selection)
    in_place, _ = tidal_logits(model, batch, **settings)
    monkeypatch.setattr(kernels, "available", lambda query: False)
    gathered, _ = tidal_logits(model, batch, **settings)
    torch.testing.assert_close(in_place, gathered, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-gqa"])
def test_budget_at_least_the_context_is_bit_identical(arch):
    model = model_of(arch, dtype=torch.float32)
    batch = left_padded_batch([list(range(3, 33)), list(range(40, 60))], pad_id=PAD_ID)
    before = decode_logits(model, batch)
    got, stats = tidal_logits(model, batch, **dict(SETTINGS, budget=30 + STEPS))
    assert torch.equal(got, before)
    assert stats["decode_steps"] == STEPS - 1 and stats.get("selections", 0) == 0
    assert stats["keys_read"] == stats["keys_cached"] > 0


# --- generation, stats, removal --------------------------------------------------------------------


@pytest.mark.parametrize("selection", SELECTIONS)
def test_generate_greedy_and_sampling_follow_the_reference(selection):
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, length=30)
    cfg = TidalDecodeConfig(**SETTINGS, selection=selection)
    runs = {}
    contexts = {
        "tidal": lambda: attnkit.apply(model, [TidalDecode(cfg)]),
        "reference": lambda: reference_backend(model, cfg),
    }
    for name, context in contexts.items():
        with context():
            greedy = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            torch.manual_seed(3)
            sampled = model.generate(
                **inputs, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=0, temperature=1.5
            )
        runs[name] = (greedy, sampled)
    assert torch.equal(runs["tidal"][0], runs["reference"][0])
    assert torch.equal(runs["tidal"][1], runs["reference"][1])
    untouched = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert not torch.equal(runs["tidal"][0], untouched), "greedy tokens change at this budget, or this proves nothing"


@pytest.mark.parametrize("selection", SELECTIONS)
def test_stats_count_steps_selections_and_keys(selection):
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, batch=2, length=30)
    with torch.no_grad(), attnkit.apply(model, [TidalDecode(**SETTINGS, selection=selection)]) as handle:
        model(**inputs, use_cache=True)
        prefill = handle.stats()["tidaldecode"]
        model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        total = handle.stats(total=True)["tidaldecode"]
    assert prefill["phase"] == "prefill" and "selections" not in prefill and "keys_read" not in prefill
    steps = STEPS - 1  # the first token comes from the prefill
    kv, heads, b = model.config.num_key_value_heads, model.config.num_attention_heads, 2
    # layers 1 and 3 select (full reads), 2, 4 and 5 gather ``budget`` keys per query head or per KV head
    cached = sum(b * kv * (30 + s) for s in range(1, steps + 1))
    gathered = b * (heads if selection == "query_head" else kv) * SETTINGS["budget"] * steps
    assert total["decode_steps"] == steps and total["selections"] == 2 * steps
    assert total["keys_cached"] == 5 * cached
    assert total["keys_read"] == 2 * cached + 3 * gathered
    assert total["read_fraction"] == pytest.approx(total["keys_read"] / total["keys_cached"])


@pytest.mark.parametrize("selection", SELECTIONS)
def test_the_keys_a_step_counts_grow_as_declared(selection):
    """What a replayed decode step adds to ``keys_cached`` and ``keys_read`` grows with the cache as
    the step declares (``Stats.add(per_token=...)``): the declared growth equals the next eager
    step's change."""
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, batch=2, length=30)
    method = TidalDecode(**SETTINGS, selection=selection)
    with torch.no_grad(), attnkit.apply(model, [method]) as handle:
        out = model(**inputs, use_cache=True)
        cache, token, steps = compat.output_cache(out), out.logits[:, -1:].argmax(-1), []
        for _ in range(2):
            out = model(input_ids=token, **compat.cache_argument(model, cache), use_cache=True)
            steps.append((handle.stats()["tidaldecode"], dict(method.stats.growth)))
            token = out.logits[:, -1:].argmax(-1)
    (first, growth), (second, _) = steps
    kv = model.config.num_key_value_heads
    assert growth["keys_cached"] == 5 * 2 * kv  # five managed layers, batch 2, one token more each
    for key in ("keys_cached", "keys_read"):
        assert second[key] - first[key] == growth.get(key, 0)


class ReadRecorder(Method):
    """Records the keys each decode step hands the kernel, after the methods before it in the list."""

    name, config_class = "read_recorder", MethodConfig

    def __init__(self, layers):
        super().__init__(MethodConfig(method="read_recorder"))
        self.layers, self.seen = layers, []

    def attach(self, at):
        for layer in self.layers:
            at.decode_step(layer, self.record(layer))

    def record(self, layer):
        def step(call):
            self.seen.append((layer, tuple(call.key.shape)))
            return call

        return step


@pytest.mark.parametrize("selection", SELECTIONS)
def test_sparse_layers_read_only_the_gathered_keys(selection):
    """What reaches the kernel on a sparse layer is ``budget`` keys per head, not the cache."""
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, length=30)
    recorder = ReadRecorder(range(6))
    with attnkit.apply(model, [TidalDecode(**SETTINGS, selection=selection), recorder]):
        decode_logits(model, inputs, steps=2)
    heads = model.config.num_attention_heads if selection == "query_head" else model.config.num_key_value_heads
    kv = model.config.num_key_value_heads
    assert dict(recorder.seen) == {
        0: (1, kv, 31, 16),
        1: (1, kv, 31, 16),
        2: (1, heads, 8, 16),
        3: (1, kv, 31, 16),
        4: (1, heads, 8, 16),
        5: (1, heads, 8, 16),
    }


def test_remove_restores_the_model():
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, length=30)
    before = decode_logits(model, inputs)
    handle = attnkit.apply(model, [TidalDecode(**SETTINGS)])
    changed = decode_logits(model, inputs)
    handle.remove()
    assert not torch.equal(changed, before) and not PLANS
    assert torch.equal(decode_logits(model, inputs), before)


# --- composition and refusals ----------------------------------------------------------------------


def test_composes_with_head_mask():
    """Head-output edits run on o_proj's input, after the attention: the reference is the masked
    reference on a copy of the model with those heads' output columns zeroed."""
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, length=30)
    heads = {2: [0, 3], 4: [1]}
    with attnkit.apply(model, [TidalDecode(**SETTINGS), HeadMask(heads=heads, scale=0.0)]) as handle:
        got = decode_logits(model, inputs)
        assert handle.stats(total=True)["head_mask"]["head_outputs_scaled"] > 0
    pruned = zero_columns(copy.deepcopy(model), heads)
    torch.testing.assert_close(
        got, reference_logits(pruned, inputs, TidalDecodeConfig(**SETTINGS)), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("order", ["tidal_first", "kv_first"])
def test_kv_compression_is_refused_at_apply(order):
    model = model_of("llama-gqa")
    methods = [TidalDecode(**SETTINGS), SnapKV(budget=16, window=4)]
    with pytest.raises(ValueError, match=r"tidaldecode\) selects from the full KV cache.*snapkv"):
        attnkit.apply(model, methods if order == "tidal_first" else methods[::-1])
    assert not PLANS and model.config._attn_implementation == "sdpa"


def test_act_on_the_same_layers_is_refused():
    model = model_of("llama-gqa")
    with pytest.raises(ValueError, match=r"gathers a subset of the cached keys.*ACT"):
        attnkit.apply(model, [TidalDecode(**SETTINGS), ACT(heads={2: [0]})])


def test_a_model_without_full_layers_after_the_selection_is_refused():
    with pytest.raises(ValueError, match="every layer has a sliding window"):
        attnkit.apply(model_of("mistral-gqa"), [TidalDecode(**SETTINGS)])
    with pytest.raises(ValueError, match="no full-attention layer after the selection layer"):
        attnkit.apply(model_of("llama-gqa"), [TidalDecode(budget=8, selection_layer=5)])
    with pytest.raises(ValueError, match="selection_layer 7 does not exist"):
        attnkit.apply(model_of("llama-gqa"), [TidalDecode(budget=8, selection_layer=7, reselection_layer=None)])


# --- selection rules and config --------------------------------------------------------------------


def test_union_merges_rankings_rank_by_rank():
    # two query heads of one KV head over 6 columns: head 0 ranks 5, 1, 0...; head 1 ranks 1, 3, 2...
    logits = torch.tensor([[[[3.0, 5.0, 0.0, -1.0, -2.0, 9.0], [0.0, 9.0, 4.0, 5.0, -1.0, -2.0]]]])
    assert select_columns(logits, 3, "kv_head_union").tolist() == [[[[5, 1, 3]]]]
    assert select_columns(logits, 3, "query_head").tolist() == [[[[5, 1, 0], [1, 3, 2]]]]
    probs = torch.softmax(logits, dim=-1)
    assert sorted(select_columns(logits, 2, "kv_head_sum", probs).flatten().tolist()) == [1, 5]


def test_layer_roles_skip_sliding_layers():
    # Gemma 3's pattern: full layers 5, 11, 17 of 18
    full = [5, 11, 17]
    assert layer_roles(full, 2, 7) == {5: "select", 11: "select", 17: "sparse"}
    assert layer_roles(list(range(32)), 2, 13) == {2: "select", 13: "select"} | {
        i: "sparse" for i in range(3, 32) if i != 13
    }
    assert layer_roles(full, 2, None) == {5: "select", 11: "sparse", 17: "sparse"}


def test_config_defaults_and_validation():
    cfg = TidalDecodeConfig()
    assert (cfg.budget, cfg.selection_layer, cfg.reselection_layer, cfg.selection, cfg.recent) == (
        256,
        2,
        "auto",
        "query_head",
        0,
    )
    assert [cfg.reselection_for(n) for n in (32, 30, 18, 3)] == [13, 12, 7, None]
    assert TidalDecodeConfig(reselection_layer=None).reselection_for(32) is None
    for bad, message in (
        ({"recent": 255}, "recent 255 must be at most budget - 2"),
        ({"reselection_layer": 2}, "must come after selection_layer 2"),
        ({"budget": 1}, "budget"),
        ({"selection": "heads"}, "selection"),
        ({"reselection_layer": -1}, "reselection_layer"),
    ):
        with pytest.raises(RecipeError, match=message):
            load_recipe({"methods": [{"method": "tidaldecode", **bad}]})


def test_recipe_layers_are_checked_against_the_model():
    from attnkit.heads import ModelShape
    from attnkit.recipe import check_against_model

    recipe = load_recipe({"methods": [{"method": "tidaldecode", "reselection_layer": 40}]})
    with pytest.raises(RecipeError, match=r"methods\[0\]\.reselection_layer: layer 40 does not exist"):
        check_against_model(recipe, ModelShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128))


def test_gather_reads_the_same_rows_from_contiguous_and_strided_caches():
    """A DynamicCache is contiguous (rows read with index_select); a view into a preallocated buffer
    is not (gather): both give the selected rows."""
    buffer = torch.randn(2, 3, 40, 8, dtype=torch.float64)
    index = torch.randint(0, 30, (2, 3, 5))
    strided = buffer[:, :, :30]
    expected = torch.stack([torch.stack([buffer[b, h, index[b, h]] for h in range(3)]) for b in range(2)])
    for x in (strided, strided.contiguous()):
        assert torch.equal(gather_rows(x, Selection(index, 3, None)), expected)
