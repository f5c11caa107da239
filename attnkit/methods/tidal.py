"""``tidaldecode`` (TidalDecode): decode steps read only the tokens a selection layer picks.

TidalDecode (Yang et al., 2024, arXiv 2410.05076): at a decode step, the layers below
``selection_layer`` attend to the whole cache. The selection layer does too, and takes the top-k
positions of each query head's pre-softmax logits (after ``repeat_kv``): ``budget - 1`` earlier
tokens plus the new one. Every later layer reads only those positions ("position persistent"), until
one re-selection layer in the middle attends fully again and selects anew for the layers after it.
Prefill is untouched.

Here the sparse layers read only the selected keys and values (the reference's PyTorch path
computes full logits and masks them: an accuracy simulation): on CUDA the decode kernel reads the
selected cache columns in place; elsewhere they are gathered and attended alone. The cache
keeps every token, so no memory is saved; what is saved is reading it. Per query head, a KV head's
query heads read different tokens (the engine attends the gathered keys per query head); the per-KV-
head variants select once per KV head, so one gather of KV-head keys serves its group:
``kv_head_union`` merges its query heads' rankings rank by rank (LessIsMore's union, within one
budget), ``kv_head_sum`` ranks by their summed attention probabilities. ``recent`` keeps the last
tokens in every selection (LessIsMore's reserved window).

Only full-attention layers take part: a sliding-window layer keeps its window (its cache holds the
window only), and the selection and re-selection happen at the first full-attention layer at or
after the configured ones. Padding is never read: a padded column can only be picked when a row has
fewer real tokens than the budget, and then it stays masked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from attnkit.engine.attach import Attachment
from attnkit.engine.attention import reads_columns
from attnkit.engine.plan import AttentionCall
from attnkit.engine.state import CallState
from attnkit.heads import text_config
from attnkit.methods.base import Method, register
from attnkit.primitives import layer_window
from attnkit.recipe.methods import TidalDecodeConfig

Role = Literal["select", "sparse"]


@dataclass
class Selection:
    """What a selection layer picked for one decode step, for the sparse layers after it."""

    index: torch.Tensor
    """long [batch, kv heads, tokens]: the cache columns to gather per KV head; per query head, each
    KV head's query heads' columns one after another (``budget`` each)."""
    heads: int
    """Heads of the gathered keys: the query heads (per query head) or the KV heads."""
    mask: torch.Tensor | None = None
    """Additive mask of the gathered columns [batch, heads, 1, budget] in the query's dtype (padding
    picked by a row shorter than the budget stays masked), made at the first gather (a read in place
    takes the call's padding mask instead); None while not made, or when the call has no mask."""
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    """Cache length -> the selected rows of a contiguous cache viewed as [b * kv heads * length, d]."""


def layer_roles(full: list[int], selection: int, reselection: int | None) -> dict[int, Role]:
    """Role of each full-attention layer TidalDecode manages: ``select`` at the first full layer at or
    after ``selection`` (and after ``reselection``), ``sparse`` for every other full layer after the
    first selection. Layers below the selection layer and sliding-window layers are left alone."""
    after = [layer for layer in full if layer >= selection]
    if not after:
        return {}
    selecting = {after[0]}
    later = [layer for layer in after if reselection is not None and layer >= reselection]
    if later:
        selecting.add(later[0])
    return {layer: "select" if layer in selecting else "sparse" for layer in after}


def select_columns(logits: torch.Tensor, count: int, selection: str, probs: torch.Tensor | None = None) -> torch.Tensor:
    """The ``count`` columns each head reads, from the candidates' logits [b, kv heads, group, pool].

    query_head: each query head's top-``count`` logits -> [b, kv heads, group, count].
    kv_head_union: the query heads' rankings merged rank by rank (every head's best, then every
    head's second...), the first ``count`` distinct columns -> [b, kv heads, 1, count].
    kv_head_sum: the top-``count`` of ``probs`` (attention probabilities, same shape as ``logits``)
    summed over the group -> [b, kv heads, 1, count].
    """
    if selection == "query_head":
        return logits.topk(count, dim=-1).indices
    if selection == "kv_head_sum":
        return probs.sum(2, keepdim=True).topk(count, dim=-1).indices
    b, kv, group, _ = logits.shape
    merged = logits.topk(count, dim=-1).indices.transpose(2, 3).reshape(b, kv, count * group)  # rank-major
    ordered = merged.sort(dim=-1, stable=True)  # equal columns keep their merged order: the first is the best
    first = torch.ones_like(merged, dtype=torch.bool)
    first[..., 1:] = ordered.values[..., 1:] != ordered.values[..., :-1]
    priority = torch.where(first, ordered.indices, merged.shape[-1])
    return merged.gather(-1, priority.sort(dim=-1).values[..., :count])[:, :, None]


def select(call: AttentionCall, current: int, budget: int, recent: int, selection: str) -> Selection:
    """Full logits of the new query (at column ``current``) over the earlier tokens, and the columns
    the sparse layers read: the top ``budget - 1 - recent`` earlier ones, the ``recent`` last ones
    and the new token."""
    query, keys = call.query, call.key[:, :, : current + 1]
    b, heads, _, d = query.shape
    kv = keys.shape[1]
    folded = query.reshape(b, kv, heads // kv, d)
    logits = call.logits(folded, keys)  # [b, kv, group, current + 1], at least float32
    mask = call.mask
    if mask is not None:
        logits = logits + mask[:, :, :, : current + 1]
    recent = min(recent, current)
    pool = current - recent
    probs = torch.softmax(logits, dim=-1) if selection == "kv_head_sum" else None
    candidates = None if probs is None else probs[..., :pool]
    picked = select_columns(logits[..., :pool], budget - 1 - recent, selection, candidates)
    kept = torch.arange(pool, current + 1, device=keys.device).expand(*picked.shape[:3], recent + 1)
    index = torch.cat([picked, kept], dim=-1)  # [b, kv, group or 1, budget]
    gathered_heads = index.shape[1] * index.shape[2]
    index = index.reshape(b, kv, -1)
    return Selection(index, gathered_heads)


def select_captured(call: AttentionCall, budget: int, recent: int, selection: str) -> torch.Tensor:
    """:func:`select` on a captured decode step, where lengths live on the device: the cache
    columns [batch, query heads or KV heads, budget] the sparse layers read, -1 where a short
    context leaves the budget unfilled (the kernel skips those, so the layers read every token,
    as :func:`select` does when the budget holds the whole context)."""
    cached = call.state.graph.layers[call.layer]
    query, keys = call.query, call.key  # keys: the whole fixed-capacity cache
    b, heads, _, d = query.shape
    kv, capacity = keys.shape[1], keys.shape[2]
    logits = call.logits(query.reshape(b, kv, heads // kv, d), keys)  # [b, kv, group, capacity]
    columns = torch.arange(capacity, device=keys.device)
    current = cached.column()  # [1]: the new token's column
    earlier = (columns < current)[None, :]  # [b or 1, capacity]
    if cached.valid is not None:
        earlier = earlier & cached.valid
    pool = earlier & (columns < current - recent)
    pooled = logits.masked_fill(~pool[:, None, None, :], float("-inf"))
    probs = None
    if selection == "kv_head_sum":
        readable = earlier | (columns == current)
        probs = torch.softmax(logits.masked_fill(~readable[:, None, None, :], float("-inf")), dim=-1)
        probs = probs.masked_fill(~pool[:, None, None, :], 0.0)
    picked = select_columns(pooled, min(budget - 1 - recent, capacity), selection, probs)  # [b, kv, g or 1, k]
    rows = pool[:, None, None, :].expand(b, kv, picked.shape[2], -1)
    picked = torch.where(rows.gather(-1, picked), picked, -1)  # a column outside the pool: not read
    kept = current + torch.arange(-recent, 1, device=keys.device)  # the recent tokens and the new one
    kept = torch.where(kept >= 0, kept, -1).expand(*picked.shape[:3], recent + 1)
    index = torch.cat([picked, kept], dim=-1)
    return index.reshape(b, -1, index.shape[-1])


def gathered_mask(
    mask: torch.Tensor | None, index: torch.Tensor, gathered_heads: int, heads: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The call's mask [b, 1, 1, keys] at the gathered columns -> [b, heads, 1, budget] in ``dtype``,
    finite; per KV head it is repeated for the query heads, as a backend's GQA packing expects."""
    if mask is None:
        return None
    b = index.shape[0]
    picked = mask[:, 0, 0].gather(1, index.reshape(b, -1)).reshape(b, gathered_heads, 1, -1)
    picked = picked.repeat_interleave(heads // gathered_heads, dim=1)
    lowest = max(torch.finfo(dtype).min, torch.finfo(picked.dtype).min)  # finite in both
    return picked.clamp(min=lowest).to(dtype)


def gather(call: AttentionCall, selection: Selection) -> AttentionCall:
    """The call reading only the selected keys and values: [b, heads of the selection, budget, d]."""
    b, _, _, d = call.key.shape
    keys = gather_rows(call.key, selection).reshape(b, selection.heads, -1, d)
    values = gather_rows(call.value, selection).reshape(b, selection.heads, -1, d)
    if selection.mask is None:  # the same for every sparse layer of the step: made once
        heads, dtype = call.query.shape[1], call.query.dtype
        selection.mask = gathered_mask(call.mask, selection.index, selection.heads, heads, dtype)
    return dataclasses.replace(call, key=keys, value=values, mask=selection.mask)


def gather_rows(x: torch.Tensor, selection: Selection) -> torch.Tensor:
    """``x`` [b, kv heads, keys, d] at the selected columns -> [b, kv heads, tokens, d].

    A contiguous cache (DynamicCache's) is read as rows of d with one ``index_select`` (on a CPU 30x
    faster than ``gather``, which walks a broadcast index); other layouts take ``gather``.
    """
    b, kv, length, d = x.shape
    if not x.is_contiguous():
        return x.gather(2, selection.index[..., None].expand(-1, -1, -1, d))
    rows = selection.rows.get(length)
    if rows is None:  # the same for every layer of the step: made once
        start = torch.arange(b * kv, device=x.device).view(b, kv, 1) * length
        rows = selection.rows[length] = (selection.index + start).reshape(-1)
    return x.view(-1, d).index_select(0, rows).view(b, kv, -1, d)


@register
class TidalDecode(Method):
    """Position-persistent sparse decoding: a selection layer's top-k tokens are all later layers read."""

    name = "tidaldecode"
    config_class = TidalDecodeConfig
    replayable = True

    def attach(self, at: Attachment) -> None:
        cfg = self.config
        layers = at.shape.num_layers
        config = text_config(at.model.config)
        full = [layer for layer in range(layers) if layer_window(config, layer) is None]
        for name in ("selection_layer", "reselection_layer"):
            value = getattr(cfg, name)
            if isinstance(value, int) and value >= layers:
                raise ValueError(f"tidaldecode: {name} {value} does not exist; the model has layers 0-{layers - 1}")
        roles = layer_roles(full, cfg.selection_layer, cfg.reselection_for(layers))
        sparse = [layer for layer, role in roles.items() if role == "sparse"]
        if not sparse:
            raise ValueError(
                f"tidaldecode: no full-attention layer after the selection layer to decode sparsely (full-attention "
                f"layers: {full or 'none, every layer has a sliding window'}); set selection_layer lower"
            )
        self.key = ("tidaldecode", id(self))
        self.stats.describe("selection_layers", [layer for layer, role in roles.items() if role == "select"])
        self.stats.describe("sparse_layers", len(sparse))
        at.begin_call(self._count_step)
        for layer, role in roles.items():
            at.decode_step(layer, self._selector() if role == "select" else self._sparse(), gathers=True)

    def _count_step(self, state: CallState) -> None:
        if state.phase == "decode":
            self.stats.add("decode_steps")

    def _selector(self):
        cfg = self.config

        def step(call: AttentionCall) -> AttentionCall:
            current = self._current(call)
            self._count(call, current, read=None)
            if call.state.graph is not None:  # a captured step: select on the device, every step alike
                call.state.scratch[self.key] = select_captured(call, cfg.budget, cfg.recent, cfg.selection)
                self.stats.add("selections")
                return call
            if cfg.budget > current:  # the budget holds every token: nothing to select
                call.state.scratch[self.key] = None
                return call
            call.state.scratch[self.key] = select(call, current, cfg.budget, cfg.recent, cfg.selection)
            self.stats.add("selections")
            return call

        return step

    def _sparse(self):
        def step(call: AttentionCall) -> AttentionCall:
            current = self._current(call)
            if self.key not in call.state.scratch:
                raise RuntimeError(f"tidaldecode: layer {call.layer} ran before this decode step's selection layer")
            selection = call.state.scratch[self.key]
            if call.state.graph is not None:
                self._count(call, current, read=selection.shape[1] * selection.shape[2])
                return dataclasses.replace(call, columns=selection)
            if selection is None:
                self._count(call, current, read=None)
                return call
            if reads_columns(call):  # the engine reads the selected columns in place
                columns = selection.index.reshape(call.key.shape[0], selection.heads, -1)
                self._count(call, current, read=columns.shape[1] * columns.shape[2])
                return dataclasses.replace(call, columns=columns)
            sparse = gather(call, selection)
            self._count(call, current, read=sparse.key.shape[1] * sparse.key.shape[2])
            return sparse

        return step

    @staticmethod
    def _current(call: AttentionCall) -> int:
        """The new token's column: every earlier token of the sequence is in this layer's cache."""
        current = int(call.state.past_length)
        if call.key.shape[2] <= current:
            raise RuntimeError(
                f"tidaldecode: layer {call.layer} holds {call.key.shape[2]} keys for a sequence of {current + 1} "
                "tokens; sparse decoding needs a cache that keeps every token"
            )
        return current

    def _count(self, call: AttentionCall, current: int, read: int | None) -> None:
        """Keys (vectors of one KV head) held by this layer for the step, and read by it: the whole
        cache where it attends fully, the gathered ones where it decodes sparsely."""
        b, kv = call.key.shape[:2]
        cached = b * kv * (current + 1)
        self.stats.add("keys_cached", cached, per_token=b * kv)  # a replayed step holds one token more each
        self.stats.add("keys_read", cached if read is None else b * read, per_token=b * kv if read is None else 0)
        self.stats.ratio("read_fraction", "keys_read", "keys_cached")
