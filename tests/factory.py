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

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
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

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="runs attnkit's Triton kernels on CPU tensors: needs Triton, in its interpreter (TRITON_INTERPRET=1, "
    "which conftest sets on a machine without a GPU; on a GPU the interpreter would fail on the CUDA tests)",
)
"""For tests that run attnkit's Triton kernels on CPU tensors, in Triton's interpreter (the CUDA
tests, marked otherwise, compile them)."""

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

#: Archs whose attention mask is (at least partly) a sliding window. To get the same weights
#: with the window effectively off (same layer types / RoPE), pass ``sliding_window=MAX_POS``.
#: Note their ``DynamicCache`` layers are ``DynamicSlidingWindowLayer``s keeping only the last
#: ``sliding_window - 1`` keys, so cached keys seen during decoding are not the full prefix.
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
    """Deterministic init, independent of transformers' own ``_init_weights``: values depend only
    on ``seed`` and the (sorted) parameter names and shapes, and are drawn in float32 whatever
    the model dtype."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            # Norm weights start at their architecture's neutral value (1, or 0 for Gemma's
            # ``x * (1 + w)`` norms); perturb them a little. q/k norms (Qwen3, Gemma 3) also get
            # ``QK_NORM_GAIN - 1`` added, which scales the normalised q/k by QK_NORM_GAIN either way.
            value = param.float() + 0.05 * noise
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                value += QK_NORM_GAIN - 1.0
        else:
            value = INIT_STD * noise
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                value *= QK_GAIN
            elif name.endswith("qkv_proj.weight"):
                # Phi-3 fused projection: rows [0, q) are q, [q, q+k) are k, the rest v.
                head_dim = cfg.hidden_size // cfg.num_attention_heads
                n_qk = (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim
                value[:n_qk] *= QK_GAIN
        param.copy_(value)


def tiny_model(
    arch: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> PreTrainedModel:
    """A tiny random causal LM in eval mode, with ``generation_config`` pad/bos/eos set.

    Weights depend only on ``seed`` and parameter names/shapes: the same for any
    ``attn_implementation``, and kept by shape-preserving overrides such as
    ``sliding_window=MAX_POS`` (so "llama-gqa" and "mistral-gqa" even share weights).
    ``dtype`` other than float32 gets the float32 values rounded. The global RNG is untouched.
    Gemma 2 raises ``ValueError`` for ``attn_implementation="sdpa"`` (see ``SUPPORTED_ATTN``).
    """
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    _init_weights(model, seed)
    model.generation_config = _generation_config(model.config)
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
    special = [config.pad_token_id, config.bos_token_id]
    special += config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    low = max([t for t in special if t is not None], default=-1) + 1
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


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread (restored afterwards). For models this small, extra
    threads only add sync overhead, and on a busy 2-core box (parallel pytest runs) the
    thread spinning made the factory tests ~3x slower (17.8s vs 6.6s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
