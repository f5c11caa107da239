"""PINE against its float64 reference (``tests/pine_reference.py``), on tiny models of every kind.

A prompt is a prefix of 3 tokens, k segments of 2 to 6 tokens (each ``OPEN ... CLOSE``, so the
markers find every segment whole, the close marker included, and a permutation of the segments is a
permutation of the token runs), then a suffix of 3 tokens. Sliding-window architectures get a window
longer than every test sequence: PINE refuses a window shorter than the sequence (tested below).
"""

import functools
import importlib.util
import inspect
import itertools
import random
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig

import attnkit
from attnkit import compat, kernels
from attnkit.decode import captured_decoding
from attnkit.methods import HeadMask, Pine, SnapKV
from attnkit.methods.pine import Importance
from tests.factory import (
    ARCHS,
    SLIDING_ARCHS,
    SUPPORTED_ATTN,
    left_padded_batch,
    needs_triton,
    position_ids_from_mask,
    tiny_model,
)
from tests.pine_reference import ReferencePine, layout_of

OPEN, CLOSE = 3, 4
"""Marker token ids (the factory's pad, bos and eos are 0, 1, 2)."""
PREFIX = [1, 7, 8]
SUFFIX = [9, 10, 11]
CONTINUATION = [12, 40, 77, 5]
"""Tokens fed as decode steps after the prompt (fixed, so the method and the reference read the same)."""
WINDOW = 64
"""A sliding window longer than every test sequence (prompts of at most 26 tokens, then 16 generated)."""

