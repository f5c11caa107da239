"""Segment order (Triton): where a reader query reads each segment, in one or two kernels per layer.

PINE's readers (suffix and generated queries) order a prompt's segments by their importance to the
query, per head: the softmax of the un-rotated q·k over the segments' keys, summed per segment and
divided by its length; the most important is read closest, each segment moved back by the lengths
of those ranked ahead of it. In torch that is an attention call, a sort, a gather, a cumulative sum
and a scatter per layer; a decode step pays each as a launch. This kernel does all of it: an online
softmax over the segment keys that sums each segment's share on the way, the ranking by pairwise
comparison (ties in segment order, as a stable sort), and the positions written out. A decode
step has one tile of reader rows per KV head, too few programs to read a long prompt quickly, so
there the keys are split over programs and a second kernel merges the splits' sums and ranks.
"""

from __future__ import annotations

import torch

from attnkit.kernels.backend import HEAD_DIMS, online_softmax, row_tile, tl, triton

if triton is not None:

    @triton.jit
    def _shares(
        q, K, skb, skh, skn, SEG, ssb, b, kvh, lo, hi, scale,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SP: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Over keys [lo, hi): the running max and sum of the base-2 softmax over segment keys, and
        each segment's (unnormalised) share [BM, SP]."""
        d = tl.arange(0, D)
        numbers = tl.arange(0, SP) + 1
        top = tl.full([BM], float("-inf"), ACC)
        total = tl.zeros([BM], ACC)
        share = tl.zeros([BM, SP], ACC)
        for start in range(lo, hi, BN):
            n = start + tl.arange(0, BN)
            inside = n < hi
            k = tl.load(K + b * skb + kvh * skh + n[:, None] * skn + d[None, :], mask=inside[:, None], other=0.0)
            seg = tl.load(SEG + b * ssb + n, mask=inside, other=0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * scale
            s = tl.where((seg > 0)[None, :], s, float("-inf"))
            p, alpha, top, total = online_softmax(s, top, total)
            onehot = (seg[:, None] == numbers[None, :]).to(ACC)
            share = share * alpha[:, None] + tl.dot(p, onehot, input_precision="ieee")
        return top, total, share

    @triton.jit
    def _write_order(
        share, total, LEN, slb, BASE, sbb, ACTIVE, OUT, sob, soh, som, b, h, m, row_ok, S,
        SP: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Importance from the shares, the ranking (ties in segment order) and the positions written."""
        numbers = tl.arange(0, SP) + 1
        lengths = tl.load(LEN + b * slb + numbers - 1, mask=numbers <= S, other=0)
        total = tl.where(total == 0.0, 1.0, total)
        importance = share / total[:, None] / tl.maximum(lengths, 1).to(ACC)[None, :]
        mine = importance[:, :, None]  # segment s
        other = importance[:, None, :]  # segment t, ahead of s when more important (ties: lower number)
        ahead = (other > mine) | ((other == mine) & (numbers[None, None, :] < numbers[None, :, None]))
        moved = tl.sum(tl.where(ahead, lengths[None, None, :], 0), 2)
        moved = moved * tl.load(ACTIVE + b)
        base = tl.load(BASE + b * sbb + m, mask=row_ok, other=0)
        o_at = OUT + b * sob + h * soh + m * som
        tl.store(o_at, base, mask=row_ok)
        tl.store(
            o_at[:, None] + numbers[None, :], base[:, None] + moved, mask=row_ok[:, None] & (numbers <= S)[None, :]
        )
        tl.store(o_at + S + 1, base, mask=row_ok)

    @triton.jit
    def _order_kernel(
        Q, sqb, sqh, sqm,
        K, skb, skh, skn, P,
        SEG, ssb,
        LEN, slb,
        BASE, sbb,
        ACTIVE,
        OUT, sob, soh, som,
        PART, STATS, split_keys,
        M, G, HKV, S, scale,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SP: tl.constexpr, SPLITS: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """One tile of reader rows over one split of the keys: the order itself (one split), or
        the split's partial shares for ``_order_combine_kernel``."""
        split = tl.program_id(2)
        b, kvh, row_ok, h, m = row_tile(tl.program_id(0), tl.program_id(1), HKV, G, M, BM)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h[:, None] * sqh + m[:, None] * sqm + d[None, :], mask=row_ok[:, None], other=0.0)
        q = q.to(K.dtype.element_ty)
        lo = split * split_keys
        hi = tl.minimum(P, lo + split_keys)
        top, total, share = _shares(q, K, skb, skh, skn, SEG, ssb, b, kvh, lo, hi, scale, D, BM, BN, SP, PRECISION, ACC)
        if SPLITS == 1:
            _write_order(share, total, LEN, slb, BASE, sbb, ACTIVE, OUT, sob, soh, som, b, h, m, row_ok, S, SP, ACC)
        else:
            row = (b * HKV * G + h) * M + m
            numbers = tl.arange(0, SP)
            tl.store(PART + (row[:, None] * SPLITS + split) * SP + numbers[None, :], share, mask=row_ok[:, None])
            tl.store(STATS + (row * SPLITS + split) * 2, top, mask=row_ok)
            tl.store(STATS + (row * SPLITS + split) * 2 + 1, total, mask=row_ok)

    @triton.jit
    def _order_combine_kernel(
        PART, STATS,
        LEN, slb,
        BASE, sbb,
        ACTIVE,
        OUT, sob, soh, som,
        M, G, HKV, S,
        BM: tl.constexpr, SP: tl.constexpr, SPLITS: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """The splits' partial shares rescaled to one softmax, then the order as in one pass."""
        b, kvh, row_ok, h, m = row_tile(tl.program_id(0), tl.program_id(1), HKV, G, M, BM)
        row = (b * HKV * G + h) * M + m
        best = tl.full([BM], float("-inf"), ACC)
        for split in range(SPLITS):
            best = tl.maximum(best, tl.load(STATS + (row * SPLITS + split) * 2, mask=row_ok, other=float("-inf")))
        best = tl.where(best == float("-inf"), 0.0, best)
        numbers = tl.arange(0, SP)
        total = tl.zeros([BM], ACC)
        share = tl.zeros([BM, SP], ACC)
        for split in range(SPLITS):
            at = (row * SPLITS + split) * 2
            weight = tl.exp2(tl.load(STATS + at, mask=row_ok, other=float("-inf")) - best)
            total += weight * tl.load(STATS + at + 1, mask=row_ok, other=0.0)
            part = tl.load(
                PART + (row[:, None] * SPLITS + split) * SP + numbers[None, :], mask=row_ok[:, None], other=0.0
            )
            share += weight[:, None] * part
        _write_order(share, total, LEN, slb, BASE, sbb, ACTIVE, OUT, sob, soh, som, b, h, m, row_ok, S, SP, ACC)


def segment_order(
    query: torch.Tensor,
    keys: torch.Tensor,
    segments: torch.Tensor,
    lengths: torch.Tensor,
    base: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """int32 [batch, heads, queries, K + 2]: where each query reads block 0 (its ``base``
    position), segment s (``base`` plus the lengths of the segments more important to it: ties in
    segment order) and block K + 1 (``base``).

    ``query`` [batch, heads, queries, dim] and the prompt's ``keys`` [batch, kv heads, prompt, dim]
    un-rotated; ``segments`` [batch, prompt] 0 outside segments, 1..K inside; ``lengths`` [batch,
    K]; ``base`` [batch, queries]; ``active`` [batch]: rows whose segments move (others read all at
    ``base``). Importance: the softmax of q·k x ``scale`` over segment keys, summed per segment and
    divided by its length. ``splits``: key ranges read by programs of their own, then combined
    (default: enough to fill the GPU when there are few reader rows, as in a decode step).
    """
    batch, heads, rows, dim = query.shape
    kv_heads, prompt, count = keys.shape[1], keys.shape[2], lengths.shape[1]
    if dim not in HEAD_DIMS or count > MAX_SEGMENTS:
        raise ValueError(
            f"segment_order: head dim {dim} (one of {HEAD_DIMS}) and {count} segments (at most {MAX_SEGMENTS})"
        )
    group = heads // kv_heads
    out = torch.empty(batch, heads, rows, count + 2, dtype=torch.int32, device=query.device)
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    segments, lengths, base, active = (t.to(torch.int32).contiguous() for t in (segments, lengths, base, active))
    query, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys))
    tiles, padded = triton.cdiv(group * rows, ROWS), max(16, triton.next_power_of_2(count))
    splits = splits or order_splits(tiles * batch * kv_heads, prompt)
    split_keys = -(-prompt // splits)
    part = stats = out  # placeholders for one split
    if splits > 1:
        part = torch.empty(batch * heads * rows, splits, padded, dtype=acc, device=query.device)
        stats = torch.empty(batch * heads * rows, splits, 2, dtype=acc, device=query.device)
    kinds = {"SP": padded, "SPLITS": splits, "ACC": tl.float64 if acc == torch.float64 else tl.float32}
    _order_kernel[(tiles, batch * kv_heads, splits)](
        query, *query.stride()[:3],
        keys, *keys.stride()[:3], prompt,
        segments, segments.stride(0),
        lengths, lengths.stride(0),
        base, base.stride(0),
        active,
        out, *out.stride()[:3],
        part, stats, split_keys,
        rows, group, kv_heads, count, scale * 1.4426950408889634,
        D=dim, BM=ROWS, BN=64, PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
        num_warps=4, **kinds,
    )  # fmt: skip
    if splits > 1:
        _order_combine_kernel[(tiles, batch * kv_heads)](
            part, stats,
            lengths, lengths.stride(0),
            base, base.stride(0),
            active,
            out, *out.stride()[:3],
            rows, group, kv_heads, count,
            BM=ROWS, num_warps=4, **kinds,
        )  # fmt: skip
    return out


MAX_SEGMENTS = 64
"""The most segments one order ranks (a row's segments are compared pairwise in registers)."""

ROWS = 16
"""Reader rows (query heads x queries of one KV head) per program."""


def order_splits(programs: int, keys: int) -> int:
    """Key splits for ``programs`` tiles of rows: doubled while the GPU has room and each split
    keeps at least 256 keys (a decode step's 8 programs over an 8K prompt: 32 splits)."""
    splits = 1
    while splits < 64 and programs * splits < 256 and keys // (2 * splits) >= 256:
        splits *= 2
    return splits
