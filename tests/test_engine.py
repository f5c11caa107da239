"""The engine on every tiny architecture: identity, head_mask, removal, batching, caching, stages."""

import contextlib
import warnings

import pytest
import torch

import attnkit
from attnkit import compat
from attnkit.engine import attention, plan
from attnkit.methods import ACT, HeadMask, Method, Razor, SinkRedistribute, SnapKV, Streaming
from attnkit.recipe.methods import MethodConfig
from attnkit.tasks.report import describe_stats
from tests.factory import ARCHS, SUPPORTED_ATTN, arch_attn_pairs, left_padded_batch, tiny_inputs, tiny_model


def model_of(arch):
    """The arch with its first supported backend (sdpa, or eager where sdpa is refused)."""
    return tiny_model(arch, attn_implementation=SUPPORTED_ATTN[arch][0])


MASK = {"method": "head_mask", "heads": {1: [0, 2], 2: [3]}, "scale": 0.0}


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def zero_columns(model, heads: dict[int, list[int]]):
    """The same model with the o_proj input columns of ``heads`` zeroed, by hand."""
    dim = (
        model.config.head_dim
        if getattr(model.config, "head_dim", None)
        else model.config.hidden_size // model.config.num_attention_heads
    )
    for layer, indices in heads.items():
        weight = model.model.layers[layer].self_attn.o_proj.weight
        for head in indices:
            weight.data[:, head * dim : (head + 1) * dim] = 0
    return model


@pytest.mark.parametrize("arch,backend", arch_attn_pairs())
def test_empty_recipe_is_bit_identical_and_removal_restores(arch, backend):
    model = tiny_model(arch, attn_implementation=backend)
    inputs = tiny_inputs(model, batch=2, length=14)
    before = logits(model, **inputs)
    with attnkit.apply(model, {"methods": []}) as handle:
        assert model.config._attn_implementation == backend  # nothing acts inside attention: the model's own runs
        assert torch.equal(logits(model, **inputs), before)
        with handle.routing():  # as a captured decode step routes it: attnkit's function, changing nothing
            assert model.config._attn_implementation.startswith("attnkit")
            assert torch.equal(logits(model, **inputs), before)
            with handle.routing():  # nested: the outer one keeps the routing
                pass
            assert model.config._attn_implementation.startswith("attnkit")
        assert model.config._attn_implementation == backend
        assert handle.stats() == {}
    assert model.config._attn_implementation == backend
    assert not plan.PLANS
    assert torch.equal(logits(model, **inputs), before)


class OperatorCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators dispatched: on a GPU, each is (at least) a kernel launch from the host."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-gqa", "gemma2-gqa"])
def test_an_empty_recipe_dispatches_no_operator_beyond_the_models_own(arch, padded):
    """Issue 17: an eager decode step is bound by the host, which launches a kernel per operator; an
    empty recipe adds none to a prefill or a decode step, and head_mask one multiply per masked layer."""
    model = model_of(arch)
    if padded:
        inputs = left_padded_batch([[5, 9, 17, 33, 8, 2], [12, 40, 7]], pad_id=model.config.pad_token_id)
    else:
        inputs = tiny_inputs(model, batch=1, length=8)

    def operators(recipe, routed=False):
        handle = attnkit.apply(model, recipe) if recipe is not None else None
        with handle or contextlib.nullcontext(), handle.routing() if routed else contextlib.nullcontext():
            with OperatorCount() as prefill, torch.no_grad():
                out = model(**inputs, use_cache=True)
            step = {"input_ids": out.logits[:, -1:].argmax(-1)}
            if padded:
                step["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            with OperatorCount() as decode, torch.no_grad():
                model(**step, **compat.cache_argument(model, compat.output_cache(out)), use_cache=True)
        return prefill.names, decode.names

    untouched = operators(None)
    assert operators({"methods": []}) == untouched
    assert operators({"methods": []}, routed=True) == untouched  # through attnkit's function too
    for routed in (False, True):
        masked = operators({"methods": [MASK]}, routed)
        for phase in (0, 1):
            extra = list(masked[phase])
            for name in untouched[phase]:
                extra.remove(name)
            assert extra == ["aten.mul.Tensor"] * len(MASK["heads"])


def test_attention_is_routed_only_where_a_method_acts_inside_it():
    """Head outputs are edited around attention (the output projection's input), so head_mask leaves
    the model its own attention function; a KV method compresses inside it, so it routes. Code that
    switches the implementation itself refuses either handle."""
    model = model_of("llama-gqa")
    with attnkit.apply(model, {"methods": [MASK]}) as handle:
        assert not handle.routed and model.config._attn_implementation == "sdpa"
        with handle.routing():
            pass
        with pytest.raises(RuntimeError, match="an attnkit handle is applied"):
            attention.untouched_implementation(model.config, "profiling")
    registered = compat.ALL_ATTENTION_FUNCTIONS["attnkit"], compat.ALL_MASK_ATTENTION_FUNCTIONS["attnkit"]
    with attnkit.apply(model, [Streaming(budget=6, sink=2)]) as handle:
        assert handle.routed and model.config._attn_implementation == "attnkit"
        # the same function objects each time it routes: a compiled step's guards on them hold
        assert (compat.ALL_ATTENTION_FUNCTIONS["attnkit"], compat.ALL_MASK_ATTENTION_FUNCTIONS["attnkit"]) == registered
        with handle.routing():
            assert model.config._attn_implementation == "attnkit"
        assert model.config._attn_implementation == "attnkit"
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch,backend", arch_attn_pairs())
def test_head_mask_equals_zeroed_output_columns(arch, backend):
    model = tiny_model(arch, attn_implementation=backend)
    inputs = tiny_inputs(model, batch=2, length=14)
    before = logits(model, **inputs)
    with attnkit.apply(model, {"methods": [MASK]}) as handle:
        masked = logits(model, **inputs)
        stats = handle.stats()["head_mask"]
    assert stats["heads"] == 3 and stats["head_outputs_scaled"] == 3
    assert not torch.allclose(masked, before, atol=1e-4), "masking three heads must change the logits"
    expected = logits(zero_columns(tiny_model(arch, attn_implementation=backend), {1: [0, 2], 2: [3]}), **inputs)
    torch.testing.assert_close(masked, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits(model, **inputs), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_mask_scale_one_is_identity(arch):
    model = model_of(arch)
    inputs = tiny_inputs(model, length=12)
    before = logits(model, **inputs)
    with attnkit.apply(model, [HeadMask(heads="all", scale=1.0)]) as handle:
        assert torch.equal(logits(model, **inputs), before)
        assert handle.stats()["head_mask"]["head_outputs_scaled"] == 4 * model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_single_rows(arch):
    model = model_of(arch)
    seqs = [[5, 9, 17, 33, 4, 8, 21, 60, 7, 11], [12, 40, 3, 77, 15, 6]]
    batch = left_padded_batch(seqs, pad_id=model.config.pad_token_id)
    with attnkit.apply(model, {"methods": [MASK]}):
        together = logits(model, **batch)[:, -1]
        alone = [logits(model, input_ids=torch.tensor([s]))[0, -1] for s in seqs]
    for row, single in enumerate(alone):
        torch.testing.assert_close(together[row], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache_matches_without(arch):
    model = model_of(arch)
    inputs = tiny_inputs(model, batch=1, length=8)
    with attnkit.apply(model, {"methods": [MASK]}) as handle:
        cached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
        assert handle.stats(total=True)["head_mask"]["calls"] == 12
    assert torch.equal(cached, uncached)


class Recorder(Method):
    """A test method that uses every stage and records what it saw."""

    name = "recorder"
    config_class = MethodConfig

    def __init__(self, layer=1, edit=None):
        super().__init__(MethodConfig(method="recorder"))
        self.layer, self.edit, self.seen = layer, edit, []

    def attach(self, at):
        at.score_edit(self.layer, self.on_scores)
        at.prob_edit(self.layer, self.on_probs)
        at.decode_step(self.layer, self.on_decode)
        at.post_prefill(lambda cache, state: self.seen.append(("prefill", tuple(cache.layers[self.layer].keys.shape))))

    def on_scores(self, scores, call):
        self.seen.append(("scores", call.state.phase, tuple(scores.shape)))
        return self.edit(scores) if self.edit else scores

    def on_probs(self, probs, call):
        self.seen.append(("probs", call.state.phase))
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        return probs

    def on_decode(self, call):
        self.seen.append(("decode", call.state.past_length))
        return call


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma2-gqa", "gemma3-gqa", "mistral-gqa"])
def test_stages_fire_in_order_and_identity_edits_match_backend(arch):
    model = model_of(arch)
    inputs = tiny_inputs(model, batch=1, length=10)
    before = logits(model, **inputs)
    recorder = Recorder(layer=1)
    with attnkit.apply(model, [recorder]):
        torch.testing.assert_close(logits(model, **inputs), before, rtol=1e-5, atol=1e-5)
        recorder.seen.clear()
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    kinds = [entry[0] for entry in recorder.seen]
    assert kinds[:3] == ["scores", "probs", "prefill"]
    kv_heads = model.config.num_key_value_heads
    assert recorder.seen[2][1][1] == kv_heads, "the cache holds KV heads, not repeated copies"
    assert ("decode", 10) in recorder.seen


def test_score_edit_masking_a_key_equals_padding_it_out():
    model = tiny_model("llama-gqa")
    ids = torch.tensor([[5, 9, 17, 33, 4, 8, 21, 60]])

    def drop_key_2(scores):
        scores = scores.clone()
        scores[..., 2] = torch.finfo(scores.dtype).min
        return scores

    layers = range(model.config.num_hidden_layers)

    class DropKey(Method):
        name, config_class = "drop_key", MethodConfig

        def __init__(self):
            super().__init__(MethodConfig(method="drop_key"))

        def attach(self, at):
            for layer in layers:
                at.score_edit(layer, lambda s, call: drop_key_2(s))

    with attnkit.apply(model, [DropKey()]):
        edited = logits(model, input_ids=ids)[0, -1]
    mask = torch.ones_like(ids)
    mask[0, 2] = 0
    position_ids = torch.arange(ids.shape[1])[None]
    expected = logits(model, input_ids=ids, attention_mask=mask, position_ids=position_ids)[0, -1]
    torch.testing.assert_close(edited, expected, rtol=1e-4, atol=1e-5)


def test_failed_attach_leaves_model_untouched():
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model)
    before = logits(model, **inputs)
    with pytest.raises(Exception, match="layer 7 does not exist, model has 3 layers"):
        attnkit.apply(model, [HeadMask(heads={0: [1]}), HeadMask(heads={7: [0]})])
    assert model.config._attn_implementation == "sdpa"
    assert not plan.PLANS
    assert all(not m.self_attn.o_proj._forward_pre_hooks for m in model.model.layers)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(logits(model, **inputs), before)


def test_second_apply_is_refused_and_remove_is_idempotent():
    model = tiny_model("llama-gqa")
    handle = attnkit.apply(model, [HeadMask(heads={0: [1]})])
    with pytest.raises(RuntimeError, match="already applied"):
        attnkit.apply(model, [HeadMask(heads={1: [1]})])
    handle.remove()
    handle.remove()
    assert "removed" in repr(handle)
    with attnkit.apply(model, []) as again:
        assert again.active


def test_attnkit_attention_without_handle_names_the_fix():
    model = tiny_model("llama-gqa")
    with attnkit.apply(model, []):
        pass
    model.set_attn_implementation("attnkit")
    with pytest.raises(RuntimeError, match="no attnkit handle is active"):
        model(**tiny_inputs(model))
    model.set_attn_implementation("sdpa")


def test_two_models_keep_separate_plans():
    a, b = tiny_model("llama-gqa"), tiny_model("qwen2-gqa")
    inputs = tiny_inputs(a)
    before_b = logits(b, **inputs)
    with attnkit.apply(a, [HeadMask(heads={0: [0]})]) as ha, attnkit.apply(b, []) as hb:
        assert torch.equal(logits(b, **inputs), before_b)
        logits(a, **inputs)
        assert ha.stats()["head_mask"]["head_outputs_scaled"] == 1
        assert hb.stats() == {}


# ---------------------------------------------------------------------------------------------
# Phases: every method that acts at decode sees decode steps as decode, whatever the cache keyword
# ---------------------------------------------------------------------------------------------

PHASE_METHODS = {
    "head_mask": lambda: HeadMask(heads={1: [0]}),
    "act": lambda: ACT(heads={1: [0, 2]}, threshold=0.08),
    "act_eager": lambda: ACT(heads={1: [0, 2]}, threshold=0.08, path="eager"),
    "var": lambda: SinkRedistribute(sink_dims=[0], tau=1.0, span={"start": 1, "end": 6}, first_layer=1),
    "snapkv": lambda: SnapKV(budget=8, window=2, kernel=3),
    "razor": lambda: Razor(heads={0: [0]}, sink=2, local=4, ratio=None),
    "streaming": lambda: Streaming(budget=8, sink=2),
}


@pytest.mark.parametrize("name", PHASE_METHODS)
def test_generate_steps_are_counted_per_phase(name):
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model, length=14)
    with torch.no_grad(), attnkit.apply(model, [PHASE_METHODS[name]()]) as handle:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        (label,) = handle.stats()
        assert handle.stats()[label]["phase"] == "decode"
        assert handle.stats(total=True)[label]["phases"] == {"prefill": 1, "decode": 3}


def test_both_cache_keywords_are_read_as_the_same_cache():
    """5.24 renamed the keyword to ``cache``; the old one still works there (deprecated) and attnkit
    reads both. Before 5.24 ``cache=`` is swallowed by the forward's kwargs: attnkit says so."""
    model = tiny_model("llama-gqa")
    ids = tiny_inputs(model, length=9)["input_ids"]
    with torch.no_grad(), attnkit.apply(model, [HeadMask(heads={1: [0]})]) as handle:
        if compat.cache_keyword(model) == "past_key_values":
            with pytest.raises(compat.TransformersChanged, match="takes its cache as 'past_key_values'"):
                model(input_ids=ids, use_cache=True, cache=compat.DynamicCache(config=model.config))
        for keyword in (compat.cache_keyword(model), "past_key_values"):
            cache = compat.DynamicCache(config=model.config)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model(input_ids=ids[:, :8], use_cache=True, **{keyword: cache})
                model(input_ids=ids[:, 8:], use_cache=True, **{keyword: cache})
            assert handle.stats()["head_mask"]["phase"] == "decode"
        assert handle.stats(total=True)["head_mask"]["phases"]["decode"] == 2


def test_a_cache_attnkit_cannot_see_raises_at_the_first_decode_step(monkeypatch):
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model, length=10)
    monkeypatch.setattr(compat, "call_cache", lambda kwargs: None)  # as if transformers renamed the keyword again
    with torch.no_grad(), attnkit.apply(model, [HeadMask(heads={1: [0]})]) as handle:
        with pytest.raises(
            compat.TransformersChanged,
            match=r"1-token call for a prefill after 0 cached tokens, but the cache the model returned holds 11.*transformers 5\.\d+.*Upgrade attnkit",
        ):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.stats(total=True)["head_mask"]["phases"] == {"prefill": 2}  # the second call was the first step


