"""Left-padded batches in float64 and bfloat16 through every mask attnkit builds or casts.

A float64 model's additive mask holds finfo(float64).min, which is -inf once cast to float32: a
padding row whose keys are all masked then gives NaN, and the NaN reaches real tokens at the next
layer. Each path must keep masked entries finite, so a padded batch equals its rows run alone.
"""

import pytest
import torch

import attnkit
from attnkit.methods import ACT, SinkRedistribute
from tests.factory import left_padded_batch, position_ids_from_mask, tiny_model

PAD = 20
HEADS = {1: [0, 2], 2: [1, 3]}
ALL_LAYERS = {"layers": "0-2", "heads": "all"}
METHODS = {  # name -> (method on some heads, the same method on every layer)
    "act_eager": lambda heads: ACT(heads=heads, threshold=0.08, path="eager"),  # probability edit, eager math
    "act_fast": lambda heads: ACT(heads=heads, threshold=0.08, path="fast"),  # exact correction of the kernel output
    "var": lambda heads: SinkRedistribute(
        sink_dims=[0],
        tau=1.0,
        span={"start": 1, "end": 5},
        first_layer=1 if heads is HEADS else 0,
        except_last_layer=False,
    ),
}
# float64: the fast path's correction divides the kernel output's rounding error by the non-sink
# mass (1 - sink mass), which is small on these sharp tiny models: 7.7e-8 seen at PAD 20.
FLOAT64_TOLERANCE = {"act_eager": 1e-12, "act_fast": 1e-6, "var": 1e-12}


def rows_of(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    long = torch.randint(5, vocab, (PAD + 6,), generator=gen).tolist()
    return [long, long[:6]]


def run(model, method, rows):
    batch = left_padded_batch(rows, model.config.pad_token_id)
    with torch.no_grad(), attnkit.apply(model, [method]) as handle:
        together = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits
        fired = handle.stats()[method.label]
        alone = [model(input_ids=torch.tensor([seq])).logits[0] for seq in rows]
    return [together[row, -len(seq) :] for row, seq in enumerate(rows)], alone, fired


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-gqa", "mistral-gqa"])
def test_float64_left_padded_batch_equals_single_rows(arch, method, backend):
    heads = HEADS
    if backend == "eager":
        # transformers' own float64 eager kernel casts its mask to float32 and gives NaN on padded
        # rows; only layers attnkit computes itself can be checked, so every layer goes through it.
        if method == "act_fast":
            pytest.skip("the fast path runs transformers' eager kernel, NaN on padded float64 rows by itself")
        heads = ALL_LAYERS
    model = tiny_model(arch, attn_implementation=backend, dtype=torch.float64)
    together, alone, fired = run(model, METHODS[method](heads), rows_of(model.config.vocab_size))
    assert fired.get("layer_calls") or fired.get("rows_redistributed") or fired.get("span_tokens"), fired
    for row in range(2):
        assert torch.isfinite(together[row]).all(), f"row {row}: non-finite logits"
        torch.testing.assert_close(together[row], alone[row], rtol=0, atol=FLOAT64_TOLERANCE[method])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-gqa", "mistral-gqa"])
def test_bfloat16_left_padded_batch_is_as_close_to_single_rows_as_bfloat16_allows(arch, method, backend):
    """Batching may move a bfloat16 row no further than bfloat16 itself moves it from float32."""
    model = tiny_model(arch, attn_implementation=backend, dtype=torch.bfloat16)
    rows = rows_of(model.config.vocab_size)
    together, alone, _ = run(model, METHODS[method](HEADS), rows)
    _, alone32, _ = run(tiny_model(arch, attn_implementation=backend), METHODS[method](HEADS), rows)
    for row in range(2):
        assert torch.isfinite(together[row]).all(), f"row {row}: non-finite logits"
        bound = (alone[row].float() - alone32[row]).abs().max().item()
        assert (together[row].float() - alone[row].float()).abs().max().item() <= bound
