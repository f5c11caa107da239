"""Captured decoding (attnkit.decode): generate() through one replayed decode step.

On a CPU the captured step's computation runs in ``buffers`` mode (the same cache buffers, inputs
and length-reading kernel, under Triton's interpreter, without a graph); the graph itself is
checked on CUDA. Either way the tokens must be generate()'s own, on every architecture.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import pytest
import torch

import attnkit
from attnkit.decode import captured_decoding
from attnkit.engine.graphs import GraphError
from attnkit.methods import ACT, HeadMask, Razor, SnapKV, Streaming, TidalDecode
from attnkit.stats import Stats
from tests.factory import ARCHS, left_padded_batch, needs_triton, tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [12, 13, 14, 20]]
"""Two rows, left-padded: longer than the tiny models' sliding windows (6 and 8)."""
COMPILED = {
    "untouched": [],
    "head_mask": [HeadMask(heads={1: [1]}, scale=0.0)],
    "tidaldecode": [TidalDecode(budget=6, selection_layer=0, reselection_layer=1)],
    "razor": [Razor(heads={0: [0], 1: [1]}, local=2, sink=1)],
}
"""What the compiled-step tests run, in this order (the methods' handles come after a compilation)."""


def decoded(model, mode: str, new: int = 8, compile: bool = False, **kwargs) -> tuple[torch.Tensor, list[str]]:
    batch = left_padded_batch(PROMPTS, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(
            **batch,
            max_new_tokens=new,
            custom_generate=functools.partial(captured_decoding, mode=mode, compile=compile),
            **kwargs,
        )
    return out, [str(w.message) for w in caught if "attnkit" in str(w.message)]


def reference(model, new: int = 8, **kwargs) -> torch.Tensor:
    return model.generate(**left_padded_batch(PROMPTS, 0), max_new_tokens=new, **kwargs)


@needs_triton
@pytest.mark.parametrize("arch", ARCHS)
def test_buffers_mode_generates_what_generate_does(arch: str) -> None:
    """Every architecture (sliding windows, softcaps, q/k norms): the captured step's computation
    gives generate()'s greedy tokens on a left-padded batch, with no fallback."""
    model = tiny_model(arch, attn_implementation="eager" if arch == "gemma2-gqa" else "sdpa")
    out, said = decoded(model, "buffers", do_sample=False)
    assert said == []
    assert torch.equal(out, reference(model, do_sample=False))


@needs_triton
def test_buffers_mode_logits_match_a_full_recomputation() -> None:
    """The step's logits (not just the argmax) equal the model's logits for the whole sequence."""
    model = tiny_model("llama-gqa")
    batch = left_padded_batch(PROMPTS, 0)
    seen: list[torch.Tensor] = []

    def keep(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(scores.clone())
        return scores

    from transformers import LogitsProcessorList

    out = model.generate(
        **batch,
        max_new_tokens=5,
        do_sample=False,
        logits_processor=LogitsProcessorList([keep]),
        custom_generate=functools.partial(captured_decoding, mode="buffers"),
    )
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        full = model(input_ids=out, attention_mask=mask, position_ids=positions).logits
    prompt = batch["input_ids"].shape[1]
    for step, scores in enumerate(seen):
        torch.testing.assert_close(scores, full[:, prompt - 1 + step].float(), atol=1e-5, rtol=1e-5)


@needs_triton
def test_head_mask_is_replayed_and_counted_per_step() -> None:
    model = tiny_model("llama-gqa")
    methods = [HeadMask(heads={1: [0, 2]}, scale=0.0)]
    with attnkit.apply(model, methods) as handle:
        expected = reference(model, do_sample=False)
        before = handle.stats(total=True)["head_mask"]
        out, said = decoded(model, "buffers", do_sample=False)
        after = handle.stats(total=True)["head_mask"]
    assert said == [] and torch.equal(out, expected)
    assert after["phases"]["decode"] - before["phases"]["decode"] == 7  # 8 tokens: 1 from the prefill
    assert after["head_outputs_scaled"] - before["head_outputs_scaled"] == 8 * 2


@needs_triton
@pytest.mark.parametrize("selection", ["query_head", "kv_head_union", "kv_head_sum"])
@pytest.mark.parametrize("budget, recent", [(6, 0), (8, 2), (64, 0)])
def test_tidaldecode_is_replayed_with_the_eager_paths_tokens(selection: str, budget: int, recent: int) -> None:
    """TidalDecode's captured step selects on the device (every step alike, the budget unfilled on a
    short context) and the kernel gathers the chosen columns: the tokens of its eager gather path,
    a budget smaller than the context and one larger than it."""
    model = tiny_model("llama-gqa", num_hidden_layers=6)
    settings = dict(budget=budget, recent=recent, selection_layer=1, reselection_layer=3, selection=selection)
    with attnkit.apply(model, [TidalDecode(**settings)]) as handle:
        expected = reference(model, do_sample=False)
        before = handle.stats(total=True)["tidaldecode"]
        out, said = decoded(model, "buffers", do_sample=False)
        after = handle.stats(total=True)["tidaldecode"]
    assert said == [] and torch.equal(out, expected)
    assert after["decode_steps"] - before["decode_steps"] == 7
    assert after["selections"] - before.get("selections", 0) == 7 * 2  # on the device, every step


@needs_triton
@pytest.mark.parametrize(
    "method",
    [
        SnapKV(budget=6, window=2, kernel=1),
        Streaming(budget=6, sink=2),
        Razor(heads={0: [0], 1: [1]}, local=2, sink=1),
    ],
    ids=["snapkv", "streaming", "razor"],
)
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded"])
def test_a_compressed_cache_is_replayed(method, padded: bool) -> None:
    """snapkv and streaming keep one group of slots per layer, razor two (retrieval heads every
    token, the others sinks, a window and a compensation slot): the captured step reads each group's
    slots with their biases (a left-padded batch's empty slots, the compensation's count), then the
    new tokens, with the tokens of the eager compressed-cache path."""
    model = tiny_model("llama-gqa")
    batch = left_padded_batch(PROMPTS, 0) if padded else {"input_ids": torch.tensor([PROMPTS[0]])}
    with attnkit.apply(model, [method]):
        expected = model.generate(**batch, max_new_tokens=8, do_sample=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model.generate(
                **batch,
                max_new_tokens=8,
                do_sample=False,
                custom_generate=functools.partial(captured_decoding, mode="buffers"),
            )
    assert torch.equal(out, expected)


@needs_triton
@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-gqa"])
def test_act_fast_path_is_replayed_with_its_eager_tokens_and_logits(arch: str) -> None:
    """ACT's fast path on a captured step: the prefill's sinks at their own columns and the
    kernel's log-sum-exp give the eager fast path's tokens and logits (a sliding window drops old
    sinks). The tolerance is ACT's, not the kernel's: the correction divides by the non-sink mass,
    so the two paths' float32 rounding (the kernel's log-sum-exp against torch's sink logits) grows
    where a head's sink mass nears 1; both stay within 1e-3 of the float64 eager path here."""
    from transformers import LogitsProcessorList

    model = tiny_model(arch)
    seen: dict[str, list[torch.Tensor]] = {"eager": [], "buffers": []}

    def keeper(name: str):
        def keep(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            seen[name].append(scores.clone())
            return scores

        return LogitsProcessorList([keep])

    with attnkit.apply(model, [ACT()]) as handle:
        expected = reference(model, do_sample=False, logits_processor=keeper("eager"))
        before = handle.stats(total=True)["act"]
        out, said = decoded(model, "buffers", do_sample=False, logits_processor=keeper("buffers"))
        after = handle.stats(total=True)["act"]
    assert said == [] and torch.equal(out, expected)
    for eager, captured in zip(seen["eager"], seen["buffers"]):
        torch.testing.assert_close(captured, eager, atol=2e-3, rtol=0)
    assert before["sinks_found"] > 0
    assert after["layer_calls"] == 2 * before["layer_calls"]  # both runs: the prefill and 7 steps, every layer


@pytest.mark.parametrize(
    "methods, named",
    [
        ([ACT(heads={1: [0]}, path="eager")], "act"),
    ],
)
def test_a_method_replay_cannot_follow_decodes_eagerly_and_says_which(methods, named: str) -> None:
    model = tiny_model("llama-gqa")
    with attnkit.apply(model, methods):
        expected = reference(model, do_sample=False)
        out, said = decoded(model, "buffers", do_sample=False)
    assert torch.equal(out, expected)
    assert len(said) == 1 and named in said[0] and "decoding eagerly" in said[0]


def test_without_cuda_it_says_so_and_decodes_eagerly() -> None:
    model = tiny_model("llama-gqa")
    out, said = decoded(model, "graph", do_sample=False)
    assert torch.equal(out, reference(model, do_sample=False))
    if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        assert said == ["attnkit: decoding eagerly: captured decoding needs a CUDA device and Triton"]
    elif importlib.util.find_spec("triton") is None:
        assert said == ["attnkit: decoding eagerly: captured decoding needs Triton (pip install triton)"]


def test_sampling_draws_as_generate_does() -> None:
    model = tiny_model("llama-gqa")
    torch.manual_seed(3)
    expected = reference(model, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(3)
    out, _ = decoded(model, "eager", do_sample=True, top_k=20, temperature=0.8)
    assert torch.equal(out, expected)


def test_eos_finishes_a_row_with_padding() -> None:
    """A row that produced EOS gets the pad token afterwards, as generate() does."""
    model = tiny_model("llama-gqa")
    first = reference(model, new=3, do_sample=False)[:, -3:]
    eos = int(first[0, 0])
    expected = reference(model, do_sample=False, eos_token_id=eos)
    out, _ = decoded(model, "eager", do_sample=False, eos_token_id=eos)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (dict(num_beams=2), "num_beams=1"),
        (dict(return_dict_in_generate=True), "token ids only"),
    ],
)
def test_requests_it_cannot_serve_are_refused_with_the_fix(kwargs: dict, says: str) -> None:
    model = tiny_model("llama-gqa")
    with pytest.raises(GraphError, match=says):
        decoded(model, "graph", do_sample=False, **kwargs)


def test_the_model_is_left_as_it_was() -> None:
    """Without a handle, captured decoding applies an empty recipe for the generation and removes it."""
    model = tiny_model("llama-gqa")
    before = model.config._attn_implementation
    decoded(model, "eager", do_sample=False)
    assert model.config._attn_implementation == before
    assert attnkit.handle.active_handle(model) is None


def test_stats_repeat_a_recorded_call() -> None:
    stats = Stats()
    stats.describe("heads", 2)
    saved = stats.checkpoint()
    stats.begin_call("decode")
    stats.add("scaled", 3)
    call = stats.snapshot()
    stats.rollback(saved)
    assert stats.snapshot(total=True) == {"heads": 2, "calls": 0, "phases": {}}
    stats.repeat(call, times=4)
    assert stats.snapshot(total=True) == {"heads": 2, "calls": 4, "phases": {"decode": 4}, "scaled": 12}


def test_stats_repeat_recomputes_ratios() -> None:
    """A replayed call's ratio (TidalDecode's read_fraction) is recomputed from the summed counters,
    not summed itself."""
    stats = Stats()
    stats.begin_call("prefill")
    stats.add("read", 10)
    stats.add("cached", 10)
    stats.ratio("fraction", "read", "cached")
    saved = stats.checkpoint()
    stats.begin_call("decode")
    stats.add("read", 1)
    stats.add("cached", 4)
    stats.ratio("fraction", "read", "cached")
    call = stats.snapshot()
    stats.rollback(saved)
    stats.repeat(call, times=3)
    total = stats.snapshot(total=True)
    assert (total["read"], total["cached"]) == (13, 22)
    assert total["fraction"] == pytest.approx(13 / 22)
    assert stats.snapshot()["fraction"] == 0.25


def test_stats_repeat_a_call_further_into_the_sequence() -> None:
    """A replayed step runs one token later than the one before: counters declared to grow per
    token (keys of a growing cache) grow in the totals and in the last call, and ratios follow."""
    stats = Stats()
    saved = stats.checkpoint()
    stats.begin_call("decode")
    stats.add("cached", 100, per_token=4)
    stats.add("read", 10)
    stats.ratio("fraction", "read", "cached")
    call, growth = stats.snapshot(), stats.growth
    assert growth == {"cached": 4}
    stats.rollback(saved)
    stats.repeat(call, growth=growth, later=0)  # the captured step itself
    stats.repeat(call, times=3, growth=growth, later=1)  # the next three
    total, last = stats.snapshot(total=True), stats.snapshot()
    assert total["cached"] == 100 + 104 + 108 + 112 and total["read"] == 40
    assert last["cached"] == 112 and last["fraction"] == pytest.approx(10 / 112)
    assert total["fraction"] == pytest.approx(40 / 424)


def test_stats_repeat_a_call_recorded_ahead_of_its_replays() -> None:
    """A capture after a warm-up counts on lengths the warm-up moved on a token (``Replay`` starts
    ``later`` at minus its warm-ups): the first replay counts a token less than the capture did."""
    stats = Stats()
    saved = stats.checkpoint()
    stats.begin_call("decode")
    stats.add("cached", 104, per_token=4)  # recorded one token past the first replayed step
    call, growth = stats.snapshot(), stats.growth
    stats.rollback(saved)
    stats.repeat(call, growth=growth, later=-1)
    stats.repeat(call, times=2, growth=growth, later=0)
    assert stats.snapshot(total=True)["cached"] == 100 + 104 + 108
    assert stats.snapshot()["cached"] == 108


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-gqa", "gemma3-gqa"])
def test_graph_replay_generates_what_generate_does_on_cuda(arch: str) -> None:
    """The captured graph itself: same greedy tokens as generate(), head_mask counted per replay."""
    model = tiny_model(arch).cuda()
    methods = [HeadMask(heads={1: [1]}, scale=0.0)]
    batch = {k: v.cuda() for k, v in left_padded_batch(PROMPTS, 0).items()}
    with attnkit.apply(model, methods) as handle:
        expected = model.generate(**batch, max_new_tokens=12, do_sample=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback
            out = model.generate(**batch, max_new_tokens=12, do_sample=False, custom_generate=captured_decoding)
        stats = handle.stats()["head_mask"]
    assert torch.equal(out, expected)
    assert stats["phase"] == "decode" and stats["head_outputs_scaled"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["tidaldecode", "snapkv", "act", "razor", "streaming"])
def test_graph_replay_of_sparse_and_compressed_decoding_on_cuda(kind: str) -> None:
    """TidalDecode, ACT, razor and streaming (a left-padded batch) and snapkv (one row) through the
    captured graph: the tokens of their eager paths, no fallback, every replayed step counted."""
    model = tiny_model("llama-gqa", num_hidden_layers=6).cuda()
    if kind == "tidaldecode":
        methods = [TidalDecode(budget=6, selection_layer=1, reselection_layer=3)]
        batch = left_padded_batch(PROMPTS, 0)
    elif kind in ("act", "razor", "streaming"):
        methods = {
            "act": [ACT()],
            "razor": [Razor(heads={0: [0], 1: [1]}, local=2, sink=1)],
            "streaming": [Streaming(budget=6, sink=2)],
        }[kind]
        batch = left_padded_batch(PROMPTS, 0)
    else:
        methods = [SnapKV(budget=6, window=2, kernel=1)]
        batch = {"input_ids": torch.tensor([PROMPTS[0]])}
    batch = {k: v.cuda() for k, v in batch.items()}
    with attnkit.apply(model, methods) as handle:
        start = handle.stats(total=True)[kind]
        expected = model.generate(**batch, max_new_tokens=12, do_sample=False)
        middle = handle.stats(total=True)[kind]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model.generate(**batch, max_new_tokens=12, do_sample=False, custom_generate=captured_decoding)
        end = handle.stats(total=True)[kind]
        ratios = methods[0].stats.ratios
    assert torch.equal(out, expected)
    assert end["phases"]["decode"] - middle["phases"]["decode"] == 11
    # the replayed steps count what the eager ones did (TidalDecode's cached keys grow a token a step)
    counters = [k for k, v in end.items() if type(v) in (int, float) and k not in ratios and k != "calls"]
    assert {k: end[k] - middle.get(k, 0) for k in counters} == {k: middle[k] - start.get(k, 0) for k in counters}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", list(COMPILED))
def test_graph_replay_of_a_compiled_step_on_cuda(name: str) -> None:
    """The compiled step captured in the graph: generate()'s tokens, no fallback, steps counted."""
    model = tiny_model("llama-gqa", num_hidden_layers=6).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch(PROMPTS, 0).items()}
    with attnkit.apply(model, COMPILED[name]) as handle:
        expected = model.generate(**batch, max_new_tokens=12, do_sample=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="attnkit")
            loop = functools.partial(captured_decoding, compile=True)
            out = model.generate(**batch, max_new_tokens=12, do_sample=False, custom_generate=loop)
        stats = handle.stats(total=True)
    assert torch.equal(out, expected)
    if COMPILED[name]:
        assert stats[name]["phases"]["decode"] == 22


@needs_triton
@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-gqa"])
def test_compiled_step_generates_what_generate_does(arch: str) -> None:
    """torch.compile around attnkit's attention: generate()'s tokens, every method still acting at
    every step (a handle applied after an earlier compilation included: its hooks are seen)."""
    model = tiny_model(arch)
    for name, methods in COMPILED.items():
        if name in ("tidaldecode", "razor") and arch != "llama-gqa":  # Gemma 3's: one full-attention layer
            continue
        with attnkit.apply(model, methods) as handle:
            expected = reference(model, do_sample=False)
            out, said = decoded(model, "buffers", compile=True, do_sample=False)
            stats = handle.stats(total=True)
        assert said == [], name
        assert torch.equal(out, expected), name
        if methods:
            assert stats[name]["phases"]["decode"] == 14, name  # 7 decode steps each, eager and compiled


def test_a_streamer_handed_to_the_loop_sees_each_new_token() -> None:
    """generate() streams the prompt itself; the loop streams each new token as it is chosen, then
    ends the stream. (transformers 5.17-5.24 hand a custom loop no streamer from generate(); the
    README says so.)"""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    class Recorder:
        def __init__(self) -> None:
            self.seen: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.seen.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.ended = True

    model = tiny_model("llama-gqa")
    ids = torch.tensor([PROMPTS[0]])
    expected, got = Recorder(), Recorder()
    model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, streamer=expected)
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    captured_decoding(model, ids, LogitsProcessorList(), StoppingCriteriaList(), config, streamer=got, mode="eager")
    assert got.seen == expected.seen[1:] and got.ended


def test_task_decode_settings_pick_the_loop() -> None:
    """A task's `decode:` setting: eager (generate's own loop), captured, or compiled."""
    from attnkit.decode import decoding
    from attnkit.recipe.tasks import GenerateTask

    assert decoding("eager") == {}
    assert decoding("captured")["custom_generate"].keywords == {"compile": False}
    assert decoding("compiled")["custom_generate"].keywords == {"compile": True}
    assert GenerateTask(prompts=["hi"], decode="compiled").decode == "compiled"


def test_the_recipe_names_the_replayable_methods_the_registry_has() -> None:
    """The recipe's ``decode`` description lists what captured decoding replays by hand (the recipe
    layer sits below the methods and cannot read their registry): it must name every replayable
    method and no other."""
    from attnkit.methods import METHODS
    from attnkit.recipe.tasks import decode_field

    listed = decode_field().description.split("the untouched model, ")[1].split("; others")[0]
    names = {name.split(" ")[0].removesuffix("'s") for name in listed.split(", ")}
    replayable = {name for name, cls in METHODS.items() if cls.replayable is not False}  # act's: a property
    assert names == replayable, (names, replayable)
