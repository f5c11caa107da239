"""Everything attnkit reads from transformers that is not a stable public API, in one place.

transformers renames keywords and moves helpers between releases (5.24 renamed the forward keyword
and output attribute ``past_key_values`` to ``cache``). attnkit supports every release from
``FLOOR`` to the newest, so each such name is read here once, and ``tests/test_compat.py`` checks
every entry on the releases CI installs (the floor and the newest). A rename is one edit here.

Rule for the rest of attnkit: import transformers' public classes (``DynamicCache``,
``AttentionInterface``, ``AutoModelForCausalLM``...) directly; anything else goes through here.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    sdpa_mask,
)
from transformers.masking_utils import create_causal_mask as _create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "AttentionInterface",
    "AttentionMaskInterface",
    "CACHE_KEYWORDS",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "DynamicLayer",
    "FLOOR",
    "Rotary",
    "TransformersChanged",
    "apply_rotary_pos_emb",
    "attn_implementation",
    "cache_argument",
    "cache_keyword",
    "call_cache",
    "causal_mask",
    "gguf_dequantized",
    "eager_attention_forward",
    "output_cache",
    "rotary",
    "sdpa_mask",
    "set_attn_implementation",
    "version",
]

FLOOR = "5.17.0"
"""The oldest transformers release attnkit supports (pyproject: ``transformers>=5.17``)."""

CACHE_KEYWORDS = ("cache", "past_key_values")
"""The names a model's forward has taken its KV cache under: ``cache`` from 5.24, ``past_key_values``
before (and still accepted, deprecated, after)."""


class TransformersChanged(RuntimeError):
    """The installed transformers does something attnkit does not recognise; the message names the fix."""

    def __init__(self, problem: str):
        super().__init__(
            f"{problem} (transformers {version()}; attnkit supports {FLOOR} and later and is tested on the "
            f"floor and the newest release at the time of its CI). Upgrade attnkit, or install a transformers "
            f"release it was tested with (pip install 'transformers=={FLOOR}'), and report this at attnkit's "
            "issue tracker"
        )


def version() -> str:
    return transformers.__version__


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model``'s forward takes its KV cache."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise TransformersChanged(
        f"{model_class.__name__}.forward takes none of {', '.join(CACHE_KEYWORDS)} for its KV cache"
    )


def cache_argument(model: torch.nn.Module, cache: Cache | None) -> dict[str, Any]:
    """``model(..., **cache_argument(model, cache))`` passes ``cache`` under the keyword ``model`` takes."""
    return {cache_keyword(model): cache}


def call_cache(kwargs: dict[str, Any]) -> Cache | None:
    """The KV cache a forward call was given, under any name it has had.

    A ``Cache`` under a name attnkit does not know is an error: attnkit would take every call
    for a prefill and its decode-time methods would silently act on the wrong thing.
    """
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    strays = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if strays:
        raise TransformersChanged(
            f"the model was called with its KV cache under {strays[0]!r}, a keyword attnkit does not know"
        )
    return None


def output_cache(output: Any) -> Cache | None:
    """The KV cache a model's forward (or ``generate``) returned, if any."""
    fields = output.keys() if hasattr(output, "keys") else ()
    for name in CACHE_KEYWORDS:
        if name in fields:
            # dict access: 5.24's ``past_key_values`` property would warn on every call
            return dict.__getitem__(output, name) if isinstance(output, dict) else getattr(output, name)
    return None


def eager_attention_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """The modeling file's own eager attention (some models add softcapping or sinks to it)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise TransformersChanged(f"the modeling module of {type(module).__name__} has no eager_attention_forward")
    return function


def apply_rotary_pos_emb(module: torch.nn.Module) -> Callable[..., Any] | None:
    """The modeling file's own RoPE application ``(q, k, cos, sin) -> (q, k)``; None where the file
    rotates some other way (Llama 4's complex ``apply_rotary_emb``, multimodal rope)."""
    return getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)


