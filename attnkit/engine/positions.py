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

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attnkit import compat, kernels
from attnkit.engine.graphs import GraphError, GraphLayer
from attnkit.engine.plan import AttentionCall
from attnkit.engine.state import append_tokens, shared
from attnkit.primitives import compute_dtype, layer_window, logits, repeat_kv, rotate, unrotation

SHORT = 8
"""Calls of at most this many queries compute every row and select, rather than find the rows on the
host (a decode step must not wait for the device)."""


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
    index: torch.Tensor | None = None
    """The query indices any batch row of ``rows`` takes, where the method knows them without asking
    the device (PINE at prefill); None: found from ``rows``."""


@dataclass
class QueryBlocks:
    """Query rows that see each block of keys from a position of its own, for orderings that differ
    from one query to the next: a key of block ``v`` rotated at ``keys`` is read by a query rotated at
    ``queries[..., v]``. RoPE depends only on the difference, so this equals moving the block's keys
    per query, at the cost of one query rotation per block instead of one key rotation per query."""

    blocks: torch.Tensor
    """long [batch, keys]: the block of every key, 0 to V - 1."""
    queries: torch.Tensor
    """[batch, 1 or heads, queries, V]: where each query is rotated to read each block."""
    keys: torch.Tensor | None
    """[batch, keys]: where the keys are rotated (one rotation for every query and block); None
    where ``rotated`` holds them rotated already."""
    index: torch.Tensor | None = None
    """The query indices any batch row of ``rows`` takes, where the method knows them; None: found
    from ``rows``."""
    rotated: tuple[torch.Tensor, ...] | None = None
    """The keys already rotated at ``keys``, as parts [batch, kv heads, keys of the part, dim] in key
    order, where the method keeps them (a decode step then rotates its query only, not the whole
    cache, nor copies it into one tensor); None: rotated here."""
    rows: torch.Tensor | None = None
    """bool [batch, queries]: the query rows read this way; None for every row."""
    extent: int | None = None
    """A bound, known on the host, above every position in ``queries``: with it (and every row
    taken), the fused kernel reads the rotations from one table of that many positions."""


@dataclass
class Repositioning:
    """What a positions hook returns. A query row in no group keeps the call's own positions (its
    logits computed from the query and key as they came); a row in several takes the last group's,
    and rows of ``blocks`` come after every group."""

    groups: list[QueryGroup]
    blocks: list[QueryBlocks] = field(default_factory=list)
    open: tuple[torch.Tensor, torch.Tensor] | None = None
    """(query groups long [batch, queries], key groups long [batch, keys]): a query of group g > 0
    also sees every key of another group > 0, past the call's causal mask (PINE's segments see each
    other whole); None keeps the call's mask."""


PositionsFn = Callable[[AttentionCall], "Repositioning | None"]
"""A positions hook: (call) -> the positions to attend at, or None to leave the call alone."""


