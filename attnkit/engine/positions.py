"""The positions stage: at which position each query and key of a layer is rotated.

transformers rotates query and key at the call's position ids before the attention function runs.
A method that wants some query rows to see the keys at other positions (PINE re-orders prompt
segments per head and per query group) returns a :class:`Repositioning` from its hook, in positions
only: the engine un-rotates query and key with the rotation they carry, rotates them again per
query group with the model's own rotary (:func:`attnkit.compat.rotary`), and hands the logits to
the layer's pipeline (score edits -> softmax -> probability edits -> values).

A decode step's keys were rotated at earlier calls. The rotation every key carries (its cos and
sin, as its own call computed them) is kept in the sequence space, appended once per call and
rotary, so un-rotating is exact for every RoPE variant, longrope's length-dependent factors too.
Rotating again calls the rotary on a group's positions as the decoder calls it on a call's (so
longrope takes the factors of the largest of them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnkit import compat
from attnkit.engine.plan import AttentionCall
from attnkit.engine.state import append_tokens
from attnkit.primitives import compute_dtype, logits, repeat_kv, rotate, unrotate


@dataclass
class QueryGroup:
    """Query rows that see the keys at one set of positions."""

    queries: torch.Tensor
    """Where the queries are rotated: [batch, queries], or per query head [batch, heads, queries];
    given for every query of the call, read at ``rows``."""
    keys: torch.Tensor
    """Where every key is seen from these rows: [batch, keys], or per query head [batch, heads, keys]."""
    rows: torch.Tensor | None = None
    """bool [batch, queries]: the query rows of this group; None for every row."""


@dataclass
class Repositioning:
    """What a positions hook returns. A query row in no group keeps the call's own positions (its
    logits computed from the query and key as they came); a row in several takes the last group's."""

    groups: list[QueryGroup]


PositionsFn = Callable[[AttentionCall], "Repositioning | None"]
"""A positions hook: (call) -> the positions to attend at, or None to leave the call alone."""


@dataclass
class PositionStage:
    """One layer's positions hook, with the model's rotary for that layer."""

    fn: PositionsFn
    rotary: compat.Rotary

    def logits(self, call: AttentionCall) -> torch.Tensor | None:
        """The layer's unmasked logits [batch, heads, queries, keys] at the positions the hook asks
        for; None where it leaves the call alone."""
        carried = carried_rotation(call, self.rotary)
        plan = self.fn(call)
        return None if plan is None or not plan.groups else repositioned_logits(call, plan, self.rotary, carried)


def position_stage(model: torch.nn.Module, attention: torch.nn.Module, fn: PositionsFn, head_dim: int) -> PositionStage:
    """The positions stage of the layer whose attention module is ``attention``. Raises ValueError
    for a layer without RoPE, or one its modeling file rotates otherwise than :func:`rotate`."""
    rotary = compat.rotary(model, attention)
    check_convention(attention, rotary, head_dim)
    return PositionStage(fn, rotary)