VARIANTS = {
    **{arch: (arch, {}) for arch in ARCHS},
    "phi3-partial": ("phi3-mha", {"partial_rotary_factor": 0.5}),
    "llama-yarn": (
        "llama-gqa",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
}
"""Every architecture, and two RoPE variants: partial rotary, and yarn (cos and sin scaled)."""


def model64(variant: str, **overrides) -> torch.nn.Module:
    arch, extra = VARIANTS[variant]
    if arch in SLIDING_ARCHS:
        extra = {"sliding_window": WINDOW, **extra}
    return tiny_model(arch, attn_implementation=SUPPORTED_ATTN[arch][0], dtype=torch.float64, **{**extra, **overrides})


def exact_angles(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its rotary computing the angles position x frequency in float64.

    transformers' rotary computes them in float32 (then casts cos and sin to the model's dtype). PINE
    re-orders a reader's segments by rotating the query once per segment block, at the position
    difference, rather than the keys once per query (:class:`attnkit.engine.positions.QueryBlocks`):
    the same in exact arithmetic, but float32 tables of other positions round otherwise (measured up
    to 9e-7 on the logits). With float64 angles the method and the reference agree to the last bit.
    """
    module = model.model.rotary_emb

    def table(x, position_ids, prefix=""):
        inv_freq = getattr(module, f"{prefix}inv_freq")
        scaling = getattr(module, f"{prefix}attention_scaling")
        freqs = position_ids[..., None].double() * inv_freq.double()
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * scaling).to(x.dtype), (angles.sin() * scaling).to(x.dtype)

    if "layer_type" in inspect.signature(module.forward).parameters:  # Gemma 3: a table per layer type

        def forward(x, position_ids, layer_type=None):
            return table(x, position_ids, f"{layer_type}_")
    else:

        def forward(x, position_ids):
            return table(x, position_ids)

    module.forward = forward
    return model


def segments_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Segments of the given lengths (markers included), random content between the markers."""
    rng = random.Random(seed)
    return [[OPEN, *(rng.randrange(13, 128) for _ in range(n - 2)), CLOSE] for n in lengths]


def prompt(segments: list[list[int]], prefix=PREFIX, suffix=SUFFIX) -> tuple[list[int], list[int]]:
    """Token ids and segment ids (0 outside segments, 1..k inside) of prefix + segments + suffix."""
    ids, segment_ids = list(prefix), [0] * len(prefix)
    for number, segment in enumerate(segments, start=1):
        ids += segment
        segment_ids += [number] * len(segment)
    return ids + list(suffix), segment_ids + [0] * len(suffix)


LENGTHS = {2: [3, 5], 3: [4, 2, 6], 5: [5, 3, 6, 2, 4]}
"""Segment lengths (markers included) for k = 2, 3, 5: all different."""


def pine() -> Pine:
    return Pine(markers=[OPEN, CLOSE])


def logits(model, methods, **inputs):
    with torch.no_grad(), attnkit.apply(model, methods) as handle:
        return model(**inputs).logits, handle.stats()


def prefill_and_steps(model, methods, ids: list[int], steps=CONTINUATION, given=None):
    """[prefill logits [T, vocab], then the logits [vocab] of each one-token decode step on the cache
    the model returns], the stats of the prefill and of the last step. ``given``: segment ids for
    ``Pine.segments`` around the prefill."""
    out = []
    with torch.no_grad(), attnkit.apply(model, methods) as handle:
        if given is not None:
            with methods[0].segments(torch.tensor([given])):
                result = model(input_ids=torch.tensor([ids]), use_cache=True)
        else:
            result = model(input_ids=torch.tensor([ids]), use_cache=True)
        prefill_stats = handle.stats()
        out.append(result.logits[0])
        cache = compat.output_cache(result)
        for token in steps:
            result = model(input_ids=torch.tensor([[token]]), use_cache=True, **compat.cache_argument(model, cache))
            cache = compat.output_cache(result)
            out.append(result.logits[0, -1])
        return out, prefill_stats, handle.stats()


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def acted(stats: dict, at_prefill: bool) -> None:
    """The method's counters show it acted: segments found at prefill, queries re-ordered."""
    pine_stats = stats["pine"]
    if at_prefill:
        assert pine_stats.get("segments", 0) > 0, pine_stats
    reordered = {k: v for k, v in pine_stats.items() if "reorder" in k}
    assert reordered and all(v > 0 for v in reordered.values()), pine_stats


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_is_invariant_to_the_order_of_the_segments(variant):
    """Validates the reference: every permutation of 3 segments gives the same suffix logits, and
    PINE changes them (the test must move something)."""
    model = model64(variant)
    segments = segments_of(LENGTHS[3])
    suffixes = []
    for order in itertools.permutations(range(3)):
        ids, segment_ids = prompt([segments[s] for s in order])
        out, _ = logits(model, [ReferencePine(segment_ids)], input_ids=torch.tensor([ids]))
        suffixes.append(out[0, -len(SUFFIX) :])
        plain = model(input_ids=torch.tensor([ids])).logits[0, -len(SUFFIX) :]
        assert largest(plain, suffixes[-1]) > 1e-2
    for other in suffixes[1:]:
        assert largest(other, suffixes[0]) < 1e-9


@pytest.mark.parametrize("variant", ["llama-gqa", "gemma2-gqa", "gemma3-gqa", "phi3-partial"])
def test_reference_decode_steps_equal_its_prefill_over_the_same_tokens(variant):
    """Generated tokens are read like suffix tokens; the prefix is read as the model reads it."""
    model = model64(variant)
    ids, segment_ids = prompt(segments_of(LENGTHS[3]))
    steps, _, _ = prefill_and_steps(model, [ReferencePine(segment_ids)], ids)
    whole, _ = logits(model, [ReferencePine(segment_ids)], input_ids=torch.tensor([ids + CONTINUATION]))
    assert largest(steps[0], whole[0, : len(ids)]) < 1e-12
    for step, got in enumerate(steps[1:], start=len(ids)):
        assert largest(got, whole[0, step]) < 1e-9, step
    # The prefix is read as the model reads it. Gemma 2's own (eager) attention takes its softmax in
    # float32 even for a float64 model, the reference in float64: measured 4e-7 there.
    plain = model(input_ids=torch.tensor([ids])).logits[0]
    own = 1e-12 if model.config._attn_implementation == "sdpa" else 1e-6
    assert largest(steps[0][: len(PREFIX)], plain[: len(PREFIX)]) < own


def test_reference_layout_follows_the_reference_tokenizer():
    """``ps_call`` in the reference's tokenization_llama.py: segments right-aligned to E."""
    layout = layout_of([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0])
    assert (layout.prefix, layout.end, layout.lengths) == (3, 12, [3, 2, 4])
    assert layout.positions([0, 0, 0], 14).tolist() == [0, 1, 2, 9, 10, 11, 10, 11, 8, 9, 10, 11, 12, 13]
    assert layout.positions([2, 0, 5], 12).tolist() == [0, 1, 2, 7, 8, 9, 10, 11, 3, 4, 5, 6]
    assert layout_of([0, 1, 1, 0]) is None


# ---------------------------------------------------------------------------------------------
# The method against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("variant", VARIANTS)
def test_pine_equals_the_float64_reference_at_prefill_and_decode(variant, k):
    """Prefill logits at every position, then 4 decode steps; the rotary's angles in float64."""
    model = exact_angles(model64(variant))
    ids, segment_ids = prompt(segments_of(LENGTHS[k], seed=k))
    expected, _, _ = prefill_and_steps(model, [ReferencePine(segment_ids)], ids)
    got, prefill_stats, decode_stats = prefill_and_steps(model, [pine()], ids)
    acted(prefill_stats, at_prefill=True)
    acted(decode_stats, at_prefill=False)
    plain = model(input_ids=torch.tensor([ids])).logits[0]
    assert largest(expected[0], plain) > 1e-2, "the test must move something"
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert largest(a, b) < 1e-9, (step, largest(a, b))


def test_importance_is_exact_where_the_other_segments_underflow(monkeypatch):
    """Segment queries' importance comes from one unmasked softmax renormalised over the other
    segments; where a query's own segment outweighs them all past float64's range (query weights
    x300), that renormalisation has nothing left, and the masked softmax must be taken instead."""
    model = exact_angles(model64("llama-gqa"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(300)
    ids, segment_ids = prompt(segments_of(LENGTHS[5], seed=5))
    masked = []
    mask = Importance.mask
    monkeypatch.setattr(
        Importance, "mask", lambda self, name, visible: masked.append(name) or mask(self, name, visible)
    )
    expected, _, _ = prefill_and_steps(model, [ReferencePine(segment_ids)], ids)
    got, _, _ = prefill_and_steps(model, [pine()], ids)
    assert "segments" in masked, "the prompt must underflow, or this test proves nothing"
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert largest(a, b) < 1e-9, (step, largest(a, b))


@pytest.mark.parametrize("variant", VARIANTS)
def test_pine_equals_the_reference_with_the_models_own_rotary(variant):
    """The model's rotary as it is (float32 angles): the prefix's queries rotate at the same
    positions in both, exactly equal; the segments', suffix's and decode queries read each segment
    from a query rotated by that segment's move where the reference moves the segment's keys (see
    ``exact_angles``), equal up to the float32 tables: 1e-5 (measured up to 1.2e-6)."""
    model = model64(variant)
    ids, segment_ids = prompt(segments_of(LENGTHS[3], seed=3))
    expected, _, _ = prefill_and_steps(model, [ReferencePine(segment_ids)], ids)
    got, _, _ = prefill_and_steps(model, [pine()], ids)
    assert largest(got[0][: len(PREFIX)], expected[0][: len(PREFIX)]) < 1e-9
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert largest(a, b) < 1e-5, (step, largest(a, b))


@pytest.fixture
def fused_kernel(monkeypatch):
    """The positions stage through the fused kernel (Triton's interpreter on CPU); yields the
    number of kernel calls so far, so a test can see that the kernel ran."""
    calls = []
    kernel = kernels.block_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernels, "available", lambda query: True)
    monkeypatch.setattr(kernels, "block_attention", counted)
    return calls


@needs_triton
@pytest.mark.parametrize("variant", ["llama-gqa", "qwen3-gqa", "gemma3-gqa", "llama-mqa"])
def test_the_fused_kernel_equals_the_reference(variant, fused_kernel):
    """PINE through the fused block-rotated attention kernel: prefill and decode steps equal the
    reference, as the torch path does (head_dim 32: the kernel takes 32 to 256)."""
    model = exact_angles(model64(variant, head_dim=32))
    ids, segment_ids = prompt(segments_of(LENGTHS[3], seed=5))
    expected, _, _ = prefill_and_steps(model, [ReferencePine(segment_ids)], ids)
    got, _, _ = prefill_and_steps(model, [pine()], ids)
    assert len(fused_kernel) >= model.config.num_hidden_layers * (1 + len(CONTINUATION))
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert largest(a, b) < 1e-9, (step, largest(a, b))


@needs_triton
def test_the_fused_kernel_batches_left_padded_rows_as_single_ones(fused_kernel):
    model = exact_angles(model64("llama-gqa", head_dim=32))
    rows = [ROWS[0], ROWS[1], ROWS[3], ROWS[4]]
    batch = left_padded_batch(rows, pad_id=model.config.pad_token_id)
    with torch.no_grad(), attnkit.apply(model, [pine()]):
        together = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        assert fused_kernel
        for row, ids in enumerate(rows):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert largest(together[row, -len(ids) :], alone) < 1e-9, row
            single = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, -4:]
            assert torch.equal(generated[row], single), row


def test_segment_ids_given_in_python_equal_the_markers():
    """``Pine.segments``: segments without markers (plain tokens) equal the reference too."""
    model = exact_angles(model64("llama-gqa"))
    ids, segment_ids = prompt([[20, 21, 22], [30, 31], [40, 41, 42, 43]])
    expected, _, _ = prefill_and_steps(model, [ReferencePine(segment_ids)], ids)
    got, prefill_stats, _ = prefill_and_steps(model, [Pine()], ids, given=segment_ids)
    acted(prefill_stats, at_prefill=True)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert largest(a, b) < 1e-9, (step, largest(a, b))


# ---------------------------------------------------------------------------------------------
# Permutation invariance of the method
# ---------------------------------------------------------------------------------------------


def orders(k: int) -> list[tuple[int, ...]]:
    """Every order of 3 segments; the prompt order and 4 random ones of 5."""
    if k == 3:
        return list(itertools.permutations(range(3)))
    rng = random.Random(5)
    return [tuple(range(5)), *(tuple(rng.sample(range(5), 5)) for _ in range(4))]


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("arch", ARCHS)
def test_pine_is_invariant_to_the_order_of_the_segments(arch, k):
    model = model64(arch)
    segments = segments_of(LENGTHS[k], seed=10 + k)
    suffixes, generated = [], []
    with torch.no_grad(), attnkit.apply(model, [pine()]):
        for order in orders(k):
            ids, _ = prompt([segments[s] for s in order])
            inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            suffixes.append(model(**inputs).logits[0, -len(SUFFIX) :])
            generated.append(model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist())
    for order, suffix, tokens in zip(orders(k)[1:], suffixes[1:], generated[1:], strict=True):
        assert largest(suffix, suffixes[0]) < 1e-9, order
        assert tokens == generated[0], order
    plain = [model(input_ids=torch.tensor([prompt([segments[s] for s in o])[0]])).logits[0, -1] for o in orders(k)[:2]]
    assert largest(*plain) > 1e-3, "the untouched model must depend on the order"


# ---------------------------------------------------------------------------------------------
# Batches, identity, removal
# ---------------------------------------------------------------------------------------------

ROWS = [
    prompt(segments_of([4, 2, 6], seed=1))[0],
    prompt(segments_of([3, 5], seed=2), prefix=[1, 7], suffix=[9, 10, 11, 12])[0],
    [1, 7, 8, 20, 21, 22, 9, 10],  # no segment: left alone
    prompt(segments_of([5], seed=3))[0],  # one segment: left alone
    prompt(segments_of([2, 2, 3, 2, 3], seed=4), prefix=[1, 7, 8, 15], suffix=[9])[0],
]
"""Rows of a left-padded batch: different numbers and lengths of segments, prefixes and suffixes."""


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3-gqa", "gemma2-gqa", "gemma3-gqa", "phi3-mha", "mistral-gqa"])
def test_left_padded_batch_equals_single_rows(arch):
    model = model64(arch)
    batch = left_padded_batch(ROWS, pad_id=model.config.pad_token_id)
    # Rows 2 and 3 (fewer than two segments) are left alone: alone, the model's own attention reads
    # them; in the batch, the positions stage does, at their own positions. Gemma 2's own (eager)
    # attention takes its softmax in float32 even for a float64 model: measured 6e-7 there.
    alone_tolerance = 1e-9 if model.config._attn_implementation == "sdpa" else 1e-6
    with torch.no_grad(), attnkit.apply(model, [pine()]) as handle:
        together = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits
        acted(handle.stats(), at_prefill=True)
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, -6:]
        for row, ids in enumerate(ROWS):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            tolerance = alone_tolerance if row in (2, 3) else 1e-9
            assert largest(together[row, -len(ids) :], alone) < tolerance, row
            single = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, -6:]
            assert torch.equal(generated[row], single), row
    for row in (2, 3):  # rows with fewer than two segments are the untouched model's
        plain = model(input_ids=torch.tensor([ROWS[row]])).logits[0]
        assert largest(together[row, -len(ROWS[row]) :], plain) < alone_tolerance