@dataclass
class PositionStage:
    """One layer's positions hook, with the model's rotary for that layer."""

    fn: PositionsFn
    rotary: compat.Rotary
    window: int | None = None
    """The layer's sliding window (None: full attention); the fused kernel knows no window."""
    tabled: bool = False
    """Whether the rotary's cos and sin at a position do not depend on the other positions of the
    call (every variant but longrope), so that one table serves every query."""

    def plan(
        self, call: AttentionCall, carried: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Repositioning | None:
        """The hook's plan for this call (None: leave it alone); sets the call's carried rotation:
        ``carried`` where the caller knows it (a captured step: its query's only), else the keys'."""
        call.carried = carried if carried is not None else carried_rotation(call, self.rotary)
        dtype = compute_dtype(call.query)
        call.inverse = shared(
            call.state,
            ("inverse rotation", self.rotary, call.carried[0].shape[1], dtype),
            lambda: unrotation(*(t.to(dtype)[:, None] for t in call.carried)),
        )
        # a partial over the query, not a closure over the call: the call must not hold itself in a
        # cycle, which keeps every layer's tensors alive until the garbage collector runs
        call.rotate_at = functools.partial(rotate_at, self.rotary, call.query)
        plan = self.fn(call)
        if plan is None or not (plan.groups or plan.blocks):
            return None
        return plan

    def logits(self, call: AttentionCall) -> torch.Tensor | None:
        """The layer's unmasked logits [batch, heads, queries, keys] at the positions the hook asks
        for, for layers whose scores or probabilities are edited next; None where it leaves the call
        alone."""
        plan = self.plan(call)
        if plan is None:
            return None
        call.mask = opened_mask(call, plan.open)
        return repositioned_logits(call, plan, self.rotary)

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """The layer's attention output [batch, queries, heads, dim] at the positions the hook asks
        for, without the full matrix: each query group through the backend's fused kernel (sdpa),
        the rows of query blocks in chunks; None where the hook leaves the call alone."""
        plan = self.plan(call)
        if plan is None:
            return None
        if self.fusable(call, plan):
            return fused_blocks(call, plan.blocks[0], plan.open, self.rotary)
        call.mask = opened_mask(call, plan.open)
        return repositioned_attention(call, plan, self.rotary)

    def captured(self, call: AttentionCall, cached: GraphLayer) -> torch.Tensor | None:
        """A captured decode step's output [batch, 1, heads, dim] over the fixed-capacity layer
        ``cached``, through the fused kernel with the filled length read on the device; None where
        the hook leaves the call alone. The query's rotation is the model's rotary at the step's
        device-side positions; a plan the kernel cannot run raises :class:`GraphError` (captured
        decoding then decodes eagerly)."""
        plan = self.plan(call, carried=self.rotary(call.query, call.state.graph.inputs.positions))
        if plan is None:
            return None
        window_ok = self.window is None or self.window >= call.key.shape[-2]
        if not (self.fusable_plan(call, plan) and window_ok and plan.open is None and plan.blocks[0].rotated):
            raise GraphError(
                f"layer {call.layer}: a captured step repositions through the fused kernel only (CUDA, Triton, one "
                "set of query blocks with its keys rotated, a rotary whose table serves every query, no sliding "
                "window shorter than the cache)"
            )
        return fused_blocks(call, plan.blocks[0], None, self.rotary, cached)

    def fusable(self, call: AttentionCall, plan: Repositioning) -> bool:
        """Whether the plan runs in the fused kernel: one set of query blocks for every row, a bound
        on its positions, one rotation table, no window, the padding mask transformers builds."""
        state = call.state
        return (
            self.fusable_plan(call, plan)
            and (self.window is None or self.window >= state.total_length)
            and (state.attention_mask is None or state.attention_mask.dim() == 2)
        )

    def fusable_plan(self, call: AttentionCall, plan: Repositioning) -> bool:
        """The kernel's own conditions: one set of query blocks for every row, a bound on its
        positions, one rotation table, a head dim it compiles for."""
        return (
            kernels.available(call.query)
            and not plan.groups
            and len(plan.blocks) == 1
            and plan.blocks[0].rows is None
            and plan.blocks[0].extent is not None
            and self.tabled
            and call.carried[0].shape[-1] == call.query.shape[-1]
            and call.query.shape[-1] in kernels.HEAD_DIMS
        )


def position_stage(model: torch.nn.Module, attention: torch.nn.Module, fn: PositionsFn, head_dim: int) -> PositionStage:
    """The positions stage of the layer whose attention module is ``attention``. Raises ValueError
    for a layer without RoPE, or one its modeling file rotates otherwise than :func:`rotate`."""
    rotary = compat.rotary(model, attention)
    check_convention(attention, rotary, head_dim)
    return PositionStage(fn, rotary, layer_window(attention.config, attention.layer_idx), tabled(attention, rotary))


def tabled(attention: torch.nn.Module, rotary: compat.Rotary) -> bool:
    """Whether ``rotary`` gives a position the same cos and sin whatever the call's other positions
    (longrope switches its factors with the largest one)."""
    device = next(attention.parameters()).device
    probe = torch.zeros(1, 1, dtype=torch.float32, device=device)
    alone = rotary(probe, torch.tensor([[0, 1, 2]], device=device))
    beside = rotary(probe, torch.tensor([[0, 1, 2, 1 << 17]], device=device))
    return all(torch.equal(a, b[:, :3]) for a, b in zip(alone, beside))


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
    if held[0] is None or held[0].shape[1] != state.total_length:
        cos, sin = rotary(call.query, state.positions.to(call.query.device))
        past = state.past_length
        held = store[rotary] = (append_tokens(held[0], cos, past), append_tokens(held[1], sin, past))
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


def repositioned_logits(call: AttentionCall, plan: Repositioning, rotary: compat.Rotary) -> torch.Tensor:
    """Logits [batch, heads, queries, keys] (at least float32) with each group's rows at its
    positions and the other rows at the call's own; un-rotation and rotation run in that dtype."""
    batch, heads, length, _ = call.query.shape
    dtype = compute_dtype(call.query)
    scores = torch.empty(batch, heads, length, call.key.shape[-2], dtype=dtype, device=call.query.device)
    for group in plan.groups:
        index = group.index if group.index is not None else taken(group.rows)
        if index is not None:
            query, keys = group_rotated(call, group, index, rotary)
            scores = place(scores, group.rows, index, logits(query, keys, call.scaling, call.softcap))
    for blocks in plan.blocks:
        for index in chunks(blocks, call):
            scores = place(scores, blocks.rows, index, block_logits(call, blocks, index, rotary))
    own = own_rows(plan)
    index = taken(own) if own is not None else None
    if index is not None:
        part = call.logits(call.query[:, :, index], repeat_kv(call.key, heads // call.key.shape[1]))
        scores = place(scores, own, index, part)
    return scores


def repositioned_attention(call: AttentionCall, plan: Repositioning, rotary: compat.Rotary) -> torch.Tensor:
    """The attention output [batch, queries, heads, dim] of :func:`repositioned_logits`, group by
    group through sdpa and the query blocks in row chunks, never holding the whole matrix."""
    heads = call.query.shape[1]
    value = repeat_kv(call.value, heads // call.value.shape[1])
    out = torch.empty_like(call.query)
    for group in plan.groups:
        index = group.index if group.index is not None else taken(group.rows)
        if index is not None:
            query, keys = group_rotated(call, group, index, rotary)
            out = place(out, group.rows, index, fused(call, query, keys, value, index))
    for blocks in plan.blocks:
        for index in chunks(blocks, call):
            scores = block_logits(call, blocks, index, rotary)
            if call.mask is not None:
                scores = scores + call.mask[:, :, index]
            part = torch.matmul(torch.softmax(scores, -1).to(value.dtype), value)
            out = place(out, blocks.rows, index, part)
    own = own_rows(plan)
    index = taken(own) if own is not None else None
    if index is not None:
        keys = repeat_kv(call.key, heads // call.key.shape[1])
        out = place(out, own, index, fused(call, call.query[:, :, index], keys, value, index))
    return out.transpose(1, 2).contiguous()


def fused_blocks(
    call: AttentionCall,
    blocks: QueryBlocks,
    open: tuple[torch.Tensor, torch.Tensor] | None,
    rotary: compat.Rotary,
    cached: GraphLayer | None = None,
) -> torch.Tensor:
    """The output [batch, queries, heads, dim] of query blocks that take every row, through the
    fused kernel: no query copy per block, no logits in memory, the mask made on chip. ``cached``:
    a captured step's fixed-capacity layer, whose filled length and padding the kernel reads."""
    state, count = call.state, call.key.shape[-2]
    table = rotation_table(call, rotary, blocks.extent)
    parts = blocks.rotated or (call.rotate_at(call.unrotated_key(), blocks.keys[:, None]).to(call.key.dtype),)
    valid = length = None
    if cached is not None:  # the slots' padding, in the kernel's int8 once per call (a replayed step: once per step)
        slots = cached.valid
        valid = None if slots is None else shared(state, ("valid slots", id(slots)), lambda: slots.to(torch.int8))
        length = cached.filled()
    elif state.attention_mask is not None:
        valid = shared(  # as the kernel reads it, once per call
            state, ("valid keys", count), lambda: state.attention_mask[:, -count:].to(torch.int8).contiguous()
        )
    number = blocks.queries.shape[-1]
    groups = open[1] if open is not None else None
    runs = shared(
        state, ("block runs", id(blocks.blocks), number), lambda: kernels.block_runs(blocks.blocks, number, groups)
    )
    narrow = shared(state, ("int32 blocks", id(blocks.blocks)), lambda: blocks.blocks.to(torch.int32))
    given = open
    if given is not None:  # the kernel's int32 groups, made once per call
        open = shared(
            state, ("int32 groups", id(given[0])), lambda: tuple(t.to(torch.int32).contiguous() for t in given)
        )
    query = call.unrotated_query(narrow=True)
    out = kernels.block_attention(
        query, blocks.queries, table, parts, call.value, narrow, call.scaling, valid, open, runs, length=length
    )
    return out.transpose(1, 2).contiguous()


def rotation_table(call: AttentionCall, rotary: compat.Rotary, extent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of positions 0 to at least ``extent`` - 1 in the model's dtype (the values its own
    rotation multiplies by), from the model's rotary; kept for the sequence and doubled when a call
    needs more. [positions, dim], or [positions, dim / 2] where the two halves are equal (transformers
    repeats the frequencies), which the fused kernel then reads once."""
    store = call.state.sequence.setdefault("rotation tables", {})
    held = store.get(rotary)
    if held is None or held[0].shape[0] < extent:
        length = max(extent, 2 * held[0].shape[0]) if held is not None else extent
        like = call.query.new_empty(0)  # the table's dtype and device
        cos, sin = (t[0] for t in rotary(like, torch.arange(length, device=like.device)[None]))
        half = cos.shape[-1] // 2
        if torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:]):
            cos, sin = cos[:, :half], sin[:, :half]
        held = store[rotary] = (cos.contiguous(), sin.contiguous())
    return held


def opened_mask(call: AttentionCall, open: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """The call's additive mask with the pairs ``open`` names opened (0), made once per call."""
    if open is None or call.mask is None:
        return call.mask

    def make() -> torch.Tensor:
        query_groups, key_groups = open
        inside = (query_groups[:, :, None] > 0) & (key_groups[:, None, :] > 0)
        opened = inside & (query_groups[:, :, None] != key_groups[:, None, :])
        return call.mask.masked_fill(opened[:, None], 0.0)

    return shared(call.state, ("opened mask", id(call.mask), id(open[0])), make)


def fused_mask(call: AttentionCall, dtype: torch.dtype) -> torch.Tensor:
    """The call's mask, finite in ``dtype``, made once per forward call."""
    whole = call.mask
    key = ("attnkit", "fused mask", id(whole), dtype)
    if call.state is None:
        return whole.to(dtype).clamp(min=torch.finfo(dtype).min)
    if key not in call.state.scratch:
        call.state.scratch[key] = (whole, whole.to(dtype).clamp(min=torch.finfo(dtype).min))
    return call.state.scratch[key][1]


def fused(
    call: AttentionCall, query: torch.Tensor, keys: torch.Tensor, value: torch.Tensor, index: torch.Tensor | slice
) -> torch.Tensor:
    """sdpa over the query rows ``index``, with the call's mask made finite in the query's dtype."""
    mask = None
    if call.mask is not None:
        whole = fused_mask(call, value.dtype)
        mask = whole[:, :, index]
    query, keys = query.to(value.dtype), keys.to(value.dtype)
    return torch.nn.functional.scaled_dot_product_attention(query, keys, value, attn_mask=mask, scale=call.scaling)


def own_rows(plan: Repositioning) -> torch.Tensor | None:
    """bool [batch, queries]: the rows no group or block takes; None when one takes every row."""
    chosen = [part.rows for part in (*plan.groups, *plan.blocks)]
    if any(rows is None for rows in chosen):
        return None
    return ~torch.stack(chosen).any(0)


def chunks(blocks: QueryBlocks, call: AttentionCall, budget: int = 1 << 26) -> list[torch.Tensor | slice]:
    """The rows of ``blocks`` in chunks whose block logits [heads, rows x blocks, keys] stay within
    ``budget`` elements."""
    index = blocks.index if blocks.index is not None else taken(blocks.rows)
    if index is None:
        return []
    rows = torch.arange(call.query.shape[-2], device=call.query.device)[index]
    per_row = call.query.shape[1] * blocks.queries.shape[-1] * call.key.shape[-2] * call.query.shape[0]
    step = max(1, budget // per_row)
    if step >= rows.numel():
        return [index]
    return list(rows.split(step))


def block_logits(
    call: AttentionCall, blocks: QueryBlocks, index: torch.Tensor | slice, rotary: compat.Rotary
) -> torch.Tensor:
    """Logits [batch, heads, rows, keys] of the query rows ``index`` when each reads every block of
    keys from its own position: the keys rotated once (or read as they came), every row rotated
    once per block, and each block's keys read by that block's rotation only."""
    heads = call.query.shape[1]
    query = call.unrotated_query()[:, :, index]
    if blocks.rotated is not None:
        parts = [part for part in blocks.rotated if part.shape[-2]]
        keys = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    else:
        keys = call.rotate_at(call.unrotated_key(), blocks.keys[:, None])
    at = blocks.queries[:, :, index]
    if at.dim() != 4 or at.shape[1] not in (1, heads):
        raise ValueError(
            f"block query positions of shape {tuple(blocks.queries.shape)}: expected [batch, 1 or {heads}, queries, blocks]"
        )
    batch, _, rows, count = at.shape
    positions = at.expand(batch, heads, rows, count).reshape(batch, heads, rows * count)
    cos, sin = (t.view(batch, heads, rows, count, -1) for t in rotation(rotary, call.query, positions, query.dtype))
    turned = rotate(query[:, :, :, None], cos, sin).to(call.query.dtype)  # [batch, heads, rows, V, dim]
    scores = torch.empty(batch, heads, rows, keys.shape[-2], dtype=compute_dtype(call.query), device=keys.device)
    for block, columns, alike in block_columns(call, blocks.blocks):
        part = grouped_logits(call, turned[:, :, :, block], keys[:, :, columns])
        if not alike:
            mine = (blocks.blocks[:, columns] == block)[:, None, None, :]
            part = torch.where(mine, part, scores[:, :, :, columns])
        scores[:, :, :, columns] = part
    return scores


def block_columns(call: AttentionCall, blocks: torch.Tensor) -> list[tuple[int, torch.Tensor, bool]]:
    """(block, the keys of that block in any batch row, whether every row agrees on them) for each
    block present, found once per call (the torch path reads them back to the host)."""

    def make() -> list[tuple[int, torch.Tensor, bool]]:
        found = []
        for block in torch.unique(blocks).tolist():
            mine = blocks == block
            columns = mine.any(0).nonzero()[:, 0]
            found.append((block, columns, bool(mine[:, columns].all())))
        return found

    return shared(call.state, ("block columns", id(blocks)), make)


def grouped_logits(call: AttentionCall, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Logits [batch, heads, queries, keys] of ``query`` [batch, heads, queries, dim] against KV-head
    ``keys`` [batch, kv heads, keys, dim], each KV head serving its query heads without copies."""
    batch, heads, length, dim = query.shape
    groups = heads // keys.shape[1]
    query = query.reshape(batch, keys.shape[1], groups * length, dim)
    out = logits(query, keys.to(query.dtype), call.scaling, call.softcap)
    return out.reshape(batch, heads, length, keys.shape[-2])


def taken(rows: torch.Tensor | None) -> torch.Tensor | slice | None:
    """The query rows that any batch row of ``rows`` [batch, queries] takes: every row (None
    rows), their indices, or None where no row is taken."""
    if rows is None or rows.shape[-1] <= SHORT:
        return slice(None)  # a decode step: every row, selected by ``place``, with no read back to the host
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


def group_rotated(
    call: AttentionCall, group: QueryGroup, index: torch.Tensor | slice, rotary: compat.Rotary
) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries of the rows ``index``, keys per query head), un-rotated and rotated again at the
    group's positions (the keys per KV head where their positions are the same for every head)."""
    query, key = call.unrotated_query(), call.unrotated_key()
    heads, repeats = query.shape[1], query.shape[1] // key.shape[1]
    at_queries = head_positions(group.queries, heads, query.shape[-2], "query")[..., index]
    at_keys = head_positions(group.keys, heads, key.shape[-2], "key")
    turned = rotate(query[:, :, index], *rotation(rotary, call.query, at_queries, query.dtype))
    dtype = call.key.dtype  # keys turn in the model's own precision, as the model turns them
    if "key as the model holds it" not in call.raw:
        call.raw["key as the model holds it"] = key.to(dtype)
    key = call.raw["key as the model holds it"]
    if at_keys.shape[1] == 1:
        keys = repeat_kv(rotate(key, *rotation(rotary, call.query, at_keys, dtype)), repeats)
    else:
        keys = rotate(repeat_kv(key, repeats), *rotation(rotary, call.query, at_keys, dtype))
    return turned.to(call.query.dtype), keys


def head_positions(positions: torch.Tensor, heads: int, length: int, what: str) -> torch.Tensor:
    """Positions as [batch, 1 or heads, length], checked against the call's shape."""
    shaped = positions[:, None] if positions.dim() == 2 else positions
    if shaped.dim() != 3 or shaped.shape[1] not in (1, heads) or shaped.shape[-1] != length:
        raise ValueError(
            f"{what} positions of shape {tuple(positions.shape)}: expected [batch, {length}] or [batch, {heads}, {length}]"
        )
    return shaped


def rotate_at(rotary: compat.Rotary, like: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` [batch, heads, n, dim] rotated at ``positions`` [batch, heads, n] by the model's rotary."""
    return rotate(x, *rotation(rotary, like, positions, x.dtype))


def rotation(
    rotary: compat.Rotary, like: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [batch, heads, n, rotary dims] in ``dtype`` for positions [batch, heads, n], from
    the model's rotary called as the decoder calls it (in ``like``'s dtype, on [batch, positions])."""
    batch, heads, n = positions.shape
    cos, sin = rotary(like, positions.reshape(batch, heads * n))
    return cos.reshape(batch, heads, n, -1).to(dtype), sin.reshape(batch, heads, n, -1).to(dtype)