def check_convention(attention: torch.nn.Module, rotary: compat.Rotary, head_dim: int) -> None:
    """Refuse a layer whose modeling file rotates otherwise than :func:`rotate` (Cohere and GLM pair
    neighbouring dims, Llama 4 rotates complex numbers): re-rotating would compute something else."""
    apply = compat.apply_rotary_pos_emb(attention)
    device = next(attention.parameters()).device
    probe = torch.randn(1, 1, 3, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    cos, sin = rotary(probe, torch.tensor([[0, 5, 17]], device=device))
    if apply is None or not torch.allclose(apply(probe, probe, cos, sin)[0], rotate(probe, cos[:, None], sin[:, None])):
        raise ValueError(
            f"layer {attention.layer_idx} ({type(attention).__name__}) rotates queries and keys otherwise than "
            "transformers' half-split RoPE (apply_rotary_pos_emb with rotate_half); the positions stage supports "
            "only that rotation"
        )


def own_positions(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries [batch, queries], keys [batch, keys]): where the call's queries and this layer's
    keys were rotated, the plan that changes nothing. A layer's keys are the sequence's last ones (a
    sliding-window layer keeps fewer)."""
    state = call.state
    held = state.key_positions if state is not None else None
    keys = call.key.shape[-2]
    if held is None or held.shape[1] < keys:
        raise RuntimeError(
            f"layer {call.layer} reads {keys} keys, but attnkit saw the positions of "
            f"{0 if held is None else held.shape[1]}: the positions stage needs every call on a cache, from its "
            "prefill, to go through the model's forward (or handle.call)"
        )
    return held[:, -call.query.shape[-2] :], held[:, -keys:]


def carried_rotation(call: AttentionCall, rotary: compat.Rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [batch, keys, rotary dims] that this layer's keys were rotated with, each by its
    own call; the call's queries are the last ones. Kept per rotary in the sequence space: the
    first layer of each call that reads it appends the call's, computed as the decoder did."""
    state = call.state
    if state is None or state.positions is None:
        raise RuntimeError(
            f"layer {call.layer}: the positions stage needs a call attnkit tracks, with one position id per "
            "token (call the model, or run the layers inside handle.call)"
        )
    store = state.sequence.setdefault("rotations", {})
    held = store.get(rotary, (None, None))
    if held[0] is None or held[0].shape[1] == state.past_length:
        cos, sin = rotary(call.query, state.positions.to(call.query.device))
        held = store[rotary] = (append_tokens(held[0], cos), append_tokens(held[1], sin))
    if held[0].shape[1] != state.total_length:
        raise RuntimeError(
            f"layer {call.layer}: the sequence holds {state.total_length} tokens with this call, but the positions "
            f"stage knows the rotation of {held[0].shape[1]}; it must see every call on a cache, from its prefill "
            "(and a cache's batch may grow only by Cache.batch_repeat_interleave)"
        )
    keys = call.key.shape[-2]
    if keys > state.total_length:
        raise ValueError(
            f"layer {call.layer} reads {keys} keys for a {state.total_length}-token sequence (a static cache?); "
            "the positions stage supports dynamic caches"
        )
    return held[0][:, -keys:], held[1][:, -keys:]


def repositioned_logits(
    call: AttentionCall, plan: Repositioning, rotary: compat.Rotary, carried: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Logits [batch, heads, queries, keys] (at least float32) with each group's rows at its
    positions and the other rows at the call's own; un-rotation and rotation run in that dtype."""
    dtype = compute_dtype(call.query)
    cos, sin = (t.to(dtype)[:, None] for t in carried)
    batch, heads, length, _ = call.query.shape
    query = unrotate(call.query.to(dtype), cos[:, :, -length:], sin[:, :, -length:])
    key = unrotate(call.key.to(dtype), cos, sin)
    scores = torch.empty(batch, heads, length, key.shape[-2], dtype=dtype, device=query.device)
    for group in plan.groups:
        index = taken(group.rows)
        if index is not None:
            scores = place(scores, group.rows, index, group_logits(call, group, index, query, key, rotary))
    if all(group.rows is not None for group in plan.groups):
        own = ~torch.stack([group.rows for group in plan.groups]).any(0)
        index = taken(own)
        if index is not None:
            part = call.logits(call.query[:, :, index], repeat_kv(call.key, heads // call.key.shape[1]))
            scores = place(scores, own, index, part)
    return scores


def taken(rows: torch.Tensor | None) -> torch.Tensor | slice | None:
    """The query rows that any batch row of ``rows`` [batch, queries] takes: every row (None
    rows), their indices, or None where no row is taken."""
    if rows is None:
        return slice(None)
    index = rows.any(0).nonzero()[:, 0]
    return index if index.numel() else None


def place(
    scores: torch.Tensor, rows: torch.Tensor | None, index: torch.Tensor | slice, part: torch.Tensor
) -> torch.Tensor:
    """``scores`` with ``part`` [batch, heads, len(index), keys] written at ``rows`` (None: every
    row, so ``part`` itself)."""
    if rows is None:
        return part
    scores[:, :, index] = torch.where(rows[:, None, index, None], part, scores[:, :, index])
    return scores


def group_logits(
    call: AttentionCall,
    group: QueryGroup,
    index: torch.Tensor | slice,
    query: torch.Tensor,
    key: torch.Tensor,
    rotary: compat.Rotary,
) -> torch.Tensor:
    """One group's logits for the query rows ``index``: the un-rotated ``query`` and ``key``
    rotated at the group's positions (keys per KV head where their positions are the same for
    every head, else per query head)."""
    heads, repeats = query.shape[1], query.shape[1] // key.shape[1]
    at_queries = head_positions(group.queries, heads, query.shape[-2], "query")[..., index]
    at_keys = head_positions(group.keys, heads, key.shape[-2], "key")
    turned = rotate(query[:, :, index], *rotation(rotary, call.query, at_queries, query.dtype))
    if at_keys.shape[1] == 1:
        keys = repeat_kv(rotate(key, *rotation(rotary, call.query, at_keys, key.dtype)), repeats)
    else:
        keys = rotate(repeat_kv(key, repeats), *rotation(rotary, call.query, at_keys, key.dtype))
    return logits(turned.to(call.query.dtype), keys.to(call.key.dtype), call.scaling, call.softcap)


def head_positions(positions: torch.Tensor, heads: int, length: int, what: str) -> torch.Tensor:
    """Positions as [batch, 1 or heads, length], checked against the call's shape."""
    shaped = positions[:, None] if positions.dim() == 2 else positions
    if shaped.dim() != 3 or shaped.shape[1] not in (1, heads) or shaped.shape[-1] != length:
        raise ValueError(
            f"{what} positions of shape {tuple(positions.shape)}: expected [batch, {length}] or [batch, {heads}, {length}]"
        )
    return shaped


def rotation(
    rotary: compat.Rotary, like: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [batch, heads, n, rotary dims] in ``dtype`` for positions [batch, heads, n], from
    the model's rotary called as the decoder calls it (in ``like``'s dtype, on [batch, positions])."""
    batch, heads, n = positions.shape
    cos, sin = rotary(like, positions.reshape(batch, heads * n))
    return cos.reshape(batch, heads, n, -1).to(dtype), sin.reshape(batch, heads, n, -1).to(dtype)