@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_without_two_segments_are_bit_identical_and_removal_restores(arch):
    window = {"sliding_window": WINDOW} if arch in SLIDING_ARCHS else {}
    model = tiny_model(arch, attn_implementation=SUPPORTED_ATTN[arch][0], **window)  # float32: bit for bit
    prompts = {
        "no segment": [1, 7, 8, 20, 21, 22, 9, 10],
        "one segment": prompt(segments_of([5]))[0],
        "two segments": prompt(segments_of([3, 4]))[0],
    }
    with torch.no_grad():
        before = {name: model(input_ids=torch.tensor([ids])).logits for name, ids in prompts.items()}
        with attnkit.apply(model, [pine()]) as handle:
            for name in ("no segment", "one segment"):
                assert torch.equal(model(input_ids=torch.tensor([prompts[name]])).logits, before[name]), name
                assert not any(v for k, v in handle.stats()["pine"].items() if "reorder" in k), name
            moved = model(input_ids=torch.tensor([prompts["two segments"]])).logits
            acted(handle.stats(), at_prefill=True)
            assert largest(moved, before["two segments"]) > 1e-3
        with attnkit.apply(model, [Pine()]):  # no markers and no segment ids given: nothing to do
            assert torch.equal(model(input_ids=torch.tensor([prompts["two segments"]])).logits, before["two segments"])
        for name, ids in prompts.items():
            assert torch.equal(model(input_ids=torch.tensor([ids])).logits, before[name]), name
    assert model.config._attn_implementation == SUPPORTED_ATTN[arch][0]


