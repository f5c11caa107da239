"""Compressed KV caches: after prefill, a layer keeps only chosen keys/values, per KV head.

A :class:`CompressedLayer` takes the place of a layer in the model's ``cache.layers``. It stores
KV heads in groups that keep the same number of slots: one group for SnapKV or sink+window, two
for RazorAttention (retrieval heads keep every token, the others a few). So heads of one layer
can keep different lengths and the memory saving is real: nothing is padded to the longest head
and nothing is expanded to query heads.

The layer reports the *logical* length, what the uncompressed cache would hold, so transformers
keeps counting positions and building masks for the original sequence: new tokens continue from
the prompt length. attnkit's attention function reads the groups (:func:`attend`): a one-token
decode step reads every slot of a group, adding the kept slots' biases to its logits; a longer
query builds each group's mask from the slots' logical columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.compat import CacheLayerMixin, DynamicLayer
from attnkit.primitives import repeat_kv

NEG_INF = float("-inf")


class KVCacheError(RuntimeError):
    """A cache attnkit cannot compress, or a compressed cache used outside its handle."""


@dataclass
class KVGroup:
    """KV heads of one layer that keep the same number of slots."""

    heads: list[int]
    """The layer's KV head indices held here, ascending."""
    keys: torch.Tensor
    """[batch, len(heads), slots, head_dim]: the slots kept from the prompt, then every new token."""
    values: torch.Tensor
    columns: torch.Tensor
    """[batch, len(heads), kept] long: each kept prompt slot's column in the logical sequence; -1 =
    empty. New tokens (the slots after ``kept``) take the columns after the prompt, in order."""
    bias: torch.Tensor
    """[batch, len(heads), kept] (float32, or float64 for a float64 model) added to the kept slot's
    logit: 0 for a kept token, log(n) for a token that stands for n dropped ones, -inf for an
    empty slot. New tokens have bias 0."""
    dense: bool = False
    """Every kept slot holds a plain token (no empty slot, no bias): a decode step adds no bias."""
    _kv_index: torch.Tensor | None = field(default=None, repr=False)
    _query_index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.columns, self.bias))

    @property
    def kept(self) -> int:
        """Slots kept from the prompt (the rest are new tokens)."""
        return self.columns.shape[-1]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add new tokens (keys/values [batch, all kv heads, new, d])."""
        if len(self.heads) != keys.shape[1]:
            index = self.kv_index()
            keys, values = keys.index_select(1, index), values.index_select(1, index)
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)

    def slot_bias(self) -> torch.Tensor:
        """The logit bias of every slot [batch, len(heads), slots], new tokens (0) included."""
        b, h, slots = self.keys.shape[:3]
        return torch.cat([self.bias, self.bias.new_zeros(b, h, slots - self.kept)], dim=2)

    def slot_columns(self, logical_length: int) -> torch.Tensor:
        """The logical column of every slot [batch, len(heads), slots], new tokens included."""
        b, h, slots = self.keys.shape[:3]
        new = torch.arange(logical_length - (slots - self.kept), logical_length, device=self.columns.device)
        return torch.cat([self.columns, new.expand(b, h, -1)], dim=2)

    def kv_index(self) -> torch.Tensor:
        """The heads as an index tensor on the cache's device, made once: building it from a
        list at every decode step would copy from the host and stall the GPU stream."""
        if self._kv_index is None:
            self._kv_index = torch.tensor(self.heads, device=self.keys.device, dtype=torch.long)
        return self._kv_index

    def query_index(self, groups: int) -> torch.Tensor:
        """The query heads reading this group's KV heads (``groups`` query heads per KV head), made once."""
        if self._query_index is None:
            self._query_index = query_heads(self.kv_index(), groups)
        return self._query_index

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.keys, self.values, self.columns, self.bias = (
            fn(t) for t in (self.keys, self.values, self.columns, self.bias)
        )
        self._kv_index = self._query_index = None  # the device may have changed


