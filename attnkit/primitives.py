"""Attention primitives every path shares, written once: masks, ``repeat_kv``, logits, dtypes, RoPE.

The engine, the methods and the profilers all build masks and logits; keeping them here means a
fix (masked entries that stay finite in every dtype, say) holds everywhere at once. This module
imports nothing from attnkit.
"""

from __future__ import annotations

from typing import Any

import torch

MASKED = torch.finfo(torch.float32).min
"""The additive mask value of a masked key: finite, so a row with every key masked (left padding)
gives a uniform softmax rather than NaN, in every dtype the logits take (float32 or float64)."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input's own type for float32 and float64."""
    return torch.promote_types(x.dtype, torch.float32)


def causal_keep(query_positions: torch.Tensor, keys: int) -> torch.Tensor:
    """bool [1, 1, queries, keys]: query at key index ``query_positions[i]`` sees keys up to it."""
    return (query_positions[:, None] >= torch.arange(keys, device=query_positions.device)[None, :])[None, None]


def last_queries(queries: int, keys: int, device: Any) -> torch.Tensor:
    """The key index of each of ``queries`` queries that are the last ``queries`` keys."""
    return torch.arange(keys - queries, keys, device=device)


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    """An additive mask in float32 with masked entries at :data:`MASKED`: a float64 model's
    ``finfo(float64).min`` would become -inf in float32, and a fully masked row NaN."""
    return mask.float().clamp(min=MASKED)


def as_additive(mask: torch.Tensor) -> torch.Tensor:
    """A boolean keep-mask or an additive float mask as an additive float32 mask, finite."""
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=torch.float32, device=mask.device), MASKED)
    return float_mask(mask)


def additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """Any backend's mask (None = causal, boolean keep-mask, additive float) as an additive float mask."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is None:
        if q_len == 1:
            return None
        mask = causal_keep(last_queries(q_len, k_len, query.device), k_len)
    if mask.dim() != 4:
        raise RuntimeError(
            f"attnkit got a {mask.dim()}-D attention mask (from a varlen backend); score and probability "
            "edits need attn_implementation sdpa or eager"
        )
    return as_additive(mask[..., :k_len])


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv heads, ...] -> [b, kv heads * groups, ...], each KV head repeated for its query heads."""
    if groups == 1:
        return x
    b, kvh, *rest = x.shape
    return x[:, :, None].expand(b, kvh, groups, *rest).reshape(b, kvh * groups, *rest)


def logits(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """Attention logits (at least float32) as the model computes them (scale, softcap), unmasked."""
    scores = torch.matmul(query, key.transpose(-1, -2)).to(compute_dtype(query)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it: ``x·cos + rotate_half(x)·sin`` on the first
    ``cos.shape[-1]`` dims of ``x`` [..., n, head_dim] (partial rotary: the rest pass unrotated);
    cos and sin [..., n, rotary dims] broadcast against ``x``. Computed on the halves (transformers'
    tables repeat the frequencies in both), without building ``rotate_half(x)``."""
    dims = cos.shape[-1]
    half = dims // 2
    first, second = x[..., :half], x[..., half:dims]
    cos1, cos2, sin1, sin2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    parts = [torch.addcmul(first * cos1, second, sin1, value=-1), torch.addcmul(second * cos2, first, sin2)]
    if dims < x.shape[-1]:
        parts.append(x[..., dims:].expand(*parts[0].shape[:-1], x.shape[-1] - dims))
    return torch.cat(parts, dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`rotate` with the same cos and sin:
    ``(x·cos − rotate_half(x)·sin) / (cos² + sin²)``."""
    return rotate(x, *unrotation(cos, sin))


def unrotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) whose :func:`rotate` undoes the rotation by ``cos`` and ``sin``.

    yarn and longrope multiply cos and sin by an attention factor s, so cos² + sin² = s²; dividing
    by it makes un-rotating then rotating exact for every variant without knowing s.
    """
    norm = cos * cos + sin * sin
    return cos / norm, -sin / norm


def layer_window(config: Any, layer: int) -> int | None:
    """The sliding window of ``layer`` (query i sees keys j with i - j < window), None if full.

    Read from the config as transformers builds its masks: ``layer_types`` where the config has
    them, else one ``sliding_window`` for every layer unless ``use_sliding_window`` is off.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window if getattr(config, "use_sliding_window", True) else None