def test_a_cache_under_an_unknown_keyword_or_a_swapped_cache_raises(monkeypatch):
    model = tiny_model("llama-gqa")
    ids = tiny_inputs(model, length=10)["input_ids"]
    with torch.no_grad(), attnkit.apply(model, []):
        cache = compat.DynamicCache(config=model.config)
        with pytest.raises(compat.TransformersChanged, match="'kv_cache', a keyword attnkit does not know"):
            model(input_ids=ids, kv_cache=cache)
        decoy = compat.DynamicCache(config=model.config)
        monkeypatch.setattr(compat, "call_cache", lambda kwargs: decoy)
        with pytest.raises(compat.TransformersChanged, match="another KV cache"):
            model(input_ids=ids, use_cache=True)


# ---------------------------------------------------------------------------------------------
# Stats totals count from each apply
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: HeadMask(heads={1: [0, 2]}), lambda: SnapKV(budget=8, window=2, kernel=3)])
def test_totals_restart_when_one_method_object_is_applied_again(make):
    model = tiny_model("llama-gqa")
    inputs = tiny_inputs(model, length=14)
    method = make()
    totals = []
    for _ in range(2):
        with torch.no_grad(), attnkit.apply(model, [method]) as handle:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            totals.append(handle.stats(total=True)[method.label])
    assert totals[0] == totals[1]
    assert totals[0]["calls"] == 3 and totals[0]["phases"] == {"prefill": 1, "decode": 2}
    assert "calls=3 (prefill 1, decode 2)" in describe_stats(totals[0])