# ---------------------------------------------------------------------------------------------
# Refusals and composition
# ---------------------------------------------------------------------------------------------


def test_a_model_without_rope_is_refused():
    config = GraniteMoeHybridConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        layer_types=["attention"] * 2,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="GraniteMoeHybridForCausalLM has no rotary position embedding"):
        attnkit.apply(model, [pine()])
    assert model.config._attn_implementation != "attnkit"


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_a_sliding_window_shorter_than_the_sequence_is_refused(arch):
    model = tiny_model(arch, attn_implementation=SUPPORTED_ATTN[arch][0], sliding_window=12)
    short, _ = prompt(segments_of([2, 2]), suffix=[9])  # 8 tokens: in the window
    long, _ = prompt(segments_of(LENGTHS[3]))  # 18 tokens
    with torch.no_grad(), attnkit.apply(model, [pine()]):
        model(input_ids=torch.tensor([short]))
        with pytest.raises(ValueError, match=r"sliding-window.* 12 tokens.* 18"):
            model(input_ids=torch.tensor([long]))


def test_composing_with_a_kv_method_on_the_same_layers_is_refused():
    model = model64("llama-gqa")
    with pytest.raises(ValueError, match="positions method .* KV-compression"):
        attnkit.apply(model, [pine(), SnapKV(budget=8, window=2, kernel=3)])
    assert model.config._attn_implementation == "sdpa"


