"""Decode steps that a CUDA graph can replay: a preallocated cache written in place, the step's
inputs in fixed device buffers, and attention that reads each row's length from the device.

An eager decode step is bound by the host: a 32-layer model issues about 1,200 kernel launches per
token, each paid in Python. A captured step replays them with one launch. A graph cannot follow
Python, though: any length, mask or decision made on the host is frozen at capture. So in a captured
step everything that changes from step to step lives in device buffers (:class:`GraphInputs`), the
cache layers (:class:`GraphLayer`) write the new token at a column computed on the device, and every
layer's attention runs :func:`attnkit.kernels.decode_attention` over the preallocated keys up to the
device-side length (the mask transformers would build is skipped: it is sized on the host).

Methods whose decode-time work runs on the host (stage hooks inside the attention function,
per-call hooks) cannot be replayed; the handle names them (``Handle.unreplayable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from attnkit.compat import CacheLayerMixin, DynamicLayer
from attnkit.engine.kvcache import CompressedLayer
from attnkit.errors import UserError
from attnkit.kernels import decode_attention


class GraphError(UserError, RuntimeError):
    """A cache or call that captured decoding cannot take; the message names the fix."""


@dataclass
class GraphInputs:
    """The device buffers a captured decode step reads. The step itself moves them on by one token
    (:meth:`advance`, captured with it); the host writes only the next tokens."""

    tokens: torch.Tensor
    """[batch, 1] long: the step's input ids."""
    positions: torch.Tensor
    """[batch, 1] long: where each row's new token is rotated (its count of real tokens so far)."""
    step: torch.Tensor
    """[1] long: decode steps since the cache was made (0 at the first)."""

    def advance(self, steps: int = 1) -> None:
        """Move the buffers on by ``steps`` tokens (negative: back)."""
        self.positions.add_(steps)
        self.step.add_(steps)


