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
from attnkit.engine.kvcache import CompressedLayer, query_heads
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


class FixedLayer(CacheLayerMixin):
    """A captured-decoding cache layer: a logical length kept on the host for the engine, one token
    written per step, and none of a growing cache's other operations."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, length: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.length = length
        self.dtype, self.device, self.is_initialized = dtype, device, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise GraphError("a captured-decoding cache is made from a prefilled cache; it cannot start empty")

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        raise GraphError("a captured-decoding cache serves one generation; start a new one")

    def crop(self, tokens_to_remove: int) -> None:
        raise GraphError("a captured-decoding cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise GraphError("captured decoding does not support beam search; use num_beams=1")


class GraphLayer(FixedLayer):
    """One layer's keys and values in buffers of fixed capacity [batch, kv heads, capacity, d]:
    ``base`` slots filled before the first decode step, then one per step, written at a column
    computed on the device. Attention gets the whole buffers and reads each row up to
    :meth:`filled` (and only ``valid`` slots, with each slot's ``bias``)."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        base: int,
        length: int,
        inputs: GraphInputs,
        valid: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        heads: torch.Tensor | None = None,
    ):
        super().__init__(length, keys.dtype, keys.device)
        self.keys, self.values, self.base, self.inputs = keys, values, base, inputs
        self.valid = valid
        """[batch, capacity] bool: slots holding real tokens (None: all of them)."""
        self.bias = bias
        """[batch, kv heads, capacity] float: each slot's logit bias (a compressed cache's: -inf
        for an empty slot, log n for a slot standing for n tokens; 0 for new tokens); None: none."""
        self.heads = heads
        """long [kv heads here]: the layer's KV heads these buffers hold (a group of a compressed
        layer); None: all of them."""

    def column(self) -> torch.Tensor:
        """[1] long: the slot this step writes."""
        return self.inputs.step + self.base

    def filled(self) -> torch.Tensor:
        """[1] long: slots filled once this step has written."""
        return self.inputs.step + (self.base + 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[-2] != 1:
            raise GraphError("a captured-decoding cache takes one token per step; prefill with a DynamicCache")
        if self.heads is not None:
            key_states, value_states = key_states.index_select(1, self.heads), value_states.index_select(1, self.heads)
        column = self.column()
        self.keys.index_copy_(2, column, key_states)
        self.values.index_copy_(2, column, value_states)
        self.length += 1
        return self.keys, self.values

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class GraphGroups(FixedLayer):
    """A compressed layer whose KV heads keep different numbers of slots (``razor``: retrieval heads
    every token, the others a few): one :class:`GraphLayer` per group, each read by the query heads
    of its KV heads (:func:`graph_attention`)."""

    def __init__(self, parts: list[GraphLayer], num_kv_heads: int, length: int):
        super().__init__(length, parts[0].dtype, parts[0].device)
        self.parts, self.num_kv_heads = parts, num_kv_heads
        self._queries: dict[int, list[torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        for part in self.parts:
            part.update(key_states, value_states)
        self.length += 1
        return key_states, value_states  # attention reads the parts

    def query_heads(self, heads: int) -> list[torch.Tensor]:
        """Each part's query heads (long, on the device), for a model of ``heads`` query heads; made
        at the first step (before a graph is captured), then kept."""
        if heads not in self._queries:
            self._queries[heads] = [query_heads(part.heads, heads // self.num_kv_heads) for part in self.parts]
        return self._queries[heads]

    def get_max_length(self) -> int:
        return max(part.get_max_length() for part in self.parts)


class GraphCache(DynamicCache):
    """A model's cache for captured decode steps: one :class:`GraphLayer` per layer, one set of inputs."""

    def __init__(self, layers: list[FixedLayer], inputs: GraphInputs):
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
    their own columns (the kernel reads no further back than the window). A compressed layer keeps
    its slots per group of KV heads (``snapkv`` and ``streaming``: one; ``razor``: two), their
    biases (empty slots, compensation tokens) with them, and new tokens follow them.
    """
    length = cache.get_seq_length()
    batch = next(layer_batch(layer) for layer in cache.layers)
    device = next(layer_device(layer) for layer in cache.layers)
    inputs = graph_inputs(batch, length, attention_mask, device)
    valid = padding(attention_mask, batch, length, length + new_tokens, device)
    layers: list[FixedLayer] = []
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicLayer) and getattr(layer, "keys", None) is not None:
            keys, values = layer.keys, layer.values
            layers.append(buffered(keys, values, length, new_tokens, inputs, layer.get_seq_length(), valid))
        elif isinstance(layer, CompressedLayer):
            parts = [compressed_part(group, layer, new_tokens, inputs) for group in layer.groups]
            layers.append(parts[0] if layer.single else GraphGroups(parts, layer.num_kv_heads, layer.get_seq_length()))
        else:
            raise GraphError(
                f"layer {index}: captured decoding copies plain and compressed cache layers, got {layer!r}"
            )
    return GraphCache(layers, inputs)


def buffered(
    keys: torch.Tensor,
    values: torch.Tensor,
    base: int,
    new_tokens: int,
    inputs: GraphInputs,
    length: int,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    heads: torch.Tensor | None = None,
) -> GraphLayer:
    """A :class:`GraphLayer` whose first ``base`` slots end with ``keys`` and ``values`` (a sliding
    window's last tokens at their own columns), with room for ``new_tokens`` after them."""
    held = keys.shape[2]
    big_keys = keys.new_zeros(*keys.shape[:2], base + new_tokens, keys.shape[3])
    big_values = values.new_zeros(*values.shape[:2], base + new_tokens, values.shape[3])
    big_keys[:, :, base - held : base] = keys
    big_values[:, :, base - held : base] = values
    return GraphLayer(big_keys, big_values, base, length, inputs, valid, bias, heads)


def compressed_part(group: Any, layer: CompressedLayer, new_tokens: int, inputs: GraphInputs) -> GraphLayer:
    """One group of a compressed layer in fixed buffers: its slots, then room for ``new_tokens``;
    its slots' biases where it has any (new tokens get 0)."""
    slots = group.keys.shape[2]
    bias = None
    if not group.dense:
        held = group.slot_bias().to(torch.float32)
        bias = torch.cat([held, held.new_zeros(*held.shape[:2], new_tokens)], dim=2)
    heads = None if layer.single else group.kv_index()
    return buffered(group.keys, group.values, slots, new_tokens, inputs, layer.get_seq_length(), None, bias, heads)


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
    layer: FixedLayer,
    scaling: float,
    softcap: float | None,
    window: int | None,
    columns: torch.Tensor | None = None,
    with_lse: bool = False,
) -> Any:
    """One decode step's attention over ``layer``'s buffers -> [batch, 1, heads, d]; ``columns``: read
    only these [batch, KV heads or heads, n] (-1: none); ``with_lse``: (output, log-sum-exp [batch, heads])."""
    if isinstance(layer, GraphGroups):
        if columns is not None:
            raise GraphError("a decode-step read cannot choose columns of a cache whose heads keep different slots")
        return grouped_attention(query, layer, scaling, softcap, window, with_lse)
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
        bias=layer.bias,
    )


def grouped_attention(
    query: torch.Tensor, layer: GraphGroups, scaling: float, softcap: float | None, window: int | None, with_lse: bool
) -> Any:
    """:func:`graph_attention` over each group of ``layer`` with the query heads of its KV heads."""
    batch, heads, _, dim = query.shape
    out = torch.empty(batch, 1, heads, dim, dtype=layer.parts[0].values.dtype, device=query.device)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=query.device) if with_lse else None
    for part, chosen in zip(layer.parts, layer.query_heads(heads)):
        chosen_query = query.index_select(1, chosen)
        got = graph_attention(chosen_query, part.keys, part.values, part, scaling, softcap, window, None, with_lse)
        if with_lse:
            got, part_lse = got
            lse.index_copy_(1, chosen, part_lse)
        out.index_copy_(2, chosen, got)
    return (out, lse) if with_lse else out