@dataclass(frozen=True)
class Rotary:
    """The rotary embedding a layer's queries and keys are rotated with: the model's own module
    (one per decoder), and the layer type it is called with where it keeps one set of frequencies
    per layer type (Gemma 3: local and global bases)."""

    module: torch.nn.Module
    layer_type: str | None = None

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [batch, n, rotary dims] in ``x``'s dtype for ``position_ids`` [batch, n], as the
        decoder computes the position embeddings it hands the layer (scaled variants included: yarn
        and longrope multiply both by their attention factor; partial rotary gives fewer dims)."""
        if self.layer_type is None:
            return self.module(x, position_ids)
        return self.module(x, position_ids, self.layer_type)


def rotary(model: torch.nn.Module, attention: torch.nn.Module) -> Rotary:
    """The rotary embedding of the layer whose attention module is ``attention``.

    transformers 5.17 through 5.24 compute cos and sin once per forward in the decoder's
    ``rotary_emb`` and hand them to every layer; Gemma 3's module takes the layer type
    (``config.layer_types[i]``) as a third argument and keeps one frequency set per type (5.17
    multiplies the frequencies by a matmul, 5.24 by broadcasting; the values agree). Raises
    ValueError, naming why, for a layer that rotates nothing: a model without RoPE (GraniteMoeHybrid
    with ``position_embedding_type`` unset), a NoPE layer (SmolLM3's, Llama 4's ``no_rope_layers``),
    or dynamic NTK RoPE, which re-scales every position with the sequence length.
    """
    config, layer = attention.config, attention.layer_idx
    name = type(model).__name__
    if not getattr(attention, "use_rope", True):
        raise ValueError(
            f"layer {layer} of {name} applies no rotary position embedding (RoPE): it is a NoPE layer "
            "(config.no_rope_layers); leave it out of the positions stage"
        )
    module = _rotary_module(model, config)
    if module is None:
        raise ValueError(
            f"{name} has no rotary position embedding (RoPE): the positions stage re-rotates queries "
            "and keys, so it needs a model that rotates them"
        )
    takes_type = "layer_type" in inspect.signature(module.forward).parameters
    layer_type = config.layer_types[layer] if takes_type else None
    rope_types = getattr(module, "rope_type", None)
    rope_type = rope_types.get(layer_type) if isinstance(rope_types, dict) else rope_types
    if rope_type == "dynamic":
        raise ValueError(
            f"{name} uses dynamic NTK RoPE, whose rotation of a position changes with the sequence "
            "length: a cached key cannot be re-positioned exactly"
        )
    return Rotary(module, layer_type)


def _rotary_module(model: torch.nn.Module, config: Any) -> torch.nn.Module | None:
    """The decoder's ``rotary_emb`` (None where it has none, as GraniteMoeHybrid without RoPE)."""
    for module in model.modules():
        if getattr(module, "config", None) is config and getattr(module, "rotary_emb", None) is not None:
            return module.rotary_emb
    return None


def causal_mask(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Cache | None = None,
) -> Any:
    """The mask the decoder builds for its full-attention layers (``masking_utils.create_causal_mask``)."""
    return _create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{_CAUSAL_MASK_CACHE: cache},
    )


_CAUSAL_MASK_CACHE = next(name for name in CACHE_KEYWORDS if name in inspect.signature(_create_causal_mask).parameters)
"""The keyword ``create_causal_mask`` takes its cache under (renamed with the model's in 5.24)."""


def attn_implementation(config: Any) -> str:
    """The attention implementation a (text) config runs, "eager" when unset."""
    return config._attn_implementation or "eager"


def set_attn_implementation(model: Any, config: Any, name: str) -> None:
    """Set the attention implementation of the part of ``model`` that ``config`` describes (the
    language model's sub-config of a multimodal model; its vision tower keeps its own)."""
    if config is model.config:
        model.set_attn_implementation(name)
        return
    key = next((k for k in getattr(model.config, "sub_configs", {}) if getattr(model.config, k, None) is config), None)
    if key is None:
        raise TransformersChanged(f"{type(model).__name__}: the text config is not one of the model's sub_configs")
    model.set_attn_implementation({key: name})


def gguf_dequantized(config: Any, model: Any = None) -> None:
    """Drop the quantisation flags of a GGUF-loaded config (and model): its weights arrive
    de-quantised to float, but transformers flags it as quantised (``config.quantization_config``,
    ``model.hf_quantizer``) and refuses to save it."""
    if model is not None:
        model.hf_quantizer = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