def query_heads(kv_heads: torch.Tensor, groups: int) -> torch.Tensor:
    """long [len(kv_heads) x groups]: the query heads reading the KV heads ``kv_heads`` (``groups``
    query heads per KV head), in KV-head order, on their device."""
    return (kv_heads[:, None] * groups + torch.arange(groups, device=kv_heads.device)).flatten()


def keep(keys: torch.Tensor, values: torch.Tensor, heads: list[int], columns: torch.Tensor) -> KVGroup:
    """The group of ``heads`` keeping the given logical ``columns`` [batch, len(heads), slots] (-1 = empty).

    ``keys``/``values`` are the full prefill cache [batch, kv heads, length, d]; its positions are
    the logical columns.
    """
    index = torch.tensor(heads, device=keys.device, dtype=torch.long)
    k, v = keys.index_select(1, index), values.index_select(1, index)
    valid = columns >= 0
    gather = columns.clamp(min=0)[..., None].expand(-1, -1, -1, k.shape[-1])
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k = torch.where(valid[..., None], k.gather(2, gather), zero)
    v = torch.where(valid[..., None], v.gather(2, gather), zero)
    bias = torch.where(valid, 0.0, NEG_INF).to(torch.promote_types(k.dtype, torch.float32))
    return KVGroup(list(heads), k, v, columns.clone(), bias, dense=bool(valid.all()))


def with_token(
    group: KVGroup, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor, bias: torch.Tensor
) -> KVGroup:
    """``group`` plus one extra slot per head: keys/values [b, h, d], column and bias [b, h]."""
    return KVGroup(
        list(group.heads),
        torch.cat([group.keys, keys[:, :, None]], dim=2),
        torch.cat([group.values, values[:, :, None]], dim=2),
        torch.cat([group.columns, column[..., None]], dim=2),
        torch.cat([group.bias, bias[..., None].to(group.bias.dtype)], dim=2),
    )


