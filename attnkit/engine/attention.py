"""The one attention function attnkit registers with transformers, and its mask function.

Both dispatch through a plan looked up by the attention module's config: layers no method
touches call the model's own backend (sdpa, eager, flash) with exactly the arguments they were
given, so they stay bit-identical and fast. Touched layers run their stages in the fixed order
that ``docs/architecture.md`` tabulates: decode-step reads -> scores (re-positioned where a
positions stage asks) -> score edits -> softmax -> probability edits -> values -> output
corrections -> KV compression.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnkit import compat, kernels
from attnkit.engine.graphs import GraphError, graph_attention
from attnkit.engine.kvcache import CompressedLayer, attend
from attnkit.engine.plan import PLANS, AttentionCall, LayerPlan, plan_for
from attnkit.engine.state import shared
from attnkit.primitives import additive_mask, layer_window, repeat_kv

NAME = "attnkit"


def registered_name(backend: str) -> str:
    """The name under which attnkit stands in for ``backend``.

    transformers switches code paths on the implementation's name (varlen batching for names that
    contain "flash"), so attnkit keeps the backend's name visible in its own.
    """
    return NAME if "flash" not in backend else f"{NAME}_{backend}"


def register(backend: str) -> str:
    """Register the attnkit attention and mask functions for a model whose backend is ``backend``."""
    name = registered_name(backend)
    attention, mask = registered_functions()
    compat.AttentionInterface.register(name, attention)
    compat.AttentionMaskInterface.register(name, mask)
    return name


@functools.cache
def registered_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The attention and mask functions :func:`register` registers: made once, so that registering
    again (every apply, every captured step's ``Handle.routing()``) leaves transformers the same
    objects, and a compiled model's guards on them hold. Where torch.compile compiles the model,
    they (their Python-side plans, call state, stats and Triton kernels) run as they are, between
    the compiled graphs of the model's code."""
    return torch.compiler.disable(attnkit_attention), torch.compiler.disable(attnkit_mask)


def untouched_implementation(config: Any, doing: str) -> str:
    """The attention implementation of a model that no attnkit handle is applied to, for code that
    switches it itself (profilers, inspection); raises if a handle is applied."""
    original = compat.attn_implementation(config)
    if original.startswith(NAME) or id(config) in PLANS:  # a handle whose methods leave attention routed or not
        raise RuntimeError(
            f"an attnkit handle is applied to this model (attention {original!r}); remove it (handle.remove()) before "
            f"{doing}"
        )
    return original


def backend_function(name: str) -> Callable[..., Any] | None:
    """The backend's attention function; None for eager, which is resolved per module."""
    return None if name == "eager" else compat.ALL_ATTENTION_FUNCTIONS[name]


def attnkit_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """Build the mask the model's own backend expects, so untouched layers get exactly their input.
    None on a captured-decoding step: its kernel reads lengths and padding from the device."""
    plan = plan_for(config)
    if plan.state is not None and plan.state.graph is not None:
        return None
    return plan.mask_fn(*args, config=config, **kwargs)


