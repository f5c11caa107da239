"""The positions stage on every tiny architecture, in float64: re-positioning equals the model run
at those position ids (prefill, extend and decode), query groups against a reference by hand,
padding, identity, removal, stats, and the refusals (no RoPE, another rotation, combinations)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, GraniteMoeHybridConfig, SmolLM3Config

import attnkit
from attnkit import compat
from attnkit.engine.positions import QueryGroup, Repositioning, own_positions
from attnkit.methods import ACT, Method
from attnkit.primitives import repeat_kv
from attnkit.recipe.methods import MethodConfig
from tests.factory import (
    ARCHS,
    SUPPORTED_ATTN,
    left_padded_batch,
    position_ids_from_mask,
    tiny_inputs,
    tiny_model,
)

YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [1.5] * 8}
VARIANTS = {
    **{arch: (arch, {}) for arch in ARCHS},
    "llama-yarn": ("llama-gqa", {"rope_parameters": YARN}),
    "llama-llama3": ("llama-gqa", {"rope_parameters": {**LLAMA3, "original_max_position_embeddings": 16}}),
    "phi3-partial": ("phi3-mha", {"partial_rotary_factor": 0.5}),
    # longrope: an attention factor (max_position_embeddings / 64 = 4) and long factors past 64
    "phi3-longrope": ("phi3-mha", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64}),
}
"""Every architecture, and the RoPE variants: scaled (yarn, llama3, longrope) and partial rotary."""

TABLE = torch.tensor([0, 5, 3, 9, 4, 12, 7, 8, 15, 16, 20, 21, 22, 30, 31, 40])
"""Position ids to move the tokens to: a permutation of the first tokens, then gaps."""


def model_of(variant: str) -> torch.nn.Module:
    arch, overrides = VARIANTS[variant]
    return tiny_model(arch, attn_implementation=SUPPORTED_ATTN[arch][0], dtype=torch.float64, **overrides)


def tolerance(model) -> float:
    """sdpa runs a float64 model in float64 (the RMSNorms round to float32, so most differences
    vanish: measured 0); the eager attention functions softmax in float32 (measured 9e-7)."""
    return 1e-11 if model.config._attn_implementation in ("sdpa", "attnkit") else 1e-5


def table_for(variant: str) -> torch.Tensor:
    """TABLE, moved past longrope's original 64 positions so every call uses its long factors."""
    return TABLE + 100 if variant == "phi3-longrope" else TABLE


class Repositioner(Method):
    """A test method: ``plan(call)`` on every layer (or ``layers``); counts the calls it re-positioned."""

    name, config_class = "repositioner", MethodConfig

    def __init__(self, plan, layers=None):
        super().__init__(MethodConfig(method="repositioner"))
        self.plan, self.layers = plan, layers

    def attach(self, at):
        for layer in self.layers if self.layers is not None else range(at.shape.num_layers):
            at.positions(layer, self.reposition)

    def reposition(self, call):
        plan = self.plan(call)
        self.stats.add("repositioned", plan is not None)
        return plan


def mapped(table: torch.Tensor):
    """Every query and key at ``table[its own position]``."""

    def plan(call):
        queries, keys = own_positions(call)
        return Repositioning([QueryGroup(table[queries], table[keys])])

    return plan