class GraphLayer(CacheLayerMixin):
    """One layer's keys and values in buffers of fixed capacity [batch, kv heads, capacity, d]:
    ``base`` slots filled before the first decode step, then one per step, written at a column
    computed on the device. Attention gets the whole buffers and reads each row up to
    :meth:`filled` (and only ``valid`` slots). The host keeps the logical length for the engine."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        base: int,
        length: int,
        inputs: GraphInputs,
        valid: torch.Tensor | None = None,
    ):
        super().__init__()
        self.keys, self.values, self.base, self.length, self.inputs = keys, values, base, length, inputs
        self.valid = valid
        """[batch, capacity] bool: slots holding real tokens (None: all of them)."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def column(self) -> torch.Tensor:
        """[1] long: the slot this step writes."""
        return self.inputs.step + self.base

    def filled(self) -> torch.Tensor:
        """[1] long: slots filled once this step has written."""
        return self.inputs.step + (self.base + 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise GraphError("a captured-decoding cache is made from a prefilled cache; it cannot start empty")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[-2] != 1:
            raise GraphError("a captured-decoding cache takes one token per step; prefill with a DynamicCache")
        column = self.column()
        self.keys.index_copy_(2, column, key_states)
        self.values.index_copy_(2, column, value_states)
        self.length += 1
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        raise GraphError("a captured-decoding cache serves one generation; start a new one")

    def crop(self, tokens_to_remove: int) -> None:
        raise GraphError("a captured-decoding cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise GraphError("captured decoding does not support beam search; use num_beams=1")


class GraphCache(DynamicCache):
    """A model's cache for captured decode steps: one :class:`GraphLayer` per layer, one set of inputs."""

    def __init__(self, layers: list[GraphLayer], inputs: GraphInputs):
        super().__init__()
        self.layers = layers
        self.inputs = inputs

    def move(self, steps: int) -> None:
        """Set every layer's host-side length ``steps`` tokens on (after replays, which run no Python)."""
        for layer in self.layers:
            layer.length += steps


def graph_cache(cache: Any, new_tokens: int, attention_mask: torch.Tensor | None) -> GraphCache:
    """A :class:`GraphCache` holding what the prefilled ``cache`` holds, with room for ``new_tokens``.

    ``attention_mask`` is the prompt's padding mask [batch, prompt] (None: no padding). A plain layer's
    slots are the sequence's columns; a sliding-window layer holds only its last tokens, which go to
    their own columns (the kernel reads no further back than the window). A compressed layer (one
    group of KV heads keeping plain tokens: ``snapkv``, ``streaming``) keeps its slots, and new
    tokens follow them.
    """
    length = cache.get_seq_length()
    batch = next(layer_batch(layer) for layer in cache.layers)
    device = next(layer_device(layer) for layer in cache.layers)
    inputs = graph_inputs(batch, length, attention_mask, device)
    valid = padding(attention_mask, batch, length, length + new_tokens, device)
    layers = []
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicLayer) and getattr(layer, "keys", None) is not None:
            keys, values, base, layer_valid = layer.keys, layer.values, length, valid
        elif isinstance(layer, CompressedLayer) and layer.single and layer.groups[0].dense:
            group = layer.groups[0]
            keys, values, base, layer_valid = group.keys, group.values, group.keys.shape[2], None
        else:
            raise GraphError(
                f"layer {index}: captured decoding copies plain cache layers and compressed layers of one group "
                f"of plain tokens, got {layer!r} (razor's groups, a compensation token or a left-padded batch's "
                "empty slots decode eagerly)"
            )
        held = keys.shape[2]
        big_keys = keys.new_zeros(*keys.shape[:2], base + new_tokens, keys.shape[3])
        big_values = values.new_zeros(*values.shape[:2], base + new_tokens, values.shape[3])
        big_keys[:, :, base - held : base] = keys
        big_values[:, :, base - held : base] = values
        layers.append(GraphLayer(big_keys, big_values, base, layer.get_seq_length(), inputs, layer_valid))
    return GraphCache(layers, inputs)


def layer_batch(layer: Any) -> int:
    return layer.batch_size if isinstance(layer, CompressedLayer) else layer.keys.shape[0]


def layer_device(layer: Any) -> torch.device:
    return layer.device if isinstance(layer, CompressedLayer) else layer.keys.device


def graph_inputs(batch: int, length: int, attention_mask: torch.Tensor | None, device: torch.device) -> GraphInputs:
    """The buffers for the first decode step after a ``length``-token prompt."""
    if attention_mask is None:
        counts = torch.full((batch, 1), length, dtype=torch.long, device=device)
    else:
        counts = attention_mask[:, -length:].to(device=device, dtype=torch.long).sum(-1, keepdim=True)
    return GraphInputs(
        tokens=torch.zeros(batch, 1, dtype=torch.long, device=device),
        positions=counts,
        step=torch.zeros(1, dtype=torch.long, device=device),
    )


def padding(
    attention_mask: torch.Tensor | None, batch: int, length: int, capacity: int, device: torch.device
) -> torch.Tensor | None:
    """[batch, capacity] bool: the prompt's padding mask, then every later column; None without padding."""
    if attention_mask is None:
        return None
    valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
    valid[:, :length] = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
    return valid


def graph_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer: GraphLayer,
    scaling: float,
    softcap: float | None,
    window: int | None,
    columns: torch.Tensor | None = None,
    with_lse: bool = False,
) -> Any:
    """One decode step's attention over ``layer``'s buffers -> [batch, 1, heads, d]; ``columns``: read
    only these [batch, KV heads or heads, n] (-1: none); ``with_lse``: (output, log-sum-exp [batch, heads])."""
    return decode_attention(
        query,
        key,
        value,
        layer.filled(),
        scaling,
        valid=layer.valid,
        window=window,
        softcap=softcap,
        index=columns,
        return_lse=with_lse,
    )