def attnkit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention signature: query [b, h, q, d], key/value [b, kvh, k, d] -> [b, q, h, d]."""
    plan = plan_for(module.config)
    state = plan.state
    layer = plan.layers.get(module.layer_idx)
    if state is not None and state.graph is not None:
        return captured_attention(module, query, key, value, layer, state, scaling, kwargs.get("softcap")), None
    decoding = layer is not None and bool(layer.decode_steps) and state is not None and state.phase == "decode"
    backend = plan.backend or compat.eager_attention_forward(module)
    compressed = compressed_layer(state, module.layer_idx)
    compressing = layer is not None and layer.compressor is not None and state is not None and state.phase == "prefill"
    touched = layer is not None and (
        layer.needs_eager or decoding or layer.output_edits or compressing or layer.positions is not None
    )
    if compressed is None and not touched:
        return backend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    call = AttentionCall(
        module, module.layer_idx, query, key, value, None, state, attention_mask, scaling, kwargs.get("softcap")
    )
    if compressed is not None:
        return attend(call, compressed, backend, **kwargs), None
    if decoding or layer.needs_eager or layer.positions is not None:
        call.mask = shared(
            state,
            ("mask", id(attention_mask), query.shape[-2], key.shape[-2]),
            lambda: additive_mask(attention_mask, query, key),
        )
    read = (call.key, call.value, call.mask)
    if decoding:
        for step in layer.decode_steps:
            call = step(call)
    if layer.positions is not None and not layer.needs_eager and call.softcap is None:
        output, weights = layer.positions.attend(call), None
        if output is None:  # the hook left this call alone
            output, weights = backend(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return output, weights
    scores = layer.positions.logits(call) if layer.positions is not None else None
    if scores is not None:
        output, weights = edited_attention(call, layer, scores)
    elif layer.needs_eager:
        output, weights = edited_attention(call, layer)
    elif decoding and call.columns is not None:
        output, weights = column_attention(call), None
    elif decoding and call.key.shape[1] != key.shape[1]:
        output, weights = per_head_attention(call), None
    else:
        # decode steps that changed nothing leave the kernel its own inputs (identity is free)
        same = all(now is before for now, before in zip((call.key, call.value, call.mask), read))
        mask = call.mask if decoding and not same else attention_mask
        output, weights = backend(module, call.query, call.key, call.value, mask, scaling=scaling, **kwargs)
    for edit in layer.output_edits:
        output = edit(call, output)
    if compressing:
        compress(call, layer.compressor)
    return output, weights


def captured_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer: LayerPlan | None,
    state: Any,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """A captured decode step's attention (``state.graph``): the layer's decode-step reads choose
    the columns (or not), the length-reading kernel attends over the fixed-capacity cache (a
    positions stage's through its own fused kernel), and the output corrections get its
    log-sum-exp (``call.lse``)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    call = AttentionCall(module, module.layer_idx, query, key, value, None, state, None, scaling, softcap)
    for step in layer.decode_steps if layer is not None else ():
        call = step(call)
    window = layer_window(module.config, module.layer_idx)
    cached = state.graph.layers[module.layer_idx]
    if layer is not None and layer.positions is not None:
        output = layer.positions.captured(call, cached)
        if output is not None:
            if layer.output_edits:
                raise GraphError(f"layer {call.layer}: a captured step does not correct a repositioned output")
            return output
    edits = layer.output_edits if layer is not None else []
    output = graph_attention(query, key, value, cached, scaling, softcap, window, call.columns, bool(edits))
    if edits:
        output, call.lse = output
    for edit in edits:
        output = edit(call, output)
    return output


def compress(call: AttentionCall, compressor: Callable[[AttentionCall, Any], Any]) -> None:
    """Swap this layer's prefill cache for the compressor's smaller one (its keys were just read)."""
    cache, index = call.state.cache, call.layer
    if cache is None:
        return
    smaller = compressor(call, cache.layers[index])
    if smaller is not None:
        cache.layers[index] = smaller


def compressed_layer(state: Any, index: int) -> CompressedLayer | None:
    """The call's cache layer ``index`` where a KV method compressed it: read from the cache itself,
    so that a copy of a compressed cache (a branch of a conversation) decodes as the original does."""
    cache = state.cache if state is not None else None
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers):
        return None
    layer = layers[index]
    return layer if isinstance(layer, CompressedLayer) else None


def reads_columns(call: AttentionCall) -> bool:
    """Whether this eager decode step attends the cache columns a decode-step read chooses
    (``call.columns``) in place, through the decode kernel (CUDA with Triton, a head dim it takes).
    Elsewhere the read gathers the chosen keys and values itself (a copy of them per step)."""
    return kernels.available(call.query) and call.query.shape[-1] in kernels.DECODE_HEAD_DIMS


def column_attention(call: AttentionCall) -> torch.Tensor:
    """An eager decode step's attention over the cache columns its decode-step read chose
    (``call.columns``), read in place by the decode kernel; the call's 2-D padding mask drops
    padded columns. Returns [b, 1, heads, d]."""
    count = call.key.shape[2]
    device = call.key.device
    lengths = shared(call.state, ("lengths", count), lambda: torch.full((1,), count, dtype=torch.int32, device=device))
    valid = call.state.attention_mask if call.state is not None else None
    return kernels.decode_attention(
        call.query, call.key, call.value, lengths, call.scaling, valid=valid, softcap=call.softcap, index=call.columns
    )


def per_head_attention(call: AttentionCall) -> torch.Tensor:
    """Attention over keys and values a decode step gathered per query head [b, heads, k, d]
    (``Attachment.decode_step(gathers=True)``): sdpa without GQA, or plain math where the model caps
    its logits. Returns [b, queries, heads, d]."""
    mask = call.mask
    if mask is not None:  # finite in the query's dtype: sdpa takes a float mask of the query's dtype only
        lowest = max(torch.finfo(call.query.dtype).min, torch.finfo(mask.dtype).min)
        mask = mask.clamp(min=lowest).to(call.query.dtype)
    if call.softcap is None:
        output = F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=mask, scale=call.scaling)
    else:
        scores = call.logits(call.query, call.key)
        probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        output = torch.matmul(probs.to(call.value.dtype), call.value)
    return output.transpose(1, 2).contiguous()


def edited_attention(
    call: AttentionCall, layer: LayerPlan, scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the layer's score and probability edits; softmax in float32. ``scores``:
    the unmasked logits where a positions stage computed them, else computed here."""
    groups = call.query.shape[1] // call.key.shape[1]
    if scores is None:
        scores = call.logits(call.query, repeat_kv(call.key, groups))
    if call.mask is not None:
        scores = scores + call.mask
    for edit in layer.score_edits:
        scores = edit(scores, call)
    probs = torch.softmax(scores, dim=-1)
    for edit in layer.prob_edits:
        probs = edit(probs, call)
    output = torch.matmul(probs.to(call.value.dtype), repeat_kv(call.value, groups))
    return output.transpose(1, 2).contiguous(), probs.to(call.value.dtype)


def mask_function(backend: str) -> Callable[..., Any]:
    """The mask builder transformers would use for ``backend``."""
    return compat.ALL_MASK_ATTENTION_FUNCTIONS[backend]
