"""What every KV-compression method shares: which layers it compresses, budgets, and accounting.

A KV method chooses, after a layer's prefill attention, which prefill tokens each KV head keeps
(:meth:`KVMethod.select`); the engine swaps the layer's cache for the smaller one and decodes from
it. The cache that ``generate()`` keeps really shrinks: the bytes before and after, per layer, are
measured from the cache tensors and reported in ``handle.stats()``.
"""

from __future__ import annotations

from typing import Any

import torch

from attnkit.engine.attach import Attachment
from attnkit.engine.kvcache import (
    CompressedLayer,
    KVGroup,
    layer_bytes,
    plain_layer,
    row_spans,
)
from attnkit.engine.plan import AttentionCall
from attnkit.heads import text_config
from attnkit.methods.base import Method
from attnkit.primitives import layer_window


def row_budgets(budget: float, lengths: torch.Tensor) -> torch.Tensor:
    """Tokens each row may keep: the absolute budget, or ``ceil(budget * length)`` for a fraction."""
    if budget >= 1:
        return torch.full_like(lengths, int(budget))
    return torch.ceil(lengths.double() * budget).long()


def reduce_groups(scores: torch.Tensor, kv_heads: int, reduction: str) -> torch.Tensor:
    """[b, query heads, n] -> [b, kv heads, n] by the configured reduction over each group."""
    b, h, n = scores.shape
    grouped = scores.view(b, kv_heads, h // kv_heads, n)
    if reduction == "max":
        return grouped.amax(2)
    return grouped.sum(2) if reduction == "sum" else grouped.mean(2)


class KVMethod(Method):
    """Compresses the cache of every full-attention layer after prefill.

    Sliding-window layers are left as they are: their cache is already bounded by the window.
    """

    def attach(self, at: Attachment) -> None:
        config = text_config(at.model.config)
        layers = [layer for layer in range(at.shape.num_layers) if layer_window(config, layer) is None]
        self.num_layers = at.shape.num_layers
        self.num_kv_heads = at.shape.num_kv_heads
        if not layers:
            raise ValueError(
                f"{self.name}: every layer of this model uses a sliding window, whose cache is already bounded "
                "by the window; there is no full-attention layer to compress"
            )
        self.stats.describe("layers", len(layers))
        self.prepare(at)
        owner = at.owns()
        for layer in layers:
            at.compress_kv(layer, self._compressor(owner))

    def prepare(self, at: Attachment) -> None:
        """Resolve what the method needs from the model (head sets); called once at attach."""

    def _compressor(self, owner: Any):
        def compress(call: AttentionCall, cache_layer: Any) -> CompressedLayer | None:
            layer = plain_layer(cache_layer, call.layer)
            keys, values = layer.keys, layer.values
            starts, lengths = row_spans(call.state.attention_mask, keys.shape[0], keys.shape[2], keys.device)
            groups = self.select(call, keys, values, starts, lengths)
            before = layer_bytes(layer)
            smaller = None if groups is None else CompressedLayer(groups, keys.shape[2], self.num_kv_heads, owner)
            after = before if smaller is None else smaller.kv_bytes
            # Totals cover every layer the method manages, those it leaves whole included.
            self.stats.add("layers_untouched" if smaller is None else "layers_compressed")
            self.stats.add("kv_bytes_before", before)
            self.stats.add("kv_bytes_after", after)
            self.stats.tally("kv_bytes", call.layer, [before, after])
            if smaller is None:
                return None
            self.stats.add("slots_kept", sum(int((g.columns >= 0).sum()) for g in groups))
            return smaller

        return compress

    def select(
        self, call: AttentionCall, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
    ) -> list[KVGroup] | None:
        """The groups of kept slots for one layer, or None to keep the layer whole.

        keys/values: the layer's prefill cache [batch, kv heads, length, d]; starts/lengths: each
        row's first real column and real token count (left padding).
        """
        raise NotImplementedError
