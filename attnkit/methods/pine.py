"""``pine``: position-invariant inference over segments (PINE, Wang et al., ICLR 2025).

A prompt is a prefix, k segments (documents, answer options, the two responses a judge compares)
and a suffix. PINE removes the order of the segments from what the model sees, in every layer and
head, through the engine's positions stage (reference code: ``wzq016/PINE``,
``LlamaAttentionWithPS.forward``):

1. **Layout.** With p prefix tokens and E = p + sum(n_s), every segment is right-aligned to E:
   token t of segment s sits at E - n_s + t. The suffix and generated tokens keep E, E + 1, ...
2. **Segment queries (prefill).** A query of segment i scores the other segments without positions:
   softmax over their keys of the un-rotated q·k (the layer's scaling), per-segment attention summed
   and divided by the segment's length, summed over segment i's queries. Per head, segment i comes
   first, then the others by importance; a segment moves back by the total length of those ahead of
   it, so the most important stands closest to the reader. Segments see each other whole
   (bidirectional); a segment sees itself causally.
3. **Suffix and generated queries.** The same importance per query token and head, over all
   segments, orders them for that token alone.
4. **Prefix queries** are untouched.

The cache keeps the keys as the model rotated them; the engine re-rotates queries and keys from
the rotation they carry, so any RoPE variant transformers implements works. Rows with fewer than two
segments are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit import kernels
from attnkit.engine.attach import Attachment
from attnkit.engine.plan import AttentionCall
from attnkit.engine.positions import QueryBlocks, Repositioning
from attnkit.engine.state import CallState, shared
from attnkit.methods.base import Method, register
from attnkit.methods.markers import find, marker_ids, saved_tokenizer
from attnkit.primitives import compute_dtype, layer_window
from attnkit.recipe.methods import Marker, PineConfig


@dataclass
class Layout:
    """Where the segments of a prompt are, found at prefill and kept for the decode steps."""

    segment: torch.Tensor
    """long [batch, prompt]: 0 outside segments, 1..k inside."""
    shift_to_layout: torch.Tensor
    """long [batch, prompt]: PINE's right-aligned position minus the position the token was rotated at."""
    lengths: torch.Tensor
    """long [batch, K]: each segment's length (0 for a row with fewer than K segments)."""
    block_end: torch.Tensor
    """long [batch]: the index after the last segment token (queries from there on are readers)."""
    active: torch.Tensor
    """bool [batch]: rows with at least two segments."""
    raw_keys: dict[int, torch.Tensor]
    """Per layer, the prompt's un-rotated keys [batch, kv heads, prompt, dim] (what importance reads
    at every decode step), kept from the prefill."""
    placed_keys: dict[int, torch.Tensor]
    """Per layer, the prompt's keys rotated at PINE's layout [batch, kv heads, prompt, dim], kept
    from the prefill so that a decode step rotates its query alone."""
    rows: int = 0
    """How many rows have at least two segments (read once, at prefill)."""
    span: slice | None = None
    """The prompt keys from the first segment token of any row to the last one of any row."""
    extent: int = 0
    """A bound above every position a prompt query reads a segment from (the largest prompt position
    plus the segments' total length), read once at prefill; later tokens add theirs."""
    shares: dict[tuple[torch.dtype, int], torch.Tensor] = field(default_factory=dict)
    """Each key's segment share (one-hot over the segment's length), the values importance reads,
    by dtype and KV heads: made once per sequence, not per layer and step."""
    numbers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(segment, lengths, active) as int32, for the kernels: made once, at prefill."""
    prefill_rows: dict[int, torch.Tensor | slice] = field(default_factory=dict)
    """The prompt's query rows per role, found once on the host at prefill: each segment number's
    rows (any batch row), 0 for every segment row, -1 for the readers (suffix); a slice where they
    are one run (no copy of the query to read them)."""
    graph_blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    """The block of every slot of a captured-decoding cache [batch, capacity], by capacity: made at
    the warm-up step, read by every replay."""


@register
class Pine(Method):
    """Position-invariant inference over a prompt's segments (PINE, Wang et al. 2025)."""

    name = "pine"
    config_class = PineConfig
    replayable = True  # a captured decode step orders the segments and attends on the device

    def __init__(self, config: PineConfig | None = None, *, tokenizer: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.tokenizer = tokenizer
        self._given: torch.Tensor | None = None

    @contextmanager
    def segments(self, segment_ids: torch.Tensor) -> Iterator[None]:
        """Segment ids of the prompt of the calls inside ([batch, prompt] long: 0 outside segments,
        1..k in prompt order), for prompts without markers."""
        self._given = segment_ids
        try:
            yield
        finally:
            self._given = None

    def attach(self, at: Attachment) -> None:
        markers = None
        if self.config.markers is not None:
            markers = [self._marker_ids(m, at) for m in self.config.markers]
        self.stats.describe("markers", self.config.markers or "segment ids given in Python")
        key = f"{self.name}@{id(self)}"
        at.begin_call(lambda state: self._begin(state, key, markers))
        config = at.model.config
        text = getattr(config, "text_config", None) or config
        for layer in range(at.shape.num_layers):
            at.positions(layer, self._hook(layer, key, layer_window(text, layer)))

    # -- segments -------------------------------------------------------------------------------

    def _marker_ids(self, marker: Marker, at: Attachment) -> list[int]:
        return marker_ids(marker, self.tokenizer or saved_tokenizer(at.model), "pine: marker", "Pine")

    def _begin(self, state: CallState, key: str, markers: list[list[int]] | None) -> None:
        """At prefill: find each row's segments and their layout; later calls reuse it."""
        if state.phase != "prefill":
            return
        segment = self._segment_ids(state, markers)
        if segment is None:
            return
        layout = layout_of(segment, state.positions)
        layout.rows = int(layout.active.sum())
        highest = int(state.positions.max()) if state.positions is not None else segment.shape[1] - 1
        layout.extent = highest + 1 + int(layout.lengths.sum(-1).max())
        layout.prefill_rows = prefill_rows(layout)
        every = layout.prefill_rows.get(0)
        if isinstance(every, slice):
            layout.span = every
        elif every is not None:
            layout.span = slice(int(every[0]), int(every[-1]) + 1)
        layout.numbers = tuple(t.to(torch.int32).contiguous() for t in (layout.segment, layout.lengths, layout.active))
        state.sequence[key] = layout
        self.stats.add("segments", int(layout.lengths.gt(0).sum()))
        self.stats.add("rows_with_segments", layout.rows)

    def _segment_ids(self, state: CallState, markers: list[list[int]] | None) -> torch.Tensor | None:
        length = state.query_length
        if self._given is not None:
            given = self._given
            batch = state.positions.shape[0] if state.positions is not None else given.shape[0]
            if given.dim() != 2 or given.shape != (batch, length):
                raise ValueError(
                    f"pine: segment ids of shape {tuple(given.shape)} for a prefill of {batch} x {length} tokens; "
                    "give one id per prompt token"
                )
            return given.to(torch.long)
        if markers is None or state.input_ids is None:
            return None
        mask = state.attention_mask
        valid = mask[:, -length:].bool() if mask is not None and mask.dim() == 2 else None
        return marked_segments(state.input_ids, valid, *markers)

    # -- the positions hook --------------------------------------------------------------------

    def _hook(self, layer: int, key: str, window: int | None):
        def reposition(call: AttentionCall) -> Repositioning | None:
            state = call.state
            layout = state.sequence.get(key) if state is not None else None
            if layout is None or not layout.rows:
                return None
            if window is not None and window < state.total_length:
                raise ValueError(
                    f"pine: layer {layer} is a sliding-window layer of {window} tokens, but the sequence has "
                    f"{state.total_length}; PINE needs every segment in view: use shorter prompts, or a model "
                    "without sliding windows"
                )
            plan = repositioning(call, layout)
            if layer == 0:
                self._count(call, layout)
            return plan

        return reposition

    def _count(self, call: AttentionCall, layout: Layout) -> None:
        if call.state.phase == "decode":  # one reader per row with segments, counted without a read back
            self.stats.add("reordered_queries", layout.rows)
            return
        queries = call.query.shape[-2]
        segment_q, reader_q = query_roles(call, layout, queries)
        self.stats.add("segment_queries", int(segment_q.sum()))
        self.stats.add("reordered_queries", int(reader_q.sum()))


# ---------------------------------------------------------------------------------------------
# Segments and layout
# ---------------------------------------------------------------------------------------------


def marked_segments(
    ids: torch.Tensor, valid: torch.Tensor | None, opening: list[int], closing: list[int]
) -> torch.Tensor:
    """[batch, length] segment ids from markers: segment i runs from its opening marker to the token
    before the next opening marker; the last one ends with the closing marker after it. A row whose
    last segment is not closed gets none."""
    segment = torch.zeros_like(ids, dtype=torch.long)
    for row in range(ids.shape[0]):
        ok = valid[row].tolist() if valid is not None else [True] * ids.shape[1]
        tokens = [t if keep else None for t, keep in zip(ids[row].tolist(), ok)]
        starts = []
        at = find(tokens, opening, 0)
        while at is not None:
            starts.append(at)
            at = find(tokens, opening, at + len(opening))
        if not starts:
            continue
        close = find(tokens, closing, starts[-1] + len(opening))
        if close is None:
            continue
        ends = [*starts[1:], close + len(closing)]
        for number, (start, end) in enumerate(zip(starts, ends), start=1):
            segment[row, start:end] = number
    return segment


def layout_of(segment: torch.Tensor, positions: torch.Tensor | None) -> Layout:
    """The layout of segments ``segment`` [batch, prompt] whose tokens were rotated at ``positions``."""
    check_contiguous(segment)
    batch, length = segment.shape
    if positions is None:
        positions = torch.arange(length, device=segment.device).expand(batch, length)
    count = int(segment.max()) if segment.numel() else 0
    if count == 0:
        none = torch.zeros(batch, 0, dtype=torch.long, device=segment.device)
        return Layout(segment, torch.zeros_like(segment), none, none.sum(-1), none.sum(-1).bool(), {}, {})
    onehot = segment[..., None] == torch.arange(1, count + 1, device=segment.device)
    lengths = onehot.sum(1)
    index = torch.arange(length, device=segment.device)
    inside = segment > 0
    first = torch.where(inside, index, length).amin(-1)
    block_end = torch.where(inside, index + 1, 0).amax(-1)
    start_position = positions.gather(1, first.clamp(max=length - 1)[:, None])[:, 0]
    end = start_position + lengths.sum(-1)
    seg_start = torch.where(onehot, index[None, :, None], length).amin(1)
    offset = index - seg_start.gather(1, (segment - 1).clamp(min=0))
    layout_position = end[:, None] - lengths.gather(1, (segment - 1).clamp(min=0)) + offset
    shift = torch.where(inside, layout_position - positions, 0)
    return Layout(segment, shift, lengths, block_end, lengths.gt(0).sum(-1) >= 2, {}, {})


def prefill_rows(layout: Layout) -> dict[int, torch.Tensor | slice]:
    """The prompt's query rows per role (see :attr:`Layout.prefill_rows`), on the device or as a
    slice; roles no row has are left out."""
    segment, active = layout.segment.tolist(), layout.active.tolist()
    ends = layout.block_end.tolist()
    found: dict[int, set[int]] = {}
    for row, acts, end in zip(segment, active, ends, strict=True):
        if not acts:
            continue
        for index, number in enumerate(row):
            if number:
                found.setdefault(number, set()).add(index)
                found.setdefault(0, set()).add(index)
            elif index >= end:
                found.setdefault(-1, set()).add(index)
    device = layout.segment.device

    def rows_of(rows: set[int]) -> torch.Tensor | slice:
        first, last = min(rows), max(rows)
        return slice(first, last + 1) if len(rows) == last + 1 - first else torch.tensor(sorted(rows), device=device)

    return {role: rows_of(rows) for role, rows in sorted(found.items())}


def check_contiguous(segment: torch.Tensor) -> None:
    """Segments 1..k in order, each one run of tokens, with nothing between them."""
    for row in segment.tolist():
        ids = [s for s in row if s]
        runs = [s for i, s in enumerate(row) if s and (i == 0 or row[i - 1] != s)]
        first = next((i for i, s in enumerate(row) if s), None)
        if first is None:
            continue
        last = len(row) - next(i for i, s in enumerate(reversed(row)) if s)
        if runs != list(range(1, len(runs) + 1)) or len(ids) != last - first:
            raise ValueError(
                "pine: segment ids must number the segments 1..k in prompt order, each one run of tokens, with no "
                f"other token between them; got {runs} over {last - first} positions with {len(ids)} segment tokens"
            )


# ---------------------------------------------------------------------------------------------
# The repositioning of one call
# ---------------------------------------------------------------------------------------------


def query_roles(call: AttentionCall, layout: Layout, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [batch, queries] each: queries inside a segment, and readers after the segment block;
    the same for every layer of a call, so made once per call."""

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        segment_q = keys_segment(call, layout)[:, -queries:]
        index = torch.arange(call.state.total_length - queries, call.state.total_length, device=segment_q.device)
        active = layout.active.to(segment_q.device)[:, None]
        readers = (index[None, :] >= layout.block_end.to(segment_q.device)[:, None]) & active
        return (segment_q > 0) & active, readers

    return shared(call.state, ("pine roles", id(layout), queries), make)


def keys_segment(call: AttentionCall, layout: Layout) -> torch.Tensor:
    """long [batch, keys]: the segment of every key of the call (0 after the prompt)."""
    keys = call.key.shape[-2]
    segment = layout.segment.to(call.key.device)
    extra = keys - segment.shape[1]
    if extra < 0:
        raise ValueError(f"pine: layer {call.layer} reads {keys} keys of a {segment.shape[1]}-token prompt")
    return torch.nn.functional.pad(segment, (0, extra))


def repositioning(call: AttentionCall, layout: Layout) -> Repositioning:
    """Where every query of a call reads each block of keys (block 0: the prefix, block s: segment
    s, block K + 1: the keys after the segments), and which segments see each other.

    A segment's queries read the other segments moved back by their order for that segment; the
    suffix and generated queries by their own order; prefix queries and rows without two segments
    read everything where it was placed. A decode step is planned without reading anything back to
    the host."""
    if call.state.graph is not None:
        return captured_repositioning(call, layout)
    state, queries = call.state, call.query.shape[-2]
    segment_k, blocks_k, placed = shared(
        state, ("pine keys", id(layout), call.key.shape[-2]), lambda: placed_keys_of(call, layout)
    )
    segment_q, placed_q = segment_k[:, -queries:], placed[:, -queries:]
    importance = Importance(call, layout)
    rotated = placed_keys(call, layout, placed)
    open_groups = None
    if state.phase == "prefill":
        in_segment, _ = query_roles(call, layout, queries)
        at = prefill_positions(call, layout, importance, segment_q, placed_q, exact=False)
        open_groups = shared(state, ("pine groups", id(layout)), lambda: (segment_q * in_segment, segment_k))
        if importance.underflowed():  # read once the plan is queued, so the device is not left idle for it
            at = prefill_positions(call, layout, importance, segment_q, placed_q, exact=True)
    else:  # decode and extend: every query reads the segments in its own order
        base = shared(state, ("pine base", id(layout), queries), lambda: placed_q.to(torch.int32))
        at = importance.reader_positions(slice(None), base)
    extent = layout.extent + state.total_length - layout.segment.shape[1]
    blocks = QueryBlocks(blocks_k, at, placed, rotated=rotated, extent=extent)
    return Repositioning([], [blocks], open_groups)


def prefill_positions(
    call: AttentionCall,
    layout: Layout,
    importance: Importance,
    segment_q: torch.Tensor,
    placed_q: torch.Tensor,
    exact: bool,
) -> torch.Tensor:
    """int32 [batch, heads, queries, K + 2]: where each prompt query reads each block. A segment's
    queries read the other segments in their segment's order (``exact``: importance from the masked
    softmax, see :meth:`Importance.segment_to_segment`), readers in their own, the rest unmoved."""
    queries, heads = call.query.shape[-2], call.query.shape[1]
    in_segment, readers = query_roles(call, layout, queries)
    count = importance.lengths.shape[1]
    at = placed_q[:, None, :, None].expand(-1, heads, -1, count + 2).to(torch.int32)  # every block unmoved
    rows = layout.prefill_rows
    if 0 in rows:
        index = rows[0]
        between = importance.segment_to_segment(in_segment, segment_q, index, exact)
        order = back_shift(between, importance.lengths)
        segment = (segment_q[:, None, index, None] - 1).clamp(min=0).expand(-1, heads, -1, count)
        at[:, :, index, 1:-1] += order.to(torch.int32).gather(2, segment) * in_segment[:, None, index, None]
    if -1 in rows:  # a prompt position is a segment's in one batch row and a reader's in another
        index = rows[-1]
        mine = readers[:, None, index, None]
        at[:, :, index] = torch.where(mine, importance.reader_positions(index, placed_q[:, index]), at[:, :, index])
    return at


def captured_repositioning(call: AttentionCall, layout: Layout) -> Repositioning:
    """A captured decode step's plan, on the device and of fixed shapes: the keys' blocks over the
    cache's whole capacity (the slots after the prompt in block K + 1, which the kernel reads up to
    the filled length), the step's query in its own order from its device-side position, the
    prompt's keys as kept from the prefill and the later ones as the model rotated them."""
    capacity, prompt = call.key.shape[-2], layout.segment.shape[1]
    blocks = layout.graph_blocks.get(capacity)
    if blocks is None:
        blocks = layout.graph_blocks[capacity] = keys_block(keys_segment(call, layout), layout)
    base = call.state.graph.inputs.positions
    at = Importance(call, layout).reader_positions(slice(None), base)
    rotated = (layout.placed_keys[call.layer], call.key[:, :, prompt:])
    extent = layout.extent + capacity - prompt
    return Repositioning([], [QueryBlocks(blocks, at, None, rotated=rotated, extent=extent)])


