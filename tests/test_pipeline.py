"""A transformers pipeline inside `attnkit.apply`: the methods fire on the pipeline's calls, its text
is the model's own generate() under the same methods, and the model is untouched afterwards."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

import attnkit
from attnkit.methods import ACT, HeadMask, SnapKV
from tests.factory import tiny_model
from tests.test_tasks import char_tokenizer

PROMPT = "the cat sat on the mat and then the cat"


METHODS = {
    "head_mask+act": lambda: [HeadMask(heads={1: [0]}, scale=0.0), ACT(beta=0.4, heads={1: "all"})],
    "snapkv": lambda: [SnapKV(budget=16, window=4)],
}


def greedy(model, tok) -> str:
    ids = tok(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("recipe", METHODS)
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-gqa"])
def test_text_generation_pipeline_inside_apply(arch, recipe) -> None:
    torch.manual_seed(0)
    model, tok = tiny_model(arch), char_tokenizer()
    untouched = greedy(model, tok)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    with attnkit.apply(model, METHODS[recipe]()) as handle:
        [reply] = generator(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False)
        stats = handle.stats(total=True)
        direct = greedy(model, tok)
    assert reply["generated_text"] == direct
    first = next(iter(stats.values()))
    assert first["phases"] == {"prefill": 1, "decode": 5}  # the pipeline's one generate() call
    if "act" in stats:
        assert stats["act"]["heads"] > 0 and stats["head_mask"]["head_outputs_scaled"] > 0
    else:
        assert 0 < stats["snapkv"]["kv_bytes_after"] < stats["snapkv"]["kv_bytes_before"]
    [after] = generator(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False)
    assert after["generated_text"] == untouched == greedy(model, tok)
