"""PINE (Wang et al., ICLR 2025, "Eliminating Position Bias of Language Models: A Mechanistic
Approach") as plain float64 loops: the test-side reference of :class:`attnkit.methods.Pine`.

One segment at a time, one head at a time, one query token at a time where the algorithm orders the
segments per query. It follows the reference code, ``wzq016/PINE``,
``pine/models/llama/modeling_llama.py`` (``LlamaAttentionWithPS.forward``, lines 90-360); the
comments name the lines each step follows ("ref. 166-203" and so on). The position layout is the
one ``pine/models/llama/tokenization_llama.py`` (``ps_call``) builds.

A prompt row is: prefix, then segments 1..k (contiguous, in prompt order), then suffix; generated
tokens follow. p = prefix length, E = p + sum of the segments' lengths n_s. The layout's positions:

- prefix token t at t;
- segment s's token t at E - n_s + t (every segment right-aligned to E);
- suffix or generated token u at E + u, which is its own index in the row.

The model (attnkit's engine) rotates the queries and keys at the row's own indices 0..T-1 before the
layer's attention runs; this reference un-rotates them with the model's own rotary, computes PINE's
attention from them and replaces the layer's attention output with it (an ``output_edit``).

Where this reference departs from the reference code, on purpose (the decided spec):

- importance logits are scaled by the layer's own ``scaling`` (the code: ``1 / sqrt(head_dim)``;
  the same for Llama and Qwen, not for Gemma's ``query_pre_attn_scalar``);
- with k = 2 segments the code skips the importance of segment queries (ref. 161-164: each segment
  first, the other second); the general rule used here gives exactly the same shifts;
- the final attention applies the layer's logit softcap where it has one (Gemma 2; the Llama file
  has none), and every softmax is float64 (the code takes them in float32 and casts back).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from attnkit.methods import Method
from attnkit.recipe.methods import MethodConfig

KEY = "reference_pine"
"""The reference's entry in ``call.state.sequence``: the prompt's segment layout, found at prefill."""


# ---------------------------------------------------------------------------------------------
# RoPE, written out (transformers' half-split pairing)
# ---------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin on the first ``cos.shape[-1]`` dims (partial rotary: the rest pass)."""
    dims = cos.shape[-1]
    turned, rest = x[..., :dims], x[..., dims:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, rest), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate`: (x·cos − rotate_half(x)·sin) / (cos² + sin²) (scaled RoPE
    variants multiply cos and sin by an attention factor, so cos² + sin² is not 1 for them)."""
    dims = cos.shape[-1]
    turned, rest = x[..., :dims], x[..., dims:]
    norm = cos * cos + sin * sin
    return torch.cat(((turned * cos - rotate_half(turned) * sin) / norm, rest), dim=-1)


# ---------------------------------------------------------------------------------------------
# The segment layout of one prompt row
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where the segments of one prompt row are (token indices), in prompt order."""

    prefix: int
    """p: the number of tokens before the first segment."""
    starts: list[int]
    """The index of each segment's first token."""
    lengths: list[int]
    """n_s: each segment's length."""

    @property
    def end(self) -> int:
        """E = p + sum n_s: the index of the first token after the segments (and its position)."""
        return self.prefix + sum(self.lengths)

    @property
    def count(self) -> int:
        return len(self.lengths)

    def segment_of(self, token: int) -> int | None:
        """The segment (0-based) that token index ``token`` lies in; None outside every segment."""
        for s, (start, n) in enumerate(zip(self.starts, self.lengths, strict=True)):
            if start <= token < start + n:
                return s
        return None

    def positions(self, shift: list[int], tokens: int) -> torch.Tensor:
        """The positions of the row's first ``tokens`` tokens when segment s is moved back by
        ``shift[s]``: prefix and later tokens at their own index, segment s's token t at
        E - n_s + t - shift[s] (all shifts 0: the layout's initial positions; ref. 209-211, 274-276)."""
        out = torch.arange(tokens)
        for s, (start, n) in enumerate(zip(self.starts, self.lengths, strict=True)):
            for t in range(n):
                if start + t < tokens:
                    out[start + t] = self.end - n + t - shift[s]
        return out


def layout_of(segment_ids: list[int]) -> Layout | None:
    """The layout of a prompt from its segment ids (0 outside segments, 1..k inside, contiguous and
    in order, no gap between segments); None with fewer than 2 segments (the model is left alone)."""
    ids = list(segment_ids)
    k = max(ids, default=0)
    if k < 2:
        return None
    starts, lengths = [], []
    for s in range(1, k + 1):
        where = [j for j, x in enumerate(ids) if x == s]
        if not where or where != list(range(where[0], where[-1] + 1)):
            raise ValueError(f"segment {s} is missing or not contiguous in {ids}")
        starts.append(where[0])
        lengths.append(len(where))
    for s in range(1, k):
        if starts[s] != starts[s - 1] + lengths[s - 1]:
            raise ValueError(f"segments {s} and {s + 1} are not adjacent in {ids}")
    if any(x != 0 for x in ids[starts[-1] + lengths[-1] :]):
        raise ValueError(f"segment ids after the last segment must be 0: {ids}")
    return Layout(prefix=starts[0], starts=starts, lengths=lengths)


def shifts_for(order: list[int], lengths: list[int]) -> list[int]:
    """Each segment's shift: the total length of the segments placed before it in ``order``
    (an exclusive cumulative sum in that order; ref. 200-202 and 266-268)."""
    shift = [0] * len(lengths)
    total = 0
    for s in order:
        shift[s] = total
        total += lengths[s]
    return shift


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class ReferencePine(Method):
    """PINE by loops, on one unpadded row called without position ids (positions 0..T-1).

    ``segment_ids``: the prompt's segment ids as a list (0 outside segments, 1..k inside). A prefill
    longer than the list (a prompt and tokens generated after it) takes the extra tokens as suffix.
    """

    name, config_class = "reference_pine", MethodConfig

    def __init__(self, segment_ids: list[int]):
        super().__init__(MethodConfig(method="reference_pine"))
        self.segment_ids = [int(x) for x in segment_ids]

    def attach(self, at) -> None:
        config = at.model.config
        self.rotary_module = at.model.model.rotary_emb
        takes_type = "layer_type" in inspect.signature(self.rotary_module.forward).parameters
        self.layer_types = config.layer_types if takes_type else None
        for layer in range(at.shape.num_layers):
            at.output_edit(layer, self.edit(layer))

    def cos_sin(self, layer: int, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own rotary at ``positions`` [n] -> cos, sin [n, rotary dims] in ``like``'s dtype."""
        ids = positions[None].to(torch.long)
        if self.layer_types is None:
            cos, sin = self.rotary_module(like, ids)
        else:  # Gemma 3: one frequency set per layer type
            cos, sin = self.rotary_module(like, ids, self.layer_types[layer])
        return cos[0].to(torch.float64), sin[0].to(torch.float64)

    def edit(self, layer: int):
        def run(call, out: torch.Tensor) -> torch.Tensor:
            state = call.state
            if state.phase == "prefill":
                state.sequence[KEY] = layout_of(self.segment_ids)  # what the prefill learned: the layout
            layout = state.sequence.get(KEY)
            if layout is None:  # fewer than 2 segments: the model untouched
                return out
            self.stats.add("layer_calls")
            return self.pine_attention(layer, call, layout).to(out.dtype)

        return run

    # -----------------------------------------------------------------------------------------

    def pine_attention(self, layer: int, call, layout: Layout) -> torch.Tensor:
        """The layer's attention output [1, queries, heads, head_dim] as PINE computes it."""
        query, key, value = call.query.double(), call.key.double(), call.value.double()
        batch, heads, queries, dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        first = call.state.past_length  # the index (and own position) of the call's first query
        if batch != 1:
            raise ValueError("the reference takes one row at a time")
        mask = call.state.attention_mask
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("the reference takes unpadded rows")
        if keys != first + queries:
            raise ValueError(f"expected every key of the row in the call: {keys} keys, {first + queries} tokens")
        if first + queries < layout.end:
            raise ValueError("a prefill must hold every segment of the prompt")
        if first > 0 and first < layout.end:
            raise ValueError("a decode or extend call must come after every segment")

        # Un-rotate: transformers rotated the call's queries and every cached key at their own index
        # (the reference code drops this rotation altogether, ref. 132-134, and caches un-rotated
        # keys, ref. 234-237).
        q_cos, q_sin = self.cos_sin(layer, query, torch.arange(first, first + queries))
        k_cos, k_sin = self.cos_sin(layer, query, torch.arange(keys))
        q_plain = unrotate(query[0], q_cos, q_sin)  # [heads, queries, dim]
        k_plain = unrotate(key[0], k_cos, k_sin)  # [kv heads, keys, dim]
        values = value[0]
        groups = heads // kv_heads

        out = torch.zeros(queries, heads, dim, dtype=torch.float64)
        for h in range(heads):
            kv = h // groups  # GQA: the KV head this query head reads (repeat_kv)
            q_h, k_h, v_h = q_plain[h], k_plain[kv], values[kv]
            rows = [first + r for r in range(queries)]  # token indices of the call's queries

            # Prefix queries: plain causal attention at their own positions (ref. 317-330).
            prefix = [j for j in rows if j < layout.prefix]
            if prefix:
                positions = torch.arange(layout.prefix)
                got = self.attend(
                    layer,
                    call,
                    q_h[[j - first for j in prefix]],
                    positions[prefix],
                    k_h[: layout.prefix],
                    positions,
                    v_h[: layout.prefix],
                    causal_by_position=True,
                )
                out[[j - first for j in prefix], h] = got

            # Segment queries, one segment at a time (prefill only; ref. 159-232).
            for i in range(layout.count):
                mine = [j for j in rows if layout.segment_of(j) == i]
                if not mine:
                    continue
                importance = self.doc_to_doc(q_h[[j - first for j in mine]], k_h, layout, i, call.scaling)
                others = [s for s in range(layout.count) if s != i]
                # Segment i first (the diagonal set to the dtype's max, ref. 190-192), then the others
                # by importance, descending; ties keep the prompt order (stable argsort, ref. 193).
                # With k = 2 the code skips the importance (ref. 161-164: shift[0, 1] = n_0 and
                # shift[1, 0] = n_1), which is what this gives for two segments.
                order = [i, *sorted(others, key=lambda s: importance[s], reverse=True)]
                shift = shifts_for(order, layout.lengths)
                key_positions = layout.positions(shift, layout.end)  # keys up to the segments' end (ref. 211, 217)
                query_positions = layout.positions([0] * layout.count, layout.end)[mine]  # initial (ref. 214-216)
                # Visible iff the key's (shifted) position <= the query's (ref. 224-227): the prefix, its own
                # segment causally, every other segment whole.
                got = self.attend(
                    layer,
                    call,
                    q_h[[j - first for j in mine]],
                    query_positions,
                    k_h[: layout.end],
                    key_positions,
                    v_h[: layout.end],
                    causal_by_position=True,
                )
                out[[j - first for j in mine], h] = got

            # Suffix queries at prefill, every decode or extend query: one query at a time (ref. 243-294).
            for j in rows:
                if j < layout.end:
                    continue
                importance = self.token_to_doc(q_h[j - first], k_h, layout, call.scaling)
                # All segments by importance, descending, stable (no diagonal here; ref. 259-263).
                order = sorted(range(layout.count), key=lambda s: importance[s], reverse=True)
                shift = shifts_for(order, layout.lengths)
                key_positions = layout.positions(shift, j + 1)  # suffix and generated keys at their own index
                got = self.attend(
                    layer,
                    call,
                    q_h[j - first : j - first + 1],
                    torch.tensor([j]),
                    k_h[: j + 1],
                    key_positions,
                    v_h[: j + 1],
                    causal_by_position=False,
                )
                out[j - first, h] = got[0]
        return out[None]

    def doc_to_doc(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, i: int, scaling: float) -> list[float]:
        """I[i, s] for one head (ref. 166-187): each query of segment i (un-rotated, ``q`` [n_i, d])
        attends, without positions, to the keys of every segment except its own (ref. 171-174: the
        self-region mask); its importance of segment s is its attention on s's tokens summed, over n_s
        (ref. 177-181); I[i, s] sums that over segment i's queries (ref. 184-187). I[i, i] = 0."""
        total = [0.0] * layout.count
        others = [s for s in range(layout.count) if s != i]
        for query in q:
            per_segment = self.per_segment(query, k, layout, others, scaling)
            for s in others:
                total[s] += per_segment[s]
        return total

    def token_to_doc(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, scaling: float) -> list[float]:
        """One suffix or generated query's importance of each segment (ref. 246-257): attention
        without positions over the keys of all segments (no mask), summed per segment, over n_s."""
        per_segment = self.per_segment(q, k, layout, list(range(layout.count)), scaling)
        return [per_segment[s] for s in range(layout.count)]

    @staticmethod
    def per_segment(query: torch.Tensor, k: torch.Tensor, layout: Layout, segments: list[int], scaling: float):
        """{s: (softmax over the keys of ``segments``, together, of q·k·scaling, summed over s) / n_s}."""
        logits = []
        for s in segments:
            start, n = layout.starts[s], layout.lengths[s]
            logits.append(k[start : start + n] @ query * scaling)  # no softcap, no positions
        probs = torch.softmax(torch.cat(logits), dim=0)
        found, at = {}, 0
        for s in segments:
            n = layout.lengths[s]
            found[s] = probs[at : at + n].sum().item() / n
            at += n
        return found

    def attend(self, layer, call, q, q_positions, k, k_positions, v, causal_by_position: bool) -> torch.Tensor:
        """Attention of queries ``q`` [n_q, d] (un-rotated) rotated at ``q_positions`` over keys ``k``
        [n_k, d] rotated at ``k_positions``: (q_rot·k_rot)·scaling, the layer's softcap, softmax over the
        visible keys, ·v. Visible: key position <= query position (``causal_by_position``), else every
        key given (the caller passes the keys up to the query's own index)."""
        q_cos, q_sin = self.cos_sin(layer, q, q_positions)
        k_cos, k_sin = self.cos_sin(layer, q, k_positions)
        logits = (rotate(q, q_cos, q_sin) @ rotate(k, k_cos, k_sin).T) * call.scaling
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap) * call.softcap
        if causal_by_position:
            visible = k_positions[None, :] <= q_positions[:, None]
            logits = logits.masked_fill(~visible, float("-inf"))
        return torch.softmax(logits, dim=-1) @ v