def identity(call):
    return Repositioning([QueryGroup(*own_positions(call))])


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def largest(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# The defining test: re-positioning equals the model run at those position ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_at_mapped_positions_equals_the_model_at_those_position_ids(variant):
    model, table = model_of(variant), table_for(variant)
    inputs = tiny_inputs(model, length=12)
    expected = logits(model, **inputs, position_ids=table[None, :12])
    with attnkit.apply(model, [Repositioner(mapped(table))]):
        moved = logits(model, **inputs)
    assert largest(moved, expected) < tolerance(model), largest(moved, expected)
    assert largest(moved, logits(model, **inputs)) > 1e-2, "the positions must matter"


def steps(model, ids, moved_to=None):
    """Logits of a prefill of 8 tokens, an extend of 3, then one-token decode steps, on one cache;
    the untouched model gets ``moved_to`` position ids and its own cache, the patched one neither
    (its first call makes the cache, the next calls are given it back)."""
    chunks = [(0, 8), (8, 11), *((t, t + 1) for t in range(11, ids.shape[1]))]
    cache = compat.DynamicCache(config=model.config) if moved_to is not None else None
    out = []
    with torch.no_grad():
        for start, end in chunks:
            kwargs = {"position_ids": moved_to[:, start:end]} if moved_to is not None else {}
            result = model(
                input_ids=ids[:, start:end],
                attention_mask=torch.ones(1, end),
                use_cache=True,
                **compat.cache_argument(model, cache),
                **kwargs,
            )
            cache = compat.output_cache(result)
            out.append(result.logits)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_extend_and_decode_steps_equal_the_model_at_those_position_ids(variant):
    """Decode steps read keys rotated by earlier calls (sliding-window layers keep only the last)."""
    model, table = model_of(variant), table_for(variant)
    ids = tiny_inputs(model, length=15)["input_ids"]
    expected = steps(model, ids, moved_to=table[None, :15])
    with attnkit.apply(model, [Repositioner(mapped(table))]) as handle:
        moved = steps(model, ids)
        assert handle.stats(total=True)["repositioner"]["phases"] == {"prefill": 1, "extend": 1, "decode": 4}
    for step, (a, b) in enumerate(zip(moved, expected, strict=True)):
        assert largest(a, b) < tolerance(model), (step, largest(a, b))


# ---------------------------------------------------------------------------------------------
# Query groups against a float64 reference written by hand
# ---------------------------------------------------------------------------------------------


def angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., n, frequencies]: position times frequency, rounded to float32 as transformers' rotary does."""
    return (positions[..., None].float() * inv_freq.float()).double()


def reference(query, key, own, at, inv_freq, scaling):
    """q·R(φ(key at) − φ(key own) − φ(query at) + φ(query own))·k by hand: the call's query and key
    (rotated at ``own``) seen at ``at``; positions [batch, heads, n]. The angle-free dims pass."""
    (own_q, own_k), (at_q, at_k) = own, at
    delta = (angles(at_k, inv_freq) - angles(own_k, inv_freq))[:, :, None] - (
        angles(at_q, inv_freq) - angles(own_q, inv_freq)
    )[:, :, :, None]  # [b, h, queries, keys, f]
    f = inv_freq.shape[0]
    q1, q2 = query[..., None, :f], query[..., None, f : 2 * f]  # [b, h, queries, 1, f]
    k1, k2 = key[..., None, :, :f], key[..., None, :, f : 2 * f]  # [b, h, 1, keys, f]
    turned = q1 * (k1 * delta.cos() - k2 * delta.sin()) + q2 * (k2 * delta.cos() + k1 * delta.sin())
    return (turned.sum(-1) + query[..., 2 * f :] @ key[..., 2 * f :].transpose(-1, -2)) * scaling


def inv_freq_of(model, layer):
    """The frequencies of the layer's rotary (test-only read of transformers' buffer names)."""
    rotary = compat.rotary(model, model.model.layers[layer].self_attn)
    return getattr(rotary.module, f"{rotary.layer_type}_inv_freq" if rotary.layer_type else "inv_freq")