def test_one_method_object_serves_one_handle_at_a_time():
    first, second = tiny_model("llama-gqa"), tiny_model("llama-gqa")
    mask = HeadMask(heads={1: [0]})
    with attnkit.apply(first, [mask]):
        with pytest.raises(RuntimeError, match="already applied.*make a new method object"):
            attnkit.apply(second, [mask])
        assert second.config._attn_implementation == "sdpa" and not second._forward_hooks
    with pytest.raises(RuntimeError, match="twice in this list"):
        attnkit.apply(second, [mask, mask])
    with attnkit.apply(second, [mask]) as handle:  # free again once its handle was removed
        assert handle.active


class InputReader(Method):
    """Records what the layer-input stage hands over, per layer and phase."""

    name, config_class = "input_reader", MethodConfig

    def __init__(self, layers):
        super().__init__(MethodConfig(method="input_reader"))
        self.layers, self.seen = layers, []

    def attach(self, at):
        for layer in self.layers:
            at.layer_input(
                layer, lambda hidden, state, layer=layer: self.seen.append((layer, state.phase, hidden.clone()))
            )


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-gqa", "qwen3-gqa"])
def test_layer_input_stage_reads_each_layers_input_hidden_state(arch):
    """The stage sees exactly the residual stream entering the layer (hidden_states[layer]), at
    prefill and at decode steps, and changes nothing."""
    model = model_of(arch)
    inputs = tiny_inputs(model, length=10)
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True)
    reader = InputReader([0, 2])
    with torch.no_grad(), attnkit.apply(model, [reader]):
        out = model(**inputs)
        model(input_ids=inputs["input_ids"][:, -1:], **compat.cache_argument(model, compat.output_cache(out)))
    assert torch.equal(out.logits, expected.logits)
    prefill = [(layer, hidden) for layer, phase, hidden in reader.seen if phase == "prefill"]
    assert [layer for layer, _ in prefill] == [0, 2]
    for layer, hidden in prefill:
        assert torch.equal(hidden, expected.hidden_states[layer])
    assert [(layer, phase) for layer, phase, _ in reader.seen[2:]] == [(0, "decode"), (2, "decode")]