def placed_keys_of(call: AttentionCall, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segment of every key, its block, its position in PINE's right-aligned layout), the same for
    every full-attention layer of a call. Blocks: 0 the prefix, s segment s, K + 1 the keys after
    the segments (read from where they are, as the prefix, but a run of their own)."""
    segment_k = keys_segment(call, layout)
    count = segment_k.shape[1]
    carried = call.state.key_positions.to(call.key.device)[:, -count:]
    shift = torch.nn.functional.pad(layout.shift_to_layout.to(carried.device), (0, count - layout.segment.shape[1]))
    return segment_k, keys_block(segment_k, layout), carried + shift


def keys_block(segment_k: torch.Tensor, layout: Layout) -> torch.Tensor:
    """long [batch, keys]: the block of every key whose segment is ``segment_k``: 0 the prefix, s
    segment s, K + 1 the keys after the segments."""
    index = torch.arange(segment_k.shape[1], device=segment_k.device)
    after = index[None, :] >= layout.block_end.to(segment_k.device)[:, None]
    return torch.where(after, layout.lengths.shape[1] + 1, segment_k)


def placed_keys(call: AttentionCall, layout: Layout, placed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The call's keys rotated at PINE's layout: the prompt's kept from the prefill, the later ones as
    the model rotated them (their layout position is their own)."""
    prompt = layout.segment.shape[1]
    kept = layout.placed_keys.get(call.layer)
    if kept is None:
        kept = call.rotate_at(call.unrotated_key(narrow=True)[:, :, :prompt], placed[:, None, :prompt])
        layout.placed_keys[call.layer] = kept
    return (kept, call.key[:, :, prompt:])


class Importance:
    """Segment importance without positions: softmax of the un-rotated q·k (the layer's scaling) over
    segment keys, summed per segment and divided by its length. That is attention whose values are
    each key's segment (one-hot, over its length), so the backend's fused kernel computes it without
    the full matrix. The prompt's un-rotated keys are kept from the prefill: a decode step un-rotates
    its query alone."""

    underflow: torch.Tensor | None = None
    """bool [] on the device: whether some segment query's other segments all underflowed in the
    last unmasked :meth:`segment_to_segment` (None: none was made)."""

    def __init__(self, call: AttentionCall, layout: Layout):
        prompt = layout.segment.shape[1]
        raw = layout.raw_keys.get(call.layer)
        if raw is None:
            raw = layout.raw_keys[call.layer] = call.unrotated_key(narrow=True)[:, :, :prompt]
        self.call, self.key, self.layout = call, raw, layout
        self.segment, self.lengths = layout.segment, layout.lengths

    @property
    def query(self) -> torch.Tensor:
        """The un-rotated query in the keys' dtype (the model's)."""
        return self.call.unrotated_query(narrow=True)

    @property
    def values(self) -> torch.Tensor:
        """Each key's segment share [batch, kv heads, prompt, K rounded up to 8], made once per sequence."""
        kind = (self.key.dtype, self.key.shape[1])
        if kind not in self.layout.shares:
            count = self.lengths.shape[1]
            numbers = torch.arange(1, count + 1, device=self.key.device)
            share = (self.segment[..., None] == numbers) / self.lengths.clamp(min=1)[:, None, :]
            width = -(-count // 8) * 8  # the fused kernels want the value width a multiple of 8
            share = torch.nn.functional.pad(share, (0, width - count)).to(self.key.dtype)
            self.layout.shares[kind] = share[:, None].expand(-1, self.key.shape[1], -1, -1).contiguous()
        return self.layout.shares[kind]

    def reader_positions(self, rows: torch.Tensor | slice, base: torch.Tensor) -> torch.Tensor:
        """[batch, heads, len(rows), K + 2]: where each of the query ``rows`` (readers, at ``base``
        [batch, len(rows)]) reads block 0, each segment in its own order, and block K + 1; rows
        without two segments read everything at ``base``. One kernel on the GPU."""
        query, count = self.call.unrotated_query(narrow=True), self.lengths.shape[1]
        if kernels.available(query) and query.shape[-1] in kernels.HEAD_DIMS and count <= kernels.MAX_SEGMENTS:
            numbers = self.layout.numbers
            return kernels.segment_order(
                query[:, :, rows], self.key, numbers[0], numbers[1], base, numbers[2], self.call.scaling
            )
        active = self.layout.active[:, None, None, None]
        moved = back_shift(self.per_query(rows), self.lengths) * active
        unmoved = torch.zeros_like(moved[..., :1])
        return torch.cat([unmoved, moved, unmoved], -1) + base[:, None, :, None]

    def attention(
        self, rows: torch.Tensor | slice, mask: torch.Tensor | None, keys: slice = slice(None)
    ) -> torch.Tensor:
        """[batch, heads, rows, K] for the query ``rows`` over the prompt's ``keys`` under the additive
        ``mask`` [batch, 1, rows, prompt] (a row that sees no key gets a finite, meaningless value:
        callers weigh it by 0)."""
        query, key, values = (
            t.contiguous() for t in (self.query[:, :, rows], self.key[:, :, keys], self.values[:, :, keys])
        )
        out = torch.nn.functional.scaled_dot_product_attention(  # contiguous: what the fused backends take
            query, key, values, attn_mask=mask, scale=self.call.scaling, enable_gqa=True
        )
        return out[..., : self.lengths.shape[1]].to(compute_dtype(self.call.query))

    def mask(self, name: str, visible: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The additive mask of ``visible()`` (bool [batch, rows, prompt]), made once per call."""

        def make() -> torch.Tensor:
            seen = visible()
            mask = torch.zeros(seen.shape, dtype=self.key.dtype, device=self.key.device)
            return mask.masked_fill(~seen, torch.finfo(self.key.dtype).min)[:, None]

        return shared(self.call.state, ("pine importance mask", name, self.key.dtype), make)

    def segment_to_segment(
        self, in_segment: torch.Tensor, segment_q: torch.Tensor, rows: torch.Tensor | slice, exact: bool = False
    ) -> torch.Tensor:
        """[batch, heads, K, K]: the importance of segment s to the queries of segment i (the query
        ``rows``), summed over them, each query seeing the segments other than its own; its own
        first (+inf). With two segments the order is fixed (its own, then the other), so nothing
        is computed (the reference code computes it and finds the same order).

        A softmax over the other segments' keys is the softmax over all of the keys renormalised
        over those segments: their shares divided by the sum of the other segments' shares, the
        normaliser and every key outside a segment cancelling. So one attention call without a mask
        over the segment block serves every query (a mask per query would rule out the backend's
        fastest kernel, and cost a [prompt, prompt] tensor). Where some query's other segments all
        underflow against its own (logits ~87 apart in float32), :meth:`underflowed` says so, and
        the caller asks again with ``exact``: the masked softmax."""
        count = self.lengths.shape[1]
        device = self.key.device
        eye = torch.eye(count, dtype=torch.bool, device=device)
        if count <= 2:
            shape = (self.segment.shape[0], self.query.shape[1], count, count)
            return torch.zeros(shape, dtype=self.query.dtype, device=device).masked_fill(eye, float("inf"))
        numbers = torch.arange(1, count + 1, device=device)
        own = segment_q[:, rows, None] == numbers  # [batch, rows, K]
        weight = (own & in_segment[:, rows, None]).to(self.query.dtype)
        if exact:
            inside = self.segment > 0
            mask = self.mask(
                "segments", lambda: inside[:, None, :] & (self.segment[:, None, :] != segment_q[:, rows, None])
            )
            per_query = self.attention(rows, mask)
        else:
            shares = self.attention(rows, None, self.layout.span or slice(None))  # each segment's mean share
            whole = shares * self.lengths[:, None, None, :].to(shares.dtype)
            others = whole.masked_fill(own[:, None], 0).sum(-1, keepdim=True)
            per_query = torch.where(others > 0, shares / others.clamp(min=torch.finfo(others.dtype).tiny), 0)
            self.underflow = ((others[..., 0] == 0) & (weight.sum(-1) > 0)[:, None]).any()
        total = torch.einsum("bqi,bhqs->bhis", weight, per_query.to(self.query.dtype))
        total = total.to(compute_dtype(self.call.query))
        return total.masked_fill(eye, float("inf"))

    def underflowed(self) -> bool:
        """Whether the last unmasked segment importance lost a query's other segments (a host read)."""
        return self.underflow is not None and bool(self.underflow)

    def per_query(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """[batch, heads, len(rows), K]: the importance of every segment to each of the query ``rows``."""
        queries = self.query[:, :, rows].shape[-2]
        mask = self.mask(f"readers {queries}", lambda: (self.segment > 0)[:, None, :].expand(-1, queries, -1))
        return self.attention(rows, mask)


def back_shift(importance: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """long [..., K]: how far each segment moves back, the total length of the segments ranked
    ahead of it by ``importance`` [batch, heads, n, K] (descending, ties in segment order)."""
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    sizes = lengths[:, None, None, :].expand_as(order).gather(-1, order)
    ahead = torch.cumsum(sizes, -1) - sizes
    return torch.empty_like(ahead).scatter_(-1, order, ahead)


# ---------------------------------------------------------------------------------------------
# Inputs from texts
# ---------------------------------------------------------------------------------------------

SENTINEL = "\x00attnkit-segments\x00"


@dataclass(frozen=True)
class SegmentedPrompt:
    """A prompt as PINE reads it: ``prefix``, the ``segments`` whose order must not matter, ``suffix``."""

    prefix: str
    segments: list[str]
    suffix: str


def segment_inputs(
    tokenizer: Any, prompts: list[SegmentedPrompt], *, chat_template: bool | str = "auto", system: str | None = None
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (left-padded) and ``segment_ids`` for a batch of prompts.

    Every piece is tokenized on its own, so a segment's tokens do not depend on its neighbours.
    With the chat template (``"auto"``: when the tokenizer has one), the prompt is the user turn:
    the template's opening joins the prefix and its closing the suffix.
    """
    head, tail = template_ends(tokenizer, chat_template, system)
    rows, segments = [], []
    for prompt in prompts:
        pieces = [head + prompt.prefix, *prompt.segments, prompt.suffix + tail]
        ids = [tokenizer.encode(piece, add_special_tokens=(i == 0 and not head)) for i, piece in enumerate(pieces)]
        rows.append(sum(ids, []))
        segments.append(
            [0] * len(ids[0]) + sum(([n] * len(t) for n, t in enumerate(ids[1:-1], 1)), []) + [0] * len(ids[-1])
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "segment_ids": torch.tensor([[0] * (width - len(s)) + s for s in segments]),
    }


def template_ends(tokenizer: Any, chat_template: bool | str, system: str | None) -> tuple[str, str]:
    """The chat template's text before and after the user's content ("" and "" without one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is True and not has:
        raise ValueError("pine: chat_template=True, but the tokenizer has no chat template; pass False or 'auto'")
    if not (has if chat_template == "auto" else chat_template):
        return "", ""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, _, tail = text.partition(SENTINEL)
    return head, tail
