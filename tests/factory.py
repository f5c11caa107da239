"""Tiny random causal LMs across architectures, for fast deterministic tests.

Everything is built from configs in code (no hub access) with seeded random weights.
Shapes are tiny (hidden 64, 3 layers, 4 query heads of dim 16, vocab 128) so that a model
builds in a few milliseconds and a 16-token forward takes milliseconds.

Usage::

    from tests.factory import ARCHS, tiny_model, tiny_inputs

    model = tiny_model("llama-gqa", attn_implementation="eager")
    out = model(**tiny_inputs(model, length=16))
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

# --------------------------------------------------------------------------------------------
# Shared tiny shapes
# --------------------------------------------------------------------------------------------

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
NUM_LAYERS = 3
NUM_HEADS = 4
HEAD_DIM = 16
MAX_POS = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

#: Std of the normal init used for every Linear / Embedding weight (and every bias).
#: 0.02 (the HF default) gives near-uniform attention on a 64-wide model; 0.1 is not enough
#: either, so q/k projections get an extra factor (see ``QK_GAIN``).
INIT_STD = 0.1
#: Extra multiplier on q/k projection weights, so attention patterns are peaked rather than
#: uniform and comparisons between attention methods are meaningful.
QK_GAIN = 2.0
#: Same idea for archs with q/k RMSNorm (Qwen3, Gemma 3), where the projection scale is
#: normalised away: the q_norm/k_norm weights are set to about this value.
QK_NORM_GAIN = 1.5

#: Sliding windows (small enough to matter on 12-16 token inputs).
MISTRAL_WINDOW = 8
GEMMA2_WINDOW = 8
GEMMA3_WINDOW = 6

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=NUM_HEADS,
    head_dim=HEAD_DIM,
    max_position_embeddings=MAX_POS,
    initializer_range=INIT_STD,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
    attention_dropout=0.0,
)

# arch id -> (config class, arch-specific kwargs)
_SPECS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama-mha": (LlamaConfig, dict(num_key_value_heads=4)),
    "llama-gqa": (LlamaConfig, dict(num_key_value_heads=2)),
    "llama-mqa": (LlamaConfig, dict(num_key_value_heads=1)),
    # Qwen2 always has bias on q/k/v (not o).
    "qwen2-gqa": (Qwen2Config, dict(num_key_value_heads=2, use_sliding_window=False)),
    # Qwen3: per-head RMSNorm on q and k.
    "qwen3-gqa": (Qwen3Config, dict(num_key_value_heads=2, use_sliding_window=False)),
    # Mistral: one global sliding_window applied to every layer (mask + cache).
    "mistral-gqa": (MistralConfig, dict(num_key_value_heads=2, sliding_window=MISTRAL_WINDOW)),
    # Gemma 2: sliding/full alternating (layer 0 sliding, 1 full, 2 sliding), softcaps,
    # query_pre_attn_scalar != head_dim so scaling differs from 1/sqrt(head_dim).
    "gemma2-gqa": (
        Gemma2Config,
        dict(
            num_key_value_heads=2,
            sliding_window=GEMMA2_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=32,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
    # Gemma 3 text: sliding, sliding, full; q/k norm; separate local/global rope.
    "gemma3-gqa": (
        Gemma3TextConfig,
        dict(
            num_key_value_heads=2,
            sliding_window=GEMMA3_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=HEAD_DIM,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3-mha": (Phi3Config, dict(num_key_value_heads=4)),
}

ARCHS: list[str] = list(_SPECS)

#: Archs whose attention mask is (at least partly) a sliding window.
SLIDING_ARCHS: list[str] = ["mistral-gqa", "gemma2-gqa", "gemma3-gqa"]

#: Attention implementations each arch can run. Gemma 2 sets ``attn_logit_softcapping``,
#: which transformers' ``sdpa`` path refuses (``Gemma2PreTrainedModel._supports_sdpa = False``
#: and ``sdpa_attention_forward`` raises on ``softcap``), so it is eager-only.
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "eager")
SUPPORTED_ATTN: dict[str, tuple[str, ...]] = {
    arch: (("eager",) if arch == "gemma2-gqa" else ATTN_IMPLS) for arch in ARCHS
}


def arch_attn_pairs() -> list[tuple[str, str]]:
    """All supported (arch, attn_implementation) pairs, for ``pytest.mark.parametrize``."""
    return [(a, impl) for a in ARCHS for impl in SUPPORTED_ATTN[a]]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config for ``arch``; ``overrides`` are passed to the config constructor."""
    try:
        cls, specific = _SPECS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}") from None
    kwargs = {**_COMMON, **specific, **overrides}
    if cls is Phi3Config:
        kwargs.pop("head_dim", None)  # Phi-3 derives head_dim = hidden_size // num_attention_heads
    n_layers = kwargs["num_hidden_layers"]
    if "layer_types" in kwargs and kwargs["layer_types"] is not None and "layer_types" not in overrides:
        # Keep the default pattern valid if only num_hidden_layers was overridden.
        pattern = specific["layer_types"]
        kwargs["layer_types"] = [pattern[i % len(pattern)] for i in range(n_layers)]
    return cls(**kwargs)


def _generation_config(config: PretrainedConfig) -> GenerationConfig:
    return GenerationConfig(
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        do_sample=False,
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_weights(model: nn.Module, seed: int) -> None:
    """Deterministic init independent of transformers' own ``_init_weights``."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "norm" in name:
            # Norm weights start at their architecture's neutral value (1, or 0 for Gemma's
            # ``x * (1 + w)`` norms); perturb them a little. q/k norms (Qwen3, Gemma 3) also get
            # ``QK_NORM_GAIN - 1`` added, which scales the normalised q/k by QK_NORM_GAIN either way.
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.add_(QK_NORM_GAIN - 1.0)
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
            continue
        std = INIT_STD
        if name.endswith("weight") and any(p in name for p in ("q_proj", "k_proj")):
            std *= QK_GAIN
        param.copy_(torch.randn(param.shape, generator=gen) * std)
        if name.endswith("qkv_proj.weight"):
            # Phi-3 fused projection: rows [0, q) are q, [q, q+k) are k, rest v.
            cfg = model.config
            q = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
            k = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
            param[: q + k].mul_(QK_GAIN)


def tiny_model(
    arch: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> PreTrainedModel:
    """A tiny random causal LM in eval mode. Same ``(arch, seed, overrides)`` -> same weights,
    whatever ``attn_implementation`` or ``dtype``. Does not disturb the global RNG."""
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    _init_weights(model, seed)
    model.generation_config = _generation_config(model.config)
    model.to(dtype)
    return model.eval()


def _config_of(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    return model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config


def tiny_inputs(
    model_or_config: PreTrainedModel | PretrainedConfig,
    *,
    batch: int = 1,
    length: int = 12,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` (avoiding the pad/bos/eos ids, first token = bos) and an all-ones
    ``attention_mask``."""
    config = _config_of(model_or_config)
    gen = torch.Generator().manual_seed(seed)
    special = {config.pad_token_id, config.bos_token_id, config.eos_token_id} - {None}
    low = max(special) + 1 if special else 0
    ids = torch.randint(low, config.vocab_size, (batch, length), generator=gen)
    if config.bos_token_id is not None and length > 0:
        ids[:, 0] = config.bos_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def left_padded_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad ``seqs`` to a common length: ``input_ids`` and ``attention_mask`` (0 on pads)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (pads get 0), as ``generate`` computes them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)
