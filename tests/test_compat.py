"""Every entry of attnkit.compat on the installed transformers (CI runs the floor and the newest).

Each test uses the name the way attnkit uses it, so a rename in transformers fails here, at the
entry, rather than deep inside a method.
"""

import warnings

import pytest
import torch
from packaging.version import Version
from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig, SmolLM3Config
from transformers.models.llama import modeling_llama

from attnkit import compat
from tests.factory import tiny_config, tiny_inputs, tiny_model


@pytest.fixture
def model():
    return tiny_model("llama-gqa")


def test_installed_release_is_supported():
    assert Version(compat.version()) >= Version(compat.FLOOR)


def test_cache_keyword_is_the_forward_keyword_and_the_call_grows_that_cache(model):
    keyword = compat.cache_keyword(model)
    assert keyword in compat.CACHE_KEYWORDS
    ids = tiny_inputs(model, length=8)["input_ids"]
    cache = compat.DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current keyword, not a deprecated one
        out = model(input_ids=ids[:, :6], use_cache=True, **compat.cache_argument(model, cache))
        out = model(input_ids=ids[:, 6:7], use_cache=True, **compat.cache_argument(model, cache))
    assert cache.get_seq_length() == 7
    assert compat.output_cache(out) is cache


def test_cache_keyword_refuses_a_forward_without_one():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids, kv=None):
            return input_ids

    with pytest.raises(compat.TransformersChanged, match="takes none of cache, past_key_values.*transformers 5"):
        compat.cache_keyword(NoCache())


def test_call_cache_reads_every_known_name_and_refuses_a_stray_cache(model):
    cache = compat.DynamicCache(config=model.config)
    for name in compat.CACHE_KEYWORDS:
        assert compat.call_cache({"input_ids": None, name: cache}) is cache
    assert compat.call_cache({"use_cache": True}) is None
    with pytest.raises(compat.TransformersChanged, match="'kv_cache', a keyword attnkit does not know"):
        compat.call_cache({"kv_cache": cache})


def test_output_cache_of_forward_and_generate(model):
    inputs = tiny_inputs(model, length=6)
    forward = model(**inputs, use_cache=True)
    assert isinstance(compat.output_cache(forward), compat.Cache)
    assert compat.output_cache(model(**inputs, use_cache=False)) is None
    generated = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
    assert compat.output_cache(generated).get_seq_length() == 7  # the last new token is not cached yet


def test_eager_attention_forward_is_the_modeling_files_own(model):
    module = model.model.layers[0].self_attn
    function = compat.eager_attention_forward(module)
    q = torch.randn(1, model.config.num_attention_heads, 3, model.config.head_dim)
    k = v = torch.randn(1, model.config.num_key_value_heads, 3, model.config.head_dim)
    output, weights = function(module, q, k, v, None, scaling=0.5, dropout=0.0)
    assert output.shape == (1, 3, model.config.num_attention_heads, model.config.head_dim)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, model.config.num_attention_heads, 3))

    class Stray(torch.nn.Module):
        pass

    with pytest.raises(compat.TransformersChanged, match="no eager_attention_forward"):
        compat.eager_attention_forward(Stray())


def test_attention_and_mask_function_tables():
    assert {"sdpa", "flash_attention_2"} <= set(compat.ALL_ATTENTION_FUNCTIONS.keys())
    assert {"sdpa", "eager"} <= set(compat.ALL_MASK_ATTENTION_FUNCTIONS.keys())

    def attend(*args, **kwargs):
        return None

    compat.AttentionInterface.register("attnkit_compat_probe", attend)
    compat.AttentionMaskInterface.register("attnkit_compat_probe", compat.sdpa_mask)
    assert compat.ALL_ATTENTION_FUNCTIONS["attnkit_compat_probe"] is attend
    assert compat.ALL_MASK_ATTENTION_FUNCTIONS["attnkit_compat_probe"] is compat.sdpa_mask


def test_sdpa_mask_and_causal_mask_keep_padding_out():
    config = tiny_config("llama-gqa")
    config._attn_implementation = "eager"
    padding = torch.tensor([[0, 0, 1, 1, 1]])
    embeds = torch.zeros(1, 5, config.hidden_size)
    mask = compat.causal_mask(config, embeds, padding, torch.arange(5)[None])
    assert mask.shape == (1, 1, 5, 5)
    keep = mask == 0
    assert not keep[0, 0, 4, :2].any() and keep[0, 0, 4, 2:].all() and not keep[0, 0, 2, 3]
    boolean = compat.sdpa_mask(
        batch_size=1, q_length=5, kv_length=5, attention_mask=padding.bool(), allow_is_causal_skip=False
    )
    assert torch.equal(boolean[0, 0, 4], torch.tensor([False, False, True, True, True]))


def test_cache_layers():
    model = tiny_model("gemma3-gqa")  # sliding and full layers
    out = model(**tiny_inputs(model, length=6), use_cache=True)
    layers = compat.output_cache(out).layers
    assert all(isinstance(layer, compat.CacheLayerMixin) for layer in layers)
    full = [layer for layer in layers if type(layer) is compat.DynamicLayer]
    assert full and all(layer.is_initialized and layer.keys.shape[-2] == 6 for layer in full)
    assert full[0].get_seq_length() == 6 and full[0].get_mask_sizes(1)[0] == 7