@pytest.mark.parametrize(
    "variant,layer",
    [
        ("llama-gqa", 1),
        ("llama-yarn", 1),
        ("llama-llama3", 2),
        ("phi3-partial", 1),
        ("gemma3-gqa", 0),
        ("gemma3-gqa", 2),
    ],
)
def test_query_groups_with_per_head_positions_match_a_reference_by_hand(variant, layer):
    """Rows 0-3 at shifted query positions and per-head shuffled keys, rows 4-7 at per-head query
    positions and reversed keys, rows 8-11 in no group (their own positions)."""
    model = model_of(variant)
    heads = model.config.num_attention_heads
    seen = {}

    def plan(call):
        own_q, own_k = own_positions(call)
        queries, keys = own_q.shape[1], own_k.shape[1]
        rows = torch.zeros(3, 1, queries, dtype=torch.bool)
        for part in range(3):
            rows[part, :, 4 * part : 4 * part + 4] = True
        shuffled = torch.stack(
            [own_k[:, torch.randperm(keys, generator=torch.Generator().manual_seed(h))] + 3 * h for h in range(heads)],
            dim=1,
        )
        per_head_queries = 2 * own_q[:, None] + torch.arange(heads)[None, :, None]
        groups = [QueryGroup(own_q + 5, shuffled, rows[0]), QueryGroup(per_head_queries, own_k.flip(-1), rows[1])]
        seen.update(call=call, own=(own_q, own_k), groups=groups, rows=rows)
        return Repositioning(groups)

    class Spy(Repositioner):
        def attach(self, at):
            super().attach(at)
            at.score_edit(layer, lambda scores, call: seen.setdefault("scores", scores))

    with attnkit.apply(model, [Spy(plan, layers=[layer])]):
        logits(model, **tiny_inputs(model, length=12))
    call, scores = seen["call"], seen["scores"]
    query, key = call.query, repeat_kv(call.key, heads // call.key.shape[1])
    keep = call.mask[0, 0] == 0
    own = tuple(p[:, None].expand(-1, heads, -1) for p in seen["own"])
    inv_freq = inv_freq_of(model, layer)
    for group, rows in zip(seen["groups"], seen["rows"][:2], strict=True):
        at = tuple(p if p.dim() == 3 else p[:, None].expand(-1, heads, -1) for p in (group.queries, group.keys))
        expected = reference(query, key, own, at, inv_freq, call.scaling)
        got, want = scores[0][:, rows[0]], expected[0][:, rows[0]]
        assert largest(got[:, keep[rows[0]]], want[:, keep[rows[0]]]) < 1e-5  # float32 rotary tables: measured 1e-6
    untouched = seen["rows"][2][0]
    plain = (query @ key.transpose(-1, -2))[0][:, untouched] * call.scaling
    assert largest(scores[0][:, untouched][:, keep[untouched]], plain[:, keep[untouched]]) < 1e-12


# ---------------------------------------------------------------------------------------------
# Padding, identity, removal, stats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_single_rows(arch):
    model = model_of(arch)
    stretched = 2 * torch.arange(64) + 3
    seqs = [[5, 9, 17, 33, 4, 8, 21, 60, 7, 11], [12, 40, 3, 77, 15, 6]]
    batch = left_padded_batch(seqs, pad_id=model.config.pad_token_id)
    with attnkit.apply(model, [Repositioner(mapped(stretched))]):
        together = logits(model, **batch, position_ids=position_ids_from_mask(batch["attention_mask"]))[:, -1]
        alone = [logits(model, input_ids=torch.tensor([s]))[0, -1] for s in seqs]
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        one_by_one = [
            model.generate(input_ids=torch.tensor([s]), max_new_tokens=3, do_sample=False)[0, -3:] for s in seqs
        ]
    for row, single in enumerate(alone):
        assert largest(together[row], single) < 1e-10
    assert torch.equal(generated, torch.stack(one_by_one))


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_plan_is_close_to_untouched_and_removal_restores_exactly(arch):
    model = model_of(arch)
    inputs = tiny_inputs(model, batch=2, length=12)
    before = logits(model, **inputs)
    with attnkit.apply(model, [Repositioner(identity)]):
        same = logits(model, **inputs)
    assert largest(same, before) < tolerance(model)
    assert torch.equal(logits(model, **inputs), before)


def test_stats_count_calls_per_phase_and_a_hook_may_leave_calls_alone():
    model = model_of("llama-gqa")
    inputs = tiny_inputs(model, length=10)
    method = Repositioner(lambda call: identity(call) if call.state.phase == "prefill" else None)
    with attnkit.apply(model, [method]) as handle:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        total = handle.stats(total=True)["repositioner"]
    assert total["phases"] == {"prefill": 1, "decode": 3}
    assert total["repositioned"] == model.config.num_hidden_layers  # the prefill's layers only


def test_call_state_records_the_positions_of_the_call_and_of_every_cached_key():
    model = model_of("llama-gqa")
    batch = left_padded_batch([[5, 9, 17, 33], [12, 40]], pad_id=model.config.pad_token_id)
    seen = []
    with attnkit.apply(model, [Repositioner(lambda call: seen.append(call.state) or None, layers=[0])]):
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    prefill, decode = seen
    assert prefill.positions.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]  # generate's, counting real tokens
    assert decode.positions.tolist() == [[4], [2]]
    assert decode.key_positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
"""Other architectures, built from configs: they rotate differently or not at all."""


def refused(model, match, layers=None):
    with pytest.raises(ValueError, match=match):
        attnkit.apply(model, [Repositioner(identity, layers=layers)])
    assert model.config._attn_implementation != "attnkit"


