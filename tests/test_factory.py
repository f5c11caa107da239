"""Sanity tests for the tiny-model factory (and for the transformers behaviour tests rely on)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.factory import (
    ARCHS,
    BOS_ID,
    EOS_ID,
    HEAD_DIM,
    MAX_POS,
    NUM_HEADS,
    NUM_LAYERS,
    PAD_ID,
    SLIDING_ARCHS,
    SUPPORTED_ATTN,
    arch_attn_pairs,
    left_padded_batch,
    position_ids_from_mask,
    tiny_config,
    tiny_inputs,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


PAIRS = arch_attn_pairs()
PAIR_IDS = [f"{a}-{i}" for a, i in PAIRS]


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------
# Configs / structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_config_shapes_and_special_ids(arch):
    cfg = tiny_config(arch)
    assert cfg.num_attention_heads == NUM_HEADS
    assert cfg.num_hidden_layers == NUM_LAYERS >= 3
    assert getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) == HEAD_DIM
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert max(PAD_ID, BOS_ID, EOS_ID) < cfg.vocab_size


def test_config_facts():
    kv = {a: tiny_config(a).num_key_value_heads for a in ARCHS}
    assert kv == {
        "llama-mha": 4,
        "llama-gqa": 2,
        "llama-mqa": 1,
        "qwen2-gqa": 2,
        "qwen3-gqa": 2,
        "mistral-gqa": 2,
        "gemma2-gqa": 2,
        "gemma3-gqa": 2,
        "phi3-mha": 4,
    }
    assert tiny_config("mistral-gqa").sliding_window == 8
    g2 = tiny_config("gemma2-gqa")
    assert g2.sliding_window == 8
    assert g2.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert g2.attn_logit_softcapping == 50.0 and g2.final_logit_softcapping == 30.0
    assert g2.query_pre_attn_scalar == 32
    g3 = tiny_config("gemma3-gqa")
    assert g3.sliding_window == 6
    assert set(g3.layer_types) == {"sliding_attention", "full_attention"}
    for a in ("llama-mha", "qwen2-gqa", "qwen3-gqa", "phi3-mha"):
        assert getattr(tiny_config(a), "sliding_window", None) is None
    # overrides pass through; layer pattern follows num_hidden_layers
    assert tiny_config("gemma3-gqa", num_hidden_layers=5).layer_types == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
    ]
    assert tiny_config("llama-gqa", num_key_value_heads=4).num_key_value_heads == 4
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_config("nope")


def test_model_classes():
    names = {a: type(tiny_model(a, attn_implementation="eager")).__name__ for a in ARCHS}
    assert names == {
        "llama-mha": "LlamaForCausalLM",
        "llama-gqa": "LlamaForCausalLM",
        "llama-mqa": "LlamaForCausalLM",
        "qwen2-gqa": "Qwen2ForCausalLM",
        "qwen3-gqa": "Qwen3ForCausalLM",
        "mistral-gqa": "MistralForCausalLM",
        "gemma2-gqa": "Gemma2ForCausalLM",
        "gemma3-gqa": "Gemma3ForCausalLM",
        "phi3-mha": "Phi3ForCausalLM",
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_modules_expose_o_proj_and_layer_idx(arch):
    model = tiny_model(arch, attn_implementation=SUPPORTED_ATTN[arch][0])
    layers = model.model.layers
    assert len(layers) == NUM_LAYERS
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        assert attn.layer_idx == i
        assert isinstance(attn.o_proj, nn.Linear)
        assert attn.o_proj.in_features == NUM_HEADS * HEAD_DIM
        assert attn.o_proj.out_features == model.config.hidden_size
    assert not model.training
    assert model.generation_config.pad_token_id == PAD_ID
    assert model.generation_config.bos_token_id == BOS_ID
    assert model.generation_config.eos_token_id == EOS_ID


def test_gemma2_is_eager_only_where_transformers_refuses_sdpa():
    # Releases before 5.24 accept sdpa for Gemma 2 and drop its logit softcap; later ones set
    # Gemma2PreTrainedModel._supports_sdpa = False. The factory tests it on eager only, the
    # backend that softcaps on every release.
    from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

    assert SUPPORTED_ATTN["gemma2-gqa"] == ("eager",)
    if Gemma2PreTrainedModel._supports_sdpa:
        assert tiny_model("gemma2-gqa", attn_implementation="sdpa").config._attn_implementation == "sdpa"
    else:
        with pytest.raises(ValueError, match="does not support"):
            tiny_model("gemma2-gqa", attn_implementation="sdpa")


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_deterministic_and_rng_neutral():
    state = torch.random.get_rng_state()
    a = tiny_model("qwen2-gqa", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "factory must not consume global RNG"
    b = tiny_model("qwen2-gqa", seed=3, attn_implementation="eager")
    c = tiny_model("qwen2-gqa", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert sa["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0  # qkv biases are random, not zero
    x1, x2 = tiny_inputs(a, batch=2, length=16, seed=5), tiny_inputs(a.config, batch=2, length=16, seed=5)
    assert torch.equal(x1["input_ids"], x2["input_ids"])
    assert x1["input_ids"].shape == (2, 16) and x1["attention_mask"].eq(1).all()
    assert (x1["input_ids"][:, 0] == BOS_ID).all() and (x1["input_ids"][:, 1:] > EOS_ID).all()


def test_left_padded_batch():
    batch = left_padded_batch([[5, 6, 7], [8]], pad_id=PAD_ID)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(batch["attention_mask"]).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_bf16():
    model = tiny_model("llama-gqa", dtype=torch.bfloat16)
    ref = tiny_model("llama-gqa")
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    w, w32 = model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, w32.to(torch.bfloat16))  # same values, rounded
    assert torch.isfinite(_logits(model, **tiny_inputs(model, length=16)).float()).all()


# ---------------------------------------------------------------------------------------------
# Forward behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_finite_and_sdpa_matches_eager(arch):
    models = {impl: tiny_model(arch, attn_implementation=impl) for impl in SUPPORTED_ATTN[arch]}
    inputs = tiny_inputs(models["eager"], batch=2, length=16)
    out = {impl: _logits(m, **inputs) for impl, m in models.items()}
    for impl, logits in out.items():
        assert logits.shape == (2, 16, models[impl].config.vocab_size)
        assert torch.isfinite(logits).all(), impl
        assert models[impl].config._attn_implementation == impl
    # Attention is genuinely non-uniform (so methods comparing attention mean something): row
    # entropy relative to a uniform distribution over the visible keys is well below 1 (with
    # HF's default-like init it is ~0.9; the factory's q/k gains bring it to ~0.4-0.6).
    with torch.no_grad():
        attn = torch.stack(models["eager"](**inputs, output_attentions=True).attentions)
    rows = attn[..., 1:, :]  # row 0 sees a single key
    entropy = -(rows * rows.clamp_min(1e-30).log()).sum(-1)
    uniform = (rows > 0).sum(-1).float().log()
    assert (entropy / uniform).mean() < 0.7
    if "sdpa" in out:
        torch.testing.assert_close(out["sdpa"], out["eager"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_sliding_window_is_active(arch):
    impl = SUPPORTED_ATTN[arch][0]
    windowed = tiny_model(arch, attn_implementation=impl)
    full = tiny_model(arch, attn_implementation=impl, sliding_window=MAX_POS)  # same weights
    window = windowed.config.sliding_window
    assert window < 16
    long, short = tiny_inputs(windowed, length=16), tiny_inputs(windowed, length=window)
    # Within the window both models are the same function ...
    torch.testing.assert_close(_logits(windowed, **short), _logits(full, **short), atol=1e-5, rtol=0)
    # ... beyond it they differ.
    diff = (_logits(windowed, **long) - _logits(full, **long)).abs()
    assert diff[0, :window].max() < 1e-5
    assert diff[0, -1].max() > 1e-3
    # And the eager attention weights show the window: the last query sees exactly `window` keys
    # in sliding layers, all 16 in full layers.
    eager = tiny_model(arch, attn_implementation="eager")
    with torch.no_grad():
        attn = eager(**long, output_attentions=True).attentions
    layer_types = getattr(eager.config, "layer_types", None) or ["sliding_attention"] * NUM_LAYERS
    for layer_type, a in zip(layer_types, attn):
        seen = int((a[0, :, -1] > 0).sum(-1).max())
        assert seen == (window if layer_type == "sliding_attention" else 16), (layer_type, seen)


@pytest.mark.parametrize(("arch", "impl"), PAIRS, ids=PAIR_IDS)
def test_left_padding_matches_unpadded(arch, impl):
    model = tiny_model(arch, attn_implementation=impl)
    a = tiny_inputs(model, length=7, seed=1)["input_ids"][0].tolist()
    b = tiny_inputs(model, length=13, seed=2)["input_ids"][0].tolist()  # longer than every window
    batch = left_padded_batch([a, b], pad_id=model.config.pad_token_id)
    alone = torch.stack([_logits(model, input_ids=torch.tensor([s]))[0, -1] for s in (a, b)])
    # As passed (positions 0..L-1 incl. pads; RoPE is relative so only rounding changes) ...
    torch.testing.assert_close(_logits(model, **batch)[:, -1], alone, atol=1e-5, rtol=0)
    # ... and with generate-style position ids that skip the pads.
    pos = position_ids_from_mask(batch["attention_mask"])
    torch.testing.assert_close(_logits(model, **batch, position_ids=pos)[:, -1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "impl"), PAIRS, ids=PAIR_IDS)
def test_generate_with_and_without_cache(arch, impl):
    model = tiny_model(arch, attn_implementation=impl)
    inputs = tiny_inputs(model, length=12)  # 12 + 5 tokens: crosses every sliding window
    runs = {
        use_cache: model.generate(
            **inputs,
            max_new_tokens=5,
            do_sample=False,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
        )
        for use_cache in (True, False)
    }
    assert runs[True].sequences.shape[1] > 12
    assert runs[True].sequences.tolist() == runs[False].sequences.tolist()
    torch.testing.assert_close(torch.stack(runs[True].scores), torch.stack(runs[False].scores), atol=1e-4, rtol=0)