def test_attn_implementation_of_a_sub_config():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = tiny_config("llama-gqa")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=5))
    model.set_attn_implementation("sdpa")
    text_config = model.config.get_text_config()
    compat.set_attn_implementation(model, text_config, "eager")
    assert compat.attn_implementation(text_config) == "eager"
    assert compat.attn_implementation(model.config.vision_config) == "sdpa"
    with pytest.raises(compat.TransformersChanged, match="not one of the model's sub_configs"):
        compat.set_attn_implementation(model, tiny_config("llama-gqa"), "eager")


def test_gguf_dequantized_drops_the_quantisation_flags(model):
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = object()
    compat.gguf_dequantized(model.config, model)
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None


def test_the_floor_is_one_number_in_pyproject_ci_and_compat():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert (
        f'"transformers>={Version(compat.FLOOR).base_version.rsplit(".", 1)[0]}"'
        in (root / "pyproject.toml").read_text()
    )
    assert f"ATTNKIT_TRANSFORMERS=transformers=={compat.FLOOR}" in (root / ".ci/run").read_text()


def test_compressed_layer_implements_every_cache_layer_method():
    """A cache-layer method a new release adds to DynamicLayer must be implemented by attnkit's
    CompressedLayer too, or a compressed cache would run the plain layer's code on its groups."""
    from attnkit.engine.kvcache import CompressedLayer

    assert not CompressedLayer.__abstractmethods__
    plain = {name for name, value in vars(compat.DynamicLayer).items() if callable(value) and not name.startswith("_")}
    ours = {name for name, value in vars(CompressedLayer).items() if callable(value)}
    assert plain <= ours, f"CompressedLayer lacks {sorted(plain - ours)}"


YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [1.5] * 8}
ROTARY_VARIANTS = {
    "llama": ("llama-gqa", {}),
    "gemma3": ("gemma3-gqa", {}),  # sliding layers rotate with a local base, the full one a global base
    "phi3-partial": ("phi3-mha", {"partial_rotary_factor": 0.5}),
    "yarn": ("llama-gqa", {"rope_parameters": YARN}),
    "longrope": ("phi3-mha", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("variant", ROTARY_VARIANTS)
def test_rotary_gives_the_cos_and_sin_the_decoder_hands_each_layer(variant):
    arch, overrides = ROTARY_VARIANTS[variant]
    model = tiny_model(arch, **overrides)
    handed = {}

    def capture(module, args, kwargs):
        handed[module.layer_idx] = kwargs["position_embeddings"]

    attentions = [layer.self_attn for layer in model.model.layers]
    for attention in attentions:
        attention.register_forward_pre_hook(capture, with_kwargs=True)
    positions = torch.tensor([[3, 0, 90, 7, 41, 12]])  # past longrope's 64: its long factors
    with torch.no_grad():
        model(**tiny_inputs(model, length=6), position_ids=positions)
    for attention in attentions:
        rotary = compat.rotary(model, attention)
        cos, sin = rotary(torch.zeros(1), positions)
        assert torch.equal(cos, handed[attention.layer_idx][0]) and torch.equal(sin, handed[attention.layer_idx][1])
    if arch == "gemma3-gqa":
        types = [compat.rotary(model, attention).layer_type for attention in attentions]
        assert types == ["sliding_attention", "sliding_attention", "full_attention"]
    if variant == "phi3-partial":
        assert cos.shape[-1] == model.config.hidden_size // model.config.num_attention_heads // 2
    if variant in ("yarn", "longrope"):
        assert (cos**2 + sin**2).min() > 1.1  # the attention factor, squared


def test_rotary_refuses_a_layer_that_rotates_nothing():
    tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    granite = GraniteMoeHybridConfig(**tiny, layer_types=["attention"] * 2, num_local_experts=2, num_experts_per_tok=1)
    granite = AutoModelForCausalLM.from_config(granite)
    with pytest.raises(ValueError, match="GraniteMoeHybridForCausalLM has no rotary position embedding"):
        compat.rotary(granite, granite.model.layers[0].self_attn)
    smol = AutoModelForCausalLM.from_config(SmolLM3Config(**tiny, no_rope_layers=[1, 0], pad_token_id=0))
    assert compat.rotary(smol, smol.model.layers[0].self_attn).layer_type is None
    with pytest.raises(ValueError, match="layer 1 of SmolLM3ForCausalLM applies no rotary.*NoPE layer"):
        compat.rotary(smol, smol.model.layers[1].self_attn)
    dynamic = tiny_model("llama-gqa", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic NTK RoPE"):
        compat.rotary(dynamic, dynamic.model.layers[0].self_attn)


def test_apply_rotary_pos_emb_is_the_modeling_files_own(model):
    assert compat.apply_rotary_pos_emb(model.model.layers[0].self_attn) is modeling_llama.apply_rotary_pos_emb

    class Stray(torch.nn.Module):
        pass

    assert compat.apply_rotary_pos_emb(Stray()) is None