def test_a_model_without_rope_is_refused_at_attach():
    config = GraniteMoeHybridConfig(**TINY, layer_types=["attention"] * 2, num_local_experts=2, num_experts_per_tok=1)
    assert config.position_embedding_type is None  # GraniteMoeHybrid leaves positions to its mamba layers
    refused(AutoModelForCausalLM.from_config(config), "GraniteMoeHybridForCausalLM has no rotary position embedding")


def test_a_nope_layer_is_refused_and_its_rope_layers_taken():
    model = AutoModelForCausalLM.from_config(SmolLM3Config(**TINY, no_rope_layers=[1, 0], pad_token_id=0)).double()
    refused(model, "layer 1 of SmolLM3ForCausalLM applies no rotary position embedding.*NoPE")
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    before = logits(model, input_ids=ids)
    with attnkit.apply(model, [Repositioner(identity, layers=[0])]):
        assert largest(logits(model, input_ids=ids), before) < 1e-11


def test_another_rotation_convention_and_dynamic_rope_are_refused():
    refused(AutoModelForCausalLM.from_config(CohereConfig(**TINY)), "otherwise than transformers' half-split RoPE")
    dynamic = tiny_model("llama-gqa", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    refused(dynamic, "dynamic NTK RoPE")


def test_combinations_the_stage_cannot_run_are_refused():
    model = model_of("llama-gqa")
    with pytest.raises(ValueError, match="layer 1: a positions method .* act on the same layer"):
        attnkit.apply(model, [Repositioner(identity, layers=[1]), ACT(heads={1: [0]}, threshold=0.08)])
    with pytest.raises(ValueError, match="layer 1 already has a positions method"):
        attnkit.apply(model, [Repositioner(identity, layers=[1]), Repositioner(identity, layers=[1])])
    with attnkit.apply(model, [Repositioner(identity, layers=[1]), ACT(heads={1: [0]}, threshold=0.08, path="eager")]):
        logits(model, **tiny_inputs(model))


def test_positions_of_the_wrong_shape_name_the_expected_one():
    model = model_of("llama-gqa")

    def short(call):
        queries, keys = own_positions(call)
        return Repositioning([QueryGroup(queries[:, 1:], keys)])

    with attnkit.apply(model, [Repositioner(short)]):
        with pytest.raises(
            ValueError, match=r"query positions of shape \(1, 7\): expected \[batch, 8\] or \[batch, 4, 8\]"
        ):
            logits(model, **tiny_inputs(model, length=8))


def test_a_cache_repeated_for_a_larger_batch_keeps_its_positions():
    """Cache.batch_repeat_interleave (the conflict task's shared prefix) repeats the rows' positions."""
    model = model_of("llama-gqa")
    prefix, tail = (
        tiny_inputs(model, batch=2, length=8)["input_ids"],
        tiny_inputs(model, batch=4, length=3)["input_ids"],
    )

    def run(moved):
        cache = compat.DynamicCache(config=model.config)
        with torch.no_grad():
            model(
                input_ids=prefix,
                attention_mask=torch.ones(2, 8),
                use_cache=True,
                **compat.cache_argument(model, cache),
                **({"position_ids": TABLE[None, :8]} if moved else {}),
            )
            cache.batch_repeat_interleave(2)
            return model(
                input_ids=tail,
                attention_mask=torch.ones(4, 11),
                use_cache=True,
                **compat.cache_argument(model, cache),
                **({"position_ids": TABLE[None, 8:11]} if moved else {}),
            ).logits

    expected = run(moved=True)
    with attnkit.apply(model, [Repositioner(mapped(TABLE))]):
        assert largest(run(moved=False), expected) < tolerance(model)


def test_a_cropped_cache_rewinds_the_positions_it_holds():
    """Cache.crop (assisted decoding, a benchmark rewinding) cuts what the stage keeps beside the
    cache: decoding again after a crop gives the same logits as the first time."""
    model = tiny_model("llama-gqa", attn_implementation="sdpa", dtype=torch.float64)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    shift = torch.arange(64) * 2 + 1
    with torch.no_grad(), attnkit.apply(model, [Repositioner(mapped(shift))]):
        out = model(input_ids=ids, use_cache=True)
        cache = compat.output_cache(out)
        given = compat.cache_argument(model, cache)
        steps = [model(input_ids=ids[:, i : i + 1], **given).logits for i in range(3)]
        cache.crop(-3)
        again = [model(input_ids=ids[:, i : i + 1], **given).logits for i in range(3)]
    for first, second in zip(steps, again, strict=True):
        assert torch.equal(first, second)