class CompressedLayer(CacheLayerMixin):
    """A cache layer holding groups of KV heads with their kept slots; see the module docstring."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, groups: list[KVGroup], logical_length: int, num_kv_heads: int, owner: Callable[[], bool]):
        self.groups = groups
        self.logical_length = logical_length
        self.num_kv_heads = num_kv_heads
        self._owner_active = owner
        first = groups[0].keys
        self.dtype, self.device = first.dtype, first.device
        self.is_initialized = True

    # transformers reads .keys/.values on some paths (offloading, batch size); a single group that
    # holds every head in order is exactly a plain layer's tensors.
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.groups[0].keys if self.single else None

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.groups[0].values if self.single else None

    @property
    def single(self) -> bool:
        return len(self.groups) == 1 and self.groups[0].heads == list(range(self.num_kv_heads))

    @property
    def batch_size(self) -> int:
        return self.groups[0].keys.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values alone (the slots' bookkeeping excluded)."""
        return sum(g.keys.numel() * g.keys.element_size() * 2 for g in self.groups)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise KVCacheError("a compressed cache layer is created from a filled one; it cannot start empty")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append new tokens to every group; returns the first group's keys and values."""
        if not self._owner_active():
            raise KVCacheError(
                "this cache was compressed by an attnkit handle that is no longer active; decode from it "
                "inside that handle (its attention function reads the compressed layout), or start a new cache"
            )
        for group in self.groups:
            group.append(key_states, value_states)
        self.logical_length += key_states.shape[-2]
        return self.groups[0].keys, self.groups[0].values

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise KVCacheError("a compressed cache cannot be reset for reuse; start a new cache for a new input")

    def crop(self, tokens_to_remove: int) -> None:
        raise KVCacheError(
            "a compressed cache cannot be cropped (assisted decoding is not supported with KV compression)"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for group in self.groups:
            group.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for group in self.groups:
            group.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for group in self.groups:
            group.map_batch(lambda t: t[indices])

    def offload(self) -> None:
        for group in self.groups:
            group.map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        for group in self.groups:
            group.map_batch(lambda t: t.to(self.device, non_blocking=True))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{len(g.heads)} heads x {g.keys.shape[2]} slots" for g in self.groups)
        return f"CompressedLayer(logical length {self.logical_length}: {shapes})"


def layer_bytes(layer: Any) -> int:
    """Bytes of a cache layer's stored keys and values."""
    if isinstance(layer, CompressedLayer):
        return layer.kv_bytes
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None:
        return 0
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()


def cache_bytes(cache: Any) -> int:
    """Bytes of keys and values held by every layer of a cache, measured from its tensors."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def plain_layer(layer: Any, index: int) -> DynamicLayer:
    """The prefill cache layer, checked to be one attnkit knows how to compress."""
    if type(layer) is not DynamicLayer:
        raise KVCacheError(
            f"layer {index}: KV compression needs transformers' DynamicCache (the default of generate()), "
            f"got a {type(layer).__name__}; drop cache_implementation / static caches from the call"
        )
    return layer


def attend(call: Any, layer: CompressedLayer, backend: Callable[..., Any], **kwargs: Any) -> torch.Tensor:
    """Attention of ``call``'s queries over a compressed layer, group by group.

    A one-token decode step is computed here (:func:`decode_attention`): it sees every slot, so
    it needs no mask, only the kept slots' biases. A longer query calls the backend once per
    group with a mask from the slots: a slot is read when it is not empty and its logical column
    is at or before the query's; a compensation slot adds its log-count bias.
    Returns [batch, queries, heads, head_dim] like any backend.
    """
    query = call.query
    b, n_heads, q_len, _ = query.shape
    groups = n_heads // layer.num_kv_heads
    out = None
    for group in layer.groups:
        q_index = None if layer.single else group.query_index(groups)
        q_group = query if q_index is None else query.index_select(1, q_index)
        if q_len == 1:
            output = decode_attention(call, q_group, group)
        else:
            output = masked_attention(call, q_group, group, layer.logical_length, backend, **kwargs)
        if q_index is None:
            return output
        if out is None:
            out = output.new_empty(b, q_len, n_heads, output.shape[-1])
        out[:, :, q_index] = output
    return out


def decode_attention(call: Any, query: torch.Tensor, group: KVGroup) -> torch.Tensor:
    """One query token [b, heads, 1, d] over every slot of ``group`` -> [b, 1, heads, d].

    The query heads that share a KV head read the same slots, so they are folded into the query
    length and the keys are never expanded (the "GQA packing" of flash-decoding). A dense group
    (no bias) is one sdpa call without a mask, with sdpa's cuDNN backend left out: it builds a new
    plan whenever the key length changes, which a cache does at every step. A group with biased or
    empty slots, or a softcapped model (Gemma 2), takes plain matmul-softmax-matmul with the bias
    added to the logits in float32: a masked sdpa call would run the memory-efficient kernel, which
    gives one query a single thread block per head and walks every slot serially.
    """
    b, h, _, d = query.shape
    kv = group.keys.shape[1]
    folded = query.reshape(b, kv, h // kv, d)
    if call.softcap is None and group.dense:
        with sdpa_without_cudnn():
            out = F.scaled_dot_product_attention(folded, group.keys, group.values, scale=call.scaling)
    else:
        logits = call.logits(folded, group.keys)  # [b, kv, groups, slots], at least float32
        if not group.dense:
            logits[..., : group.kept] += group.bias[:, :, None, :].to(logits.dtype)
        probs = torch.softmax(logits, dim=-1).to(group.values.dtype)
        out = torch.matmul(probs, group.values)
    return out.reshape(b, h, 1, d).transpose(1, 2)


def sdpa_without_cudnn() -> Any:
    """A context in which sdpa may use the backends it may use now, except cuDNN attention."""
    allowed = [
        backend
        for backend, enabled in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        )
        if enabled
    ]
    return sdpa_kernel(allowed or [SDPBackend.MATH])


def masked_attention(
    call: Any, query: torch.Tensor, group: KVGroup, logical_length: int, backend: Callable[..., Any], **kwargs: Any
) -> torch.Tensor:
    """Queries [b, heads, q, d] (the last q logical columns) over ``group`` through the backend, with the slots' mask."""
    q_len = query.shape[2]
    q_cols = torch.arange(logical_length - q_len, logical_length, device=query.device)
    columns, bias = group.slot_columns(logical_length), group.slot_bias()
    visible = (columns[..., None, :] >= 0) & (columns[..., None, :] <= q_cols[:, None])
    mask = torch.where(visible, bias[..., None, :], NEG_INF)  # [b, kv heads, q, slots]
    # finite in the query's dtype: a row with nothing visible (padding) must not turn into NaN
    mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
    mask = repeat_kv(mask, query.shape[1] // group.keys.shape[1])
    output, _ = backend(call.module, query, group.keys, group.values, mask, scaling=call.scaling, dropout=0.0, **kwargs)
    return output


def row_spans(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first real column, real length) per row of a left-padded prefill; errors on right padding."""
    if attention_mask is None:
        full = torch.full((batch,), length, device=device, dtype=torch.long)
        return torch.zeros_like(full), full
    mask = attention_mask[:, -length:].to(device=device, dtype=torch.long)
    lengths = mask.sum(-1)
    starts = length - lengths
    expected = torch.arange(length, device=device)[None] >= starts[:, None]
    if not torch.equal(mask.bool(), expected):
        raise KVCacheError(
            "KV compression needs left padding (padding tokens before the prompt); set tokenizer.padding_side = 'left'"
        )
    return starts, lengths


def top_columns(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row and head, the columns of the ``counts[row]`` highest scores, ascending; -1 fills.

    scores: [b, h, length] (-inf = never keep, +inf = always keep). Returns [b, h, max(counts)].
    Ties go to the earlier column (a stable sort, not ``topk``), so a left-padded row keeps what
    it keeps alone: max pooling makes exact ties, and ``topk`` breaks them by memory layout.
    """
    slots = int(counts.max())
    picked = scores.sort(dim=-1, descending=True, stable=True).indices[..., :slots]
    rank = torch.arange(slots, device=scores.device)
    valid = (rank[None, None, :] < counts[:, None, None]) & (scores.gather(-1, picked) > NEG_INF)
    ordered = torch.where(valid, picked, scores.shape[-1]).sort(dim=-1).values
    return torch.where(ordered < scores.shape[-1], ordered, -1)


def compensation(
    keys: torch.Tensor, values: torch.Tensor, dropped: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RazorAttention's compensation token for each head: the mean of its dropped keys and values.

    keys/values [b, h, length, d]; dropped [b, h, length] bool. Returns (key, value [b, h, d],
    count [b, h], column [b, h]): the column is the last dropped one, so every later query sees it;
    heads that dropped nothing get count 0 (their slot stays empty).
    """
    weight = dropped.to(keys.dtype)
    count = dropped.sum(-1)
    denom = count.clamp(min=1).to(keys.dtype)[..., None]
    key = torch.einsum("bhn,bhnd->bhd", weight, keys) / denom
    value = torch.einsum("bhn,bhnd->bhd", weight, values) / denom
    positions = torch.arange(dropped.shape[-1], device=dropped.device)
    column = torch.where(dropped, positions, -1).amax(-1)
    return key, value, count, column


def compensation_bias(count: torch.Tensor) -> torch.Tensor:
    """The compensation slot's logit bias: log(count), so it weighs in the softmax as ``count``
    tokens with the mean key would; -inf (an empty slot) where nothing was dropped."""
    return torch.where(count > 0, count.clamp(min=1).double().log(), NEG_INF)