def test_composes_with_head_mask():
    """Both fire: PINE with heads 0 and 2 of layer 1 removed equals the reference with them removed."""
    model = exact_angles(model64("llama-gqa"))
    ids, segment_ids = prompt(segments_of(LENGTHS[3]))
    heads = {1: [0, 2]}
    alone, _, _ = prefill_and_steps(model, [pine()], ids)
    got, prefill_stats, decode_stats = prefill_and_steps(model, [pine(), HeadMask(heads=heads)], ids)
    expected, _, _ = prefill_and_steps(model, [ReferencePine(segment_ids), HeadMask(heads=heads)], ids)
    acted(prefill_stats, at_prefill=True)
    acted(decode_stats, at_prefill=False)
    assert largest(got[0], alone[0]) > 1e-3
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert largest(a, b) < 1e-9, (step, largest(a, b))


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA")
@pytest.mark.parametrize("lengths", [[40, 90], [30, 17, 64, 25, 50]])
def test_on_cuda_the_fused_kernel_equals_the_torch_path(lengths, monkeypatch):
    """The compiled kernel (not the interpreter) against the torch path, float32 on the GPU:
    prefill and decode steps of a left-padded batch, head_dim 128."""
    model = tiny_model("llama-gqa", dtype=torch.float32, head_dim=128).cuda()
    rows = [prompt(segments_of(lengths, seed=7))[0], prompt(segments_of(lengths[:2], seed=8))[0]]
    batch = {k: v.cuda() for k, v in left_padded_batch(rows, pad_id=model.config.pad_token_id).items()}
    results, calls, kernel = [], [], kernels.block_attention
    monkeypatch.setattr(kernels, "block_attention", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    for fused in (True, False):
        monkeypatch.setattr(kernels, "available", lambda query, fused=fused: fused and query.is_cuda)
        with torch.no_grad(), attnkit.apply(model, [pine()]):
            out = model.generate(
                **batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            results.append(torch.stack(out.logits))
    assert len(calls) == model.config.num_hidden_layers * 5
    assert largest(*results) < 1e-3, largest(*results)


@needs_triton
@pytest.mark.parametrize(
    "variant, compile",
    [("llama-gqa", False), ("llama-yarn", False), ("gemma3-gqa", False), ("qwen3-gqa", False), ("llama-gqa", True)],
)
def test_captured_decoding_reads_the_segments_as_the_eager_steps_do(variant, compile, fused_kernel):
    """Captured decoding's step (``buffers`` mode: the same computation without a graph): PINE's
    order and attention on the device over the fixed-capacity cache give the eager path's tokens on
    a left-padded batch (a row without two segments in it), and every step is counted; with the
    model's own code compiled around it too."""
    model = exact_angles(model64(variant, head_dim=32))
    rows = [ROWS[0], ROWS[3], ROWS[4]]
    batch = left_padded_batch(rows, pad_id=model.config.pad_token_id)
    loop = functools.partial(captured_decoding, mode="buffers", compile=compile)
    with torch.no_grad(), attnkit.apply(model, [pine()]) as handle:
        eager = model.generate(**batch, max_new_tokens=6, do_sample=False)
        before = len(fused_kernel)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="attnkit")
            sequences = model.generate(**batch, max_new_tokens=6, do_sample=False, custom_generate=loop)
        stats = handle.stats()["pine"]
    assert len(fused_kernel) - before >= model.config.num_hidden_layers * 6  # the prefill and 5 steps
    assert torch.equal(sequences, eager)
    assert stats["phase"] == "decode" and stats["reordered_queries"] == 2


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA")
def test_on_cuda_captured_decoding_replays_pine():
    """The CUDA graph itself: PINE's decode steps replayed give the eager path's tokens, no fallback."""
    model = tiny_model("llama-gqa", dtype=torch.float32, head_dim=128).cuda()
    rows = [prompt(segments_of([40, 90], seed=7))[0], prompt(segments_of([30, 17, 64], seed=8))[0]]
    batch = {k: v.cuda() for k, v in left_padded_batch(rows, pad_id=model.config.pad_token_id).items()}
    with torch.no_grad(), attnkit.apply(model, [pine()]) as handle:
        eager = model.generate(**batch, max_new_tokens=12, do_sample=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="attnkit")
            captured = model.generate(**batch, max_new_tokens=12, do_sample=False, custom_generate=captured_decoding)
        decode_steps = handle.stats(total=True)["pine"]["phases"]["decode"]
    assert torch.equal(captured, eager)
    assert decode_steps == 22
