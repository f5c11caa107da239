"""Block-rotated attention (Triton): each query reads each block of keys from a position of its own.

The positions stage (``attnkit.engine.positions``) lets a method move whole blocks of keys per
query and head (PINE orders a prompt's segments so). RoPE depends only on the distance between a
query and a key, so moving a block of keys equals rotating the query by the block's move instead:
one rotation of the query per block, the keys rotated once. The torch path materialises every
query once per block and the logits of all of them; this kernel is flash attention whose query
tile is rotated, from the model's own cos/sin table, again whenever the key tile enters another
block, so it holds neither. The mask is the one the stage hands it: causal, padding from the 2-D
mask, and "open" groups (a query of group g > 0 also sees every key of another group > 0: PINE's
segments see each other whole).
"""

from __future__ import annotations

import functools
import math

import torch

from attnkit.kernels.backend import HEAD_DIMS, combine, online_softmax, row_tile, tl, triton

if triton is not None:

    @triton.jit
    def _rotated(
        q_at, pos_at, cos_ptr, sin_ptr, stride_t, row_ok,
        HALF: tl.constexpr, SAME_HALVES: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """The query tile (halves at ``q_at``) rotated at the positions ``pos_at`` [rows] point to,
        computed in ``ACC``. ``SAME_HALVES``: the table holds one half (both are equal)."""
        q1 = tl.load(q_at, mask=row_ok[:, None], other=0.0).to(ACC)
        q2 = tl.load(q_at + HALF, mask=row_ok[:, None], other=0.0).to(ACC)
        pos = tl.load(pos_at, mask=row_ok, other=0)
        at = pos[:, None] * stride_t + tl.arange(0, HALF)[None, :]
        cos1, sin1 = tl.load(cos_ptr + at).to(ACC), tl.load(sin_ptr + at).to(ACC)
        if SAME_HALVES:
            cos2, sin2 = cos1, sin1
        else:
            cos2, sin2 = tl.load(cos_ptr + at + HALF).to(ACC), tl.load(sin_ptr + at + HALF).to(ACC)
        return (q1 * cos1 - q2 * sin1).to(DTYPE), (q2 * cos2 + q1 * sin2).to(DTYPE)

    @triton.jit
    def _tile(
        acc1, acc2, top, total, r1, r2, block, whole, group, start, hi,
        K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
        scale, HALF: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_OPEN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """One tile of BN keys from ``start`` (those before ``hi``) into the online softmax. Not
        ``MASKED``: every row sees every key of the tile (the caller knows), so nothing is looked up."""
        d = tl.arange(0, HALF)
        n = start + tl.arange(0, BN)
        inside = n < hi
        k_at = K + (n - offset)[:, None] * skn + d[None, :]
        if MASKED:
            k1 = tl.load(k_at, mask=inside[:, None], other=0.0)
            k2 = tl.load(k_at + HALF, mask=inside[:, None], other=0.0)
        else:
            k1, k2 = tl.load(k_at), tl.load(k_at + HALF)
        s = tl.dot(r1, tl.trans(k1), input_precision=PRECISION)
        s += tl.dot(r2, tl.trans(k2), input_precision=PRECISION)
        if MASKED:
            lookup = inside & ((n * 0 + whole) == 0)  # per key block and group: only for a run that is not whole
            ok = n[None, :] <= m_abs[:, None]
            if HAS_OPEN:
                gk = tl.load(GK + n, mask=lookup, other=group)
                ok = ok | ((gq[:, None] > 0) & (gk[None, :] > 0) & (gq[:, None] != gk[None, :]))
            mine = tl.load(BLK + n, mask=lookup, other=block) == block
            ok = ok & (inside & mine)[None, :]
            if HAS_VALID:
                ok = ok & (tl.load(VALID + n, mask=inside, other=0) != 0)[None, :]
            s = tl.where(ok, s.to(ACC) * scale, float("-inf"))
        else:
            s = s.to(ACC) * scale
        p, alpha, top, total = online_softmax(s, top, total)
        v_at = V + n[:, None] * svn + d[None, :]
        if MASKED:
            v1 = tl.load(v_at, mask=inside[:, None], other=0.0)
            v2 = tl.load(v_at + HALF, mask=inside[:, None], other=0.0)
        else:
            v1, v2 = tl.load(v_at), tl.load(v_at + HALF)
        p = p.to(v1.dtype)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION).to(ACC)
        acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=PRECISION).to(ACC)
        return acc1, acc2, top, total

    @triton.jit
    def _tiles(
        acc1, acc2, top, total, r1, r2, block, whole, group, lo, end, hi,
        K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
        scale, HALF: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_OPEN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """The tiles of BN keys from ``lo`` to ``end`` (those before ``hi``)."""
        for start in range(lo, end, BN):
            acc1, acc2, top, total = _tile(
                acc1, acc2, top, total, r1, r2, block, whole, group, start, hi,
                K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
                scale, HALF, BN, MASKED, HAS_VALID, HAS_OPEN, PRECISION, ACC,
            )  # fmt: skip
        return acc1, acc2, top, total

    @triton.jit
    def _keys(
        acc1, acc2, top, total, r1, r2, block, whole, group, lo, hi, seen,
        K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
        scale, HALF: tl.constexpr, BN: tl.constexpr, TAIL: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_OPEN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Online softmax over the keys [lo, hi) of one part (``K`` holds keys from index ``offset``)
        that belong to ``block``, read by the query rotated for it. Every row sees every key before
        ``seen``: the whole tiles there are read without a mask. A ``whole`` run (its keys all of
        the block and of one key ``group``) skips reading each key's block and group. ``TAIL``: the
        run's last keys, where at most BN / 2, take a tile of that width (a run rarely ends on a
        tile, and its last tile was half empty on average). An empty part (``hi`` before ``lo``) reads nothing."""
        hi = tl.maximum(hi, lo)
        free_end = lo + tl.maximum(tl.minimum(seen, hi) - lo, 0) // BN * BN
        acc1, acc2, top, total = _tiles(
            acc1, acc2, top, total, r1, r2, block, whole, group, lo, free_end, hi,
            K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
            scale, HALF, BN, False, HAS_VALID, HAS_OPEN, PRECISION, ACC,
        )  # fmt: skip
        end = hi
        if TAIL:
            end = free_end + (hi - free_end) // BN * BN
        acc1, acc2, top, total = _tiles(
            acc1, acc2, top, total, r1, r2, block, whole, group, free_end, end, hi,
            K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
            scale, HALF, BN, True, HAS_VALID, HAS_OPEN, PRECISION, ACC,
        )  # fmt: skip
        if TAIL:
            if hi - end > BN // 2:
                acc1, acc2, top, total = _tile(
                    acc1, acc2, top, total, r1, r2, block, whole, group, end, hi,
                    K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
                    scale, HALF, BN, True, HAS_VALID, HAS_OPEN, PRECISION, ACC,
                )  # fmt: skip
            elif hi > end:
                acc1, acc2, top, total = _tile(
                    acc1, acc2, top, total, r1, r2, block, whole, group, end, hi,
                    K, skn, V, svn, BLK, VALID, GK, gq, m_abs, offset,
                    scale, HALF, BN // 2, True, HAS_VALID, HAS_OPEN, PRECISION, ACC,
                )  # fmt: skip
        return acc1, acc2, top, total

    @triton.jit
    def _block_attention_kernel(
        Q, sqb, sqh, sqm,
        POS, spb, sph, spm, spv,
        COS, SIN, stride_t,
        K1, sk1b, sk1h, sk1n, N1,
        K2, sk2b, sk2h, sk2n,
        V, svb, svh, svn,
        BLK, sbb, STARTS, ENDS, WHOLE, GROUP, srb, BLOCKS,
        VALID, svab,
        GQ, sgqb, GK, sgkb, OPEN_END,
        OUT, sob, soh, som,
        PART, STATS, SPLIT_KEYS, LENGTH,
        M, N, G, HKV, scale,
        HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr, TAIL: tl.constexpr,
        SAME_HALVES: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_OPEN: tl.constexpr, HAS_LENGTH: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        split = tl.program_id(2)
        b, kvh, row_ok, h, m = row_tile(tl.program_id(0), tl.program_id(1), HKV, G, M, BM)
        d = tl.arange(0, HALF)
        q_at = Q + b * sqb + h[:, None] * sqh + m[:, None] * sqm + d[None, :]
        pos_at = POS + b * spb + h * sph + m * spm
        dtype = K1.dtype.element_ty

        if HAS_LENGTH:  # the keys filled so far, read on the device (a captured step's fixed-capacity cache)
            m_abs = tl.load(LENGTH).to(tl.int32) - M + m
        else:
            m_abs = N - M + m  # the key index of the query itself
        reach = m_abs + 1
        gq = m_abs * 0
        if HAS_OPEN:
            gq = tl.load(GQ + b * sgqb + m, mask=row_ok, other=0)
            reach = tl.where(gq > 0, tl.maximum(reach, tl.load(OPEN_END + b)), reach)
        first = split * SPLIT_KEYS
        last = tl.minimum(tl.max(tl.where(row_ok, reach, 0), 0), first + SPLIT_KEYS)

        top = tl.full([BM], float("-inf"), ACC)
        total = tl.zeros([BM], ACC)
        acc1 = tl.zeros([BM, HALF], ACC)
        acc2 = tl.zeros([BM, HALF], ACC)
        blk, valid, gk = BLK + b * sbb, VALID + b * svab, GK + b * sgkb
        k1, k2 = K1 + b * sk1b + kvh * sk1h, K2 + b * sk2b + kvh * sk2h
        v = V + b * svb + kvh * svh
        for block in range(0, BLOCKS):
            lo = tl.maximum(tl.load(STARTS + b * srb + block), first)
            hi = tl.minimum(tl.load(ENDS + b * srb + block), last)
            whole, group = tl.load(WHOLE + b * srb + block), tl.load(GROUP + b * srb + block)
            if lo < hi:
                r1, r2 = _rotated(q_at, pos_at + block * spv, COS, SIN, stride_t, row_ok, HALF, SAME_HALVES, dtype, ACC)
                seen = lo  # keys before it every row sees: none, unless the run is whole and no key padding
                if not HAS_VALID:
                    row_sees = m_abs + 1  # causal
                    if HAS_OPEN:
                        row_sees = tl.where((gq > 0) & (group > 0) & (gq != group), hi, row_sees)
                    seen = tl.where(whole != 0, tl.min(tl.where(row_ok, row_sees, hi), 0), lo)
                acc1, acc2, top, total = _keys(
                    acc1, acc2, top, total, r1, r2, block, whole, group, lo, tl.minimum(hi, N1), seen,
                    k1, sk1n, v, svn, blk, valid, gk, gq, m_abs, 0,
                    scale, HALF, BN, TAIL, HAS_VALID, HAS_OPEN, PRECISION, ACC,
                )  # fmt: skip
                acc1, acc2, top, total = _keys(
                    acc1, acc2, top, total, r1, r2, block, whole, group, tl.maximum(lo, N1), hi, seen,
                    k2, sk2n, v, svn, blk, valid, gk, gq, m_abs, N1,
                    scale, HALF, BN, TAIL, HAS_VALID, HAS_OPEN, PRECISION, ACC,
                )  # fmt: skip

        if SPLITS == 1:
            total = tl.where(total == 0.0, 1.0, total)  # a row that sees no key: 0, not NaN
            o_at = OUT + b * sob + h[:, None] * soh + m[:, None] * som + d[None, :]
            tl.store(o_at, (acc1 / total[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])
            tl.store(o_at + HALF, (acc2 / total[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])
        else:  # partial sums per split, combined by backend.combine_splits
            row = (b * HKV * G + h) * M + m
            p_at = PART + (row[:, None] * SPLITS + split) * (2 * HALF) + d[None, :]
            tl.store(p_at, acc1, mask=row_ok[:, None])
            tl.store(p_at + HALF, acc2, mask=row_ok[:, None])
            tl.store(STATS + (row * SPLITS + split) * 2, top, mask=row_ok)
            tl.store(STATS + (row * SPLITS + split) * 2 + 1, total, mask=row_ok)


def block_attention(
    query: torch.Tensor,
    positions: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor],
    keys: tuple[torch.Tensor, ...],
    value: torch.Tensor,
    blocks: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
    open_groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    runs: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict[str, int] | None = None,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output [batch, heads, queries, dim] in ``value``'s dtype (a view of a [batch,
    queries, heads, dim] tensor, the layout attention functions return).

    ``query`` [batch, heads, queries, dim], un-rotated; ``positions`` long [batch, 1 or heads,
    queries, V]: where each query is rotated to read block v, looked up in ``table`` (cos, sin)
    [positions, dim] (the model's rotation, full rotary dims), or [positions, dim / 2] where both
    halves are equal (the kernel then reads one); ``keys``: one or two parts [batch,
    kv heads, n_i, dim] in key order, already rotated; ``value`` [batch, kv heads, keys, dim];
    ``blocks`` long [batch, keys], 0 to V - 1. Query i sits at key index ``keys - queries + i``
    (causal); ``valid`` bool or int8 [batch, keys] (non-zero: a real key) drops padding; ``open_groups`` (query groups [batch,
    queries], key groups [batch, keys]): a query of group g > 0 also sees every key of another group
    > 0. A row that sees no key gets 0. ``runs``: :func:`block_runs` of ``blocks`` and of
    ``open_groups``' key groups (without them no query reads past its own keys), where the caller
    keeps them. A block whose keys are one run costs one query rotation per tile of queries.
    ``length`` int [1] on the device: only the first ``length`` keys are filled (a preallocated
    cache; query i then sits at ``length - queries + i``), so a CUDA graph replays the call as the
    cache fills.
    """
    query, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, value))
    keys = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in keys)
    batch, heads, rows, dim = query.shape
    cos, sin = (t.contiguous() for t in table)
    if cos.shape[-1] not in (dim, dim // 2) or dim not in HEAD_DIMS:
        raise ValueError(
            f"block_attention: a table of {cos.shape[-1]} columns for head dim {dim} (one of {HEAD_DIMS}; the "
            "table's columns: every rotary dim, or half of them where both halves are equal)"
        )
    kv_heads, count, number = value.shape[1], value.shape[2], positions.shape[-1]
    first = keys[0]
    second = keys[1] if len(keys) > 1 and keys[1].shape[2] else first[:, :, :0]
    if first.shape[2] + second.shape[2] != count:
        raise ValueError(f"block_attention: key parts of {first.shape[2]} + {second.shape[2]} for {count} values")
    key_groups = open_groups[1] if open_groups is not None else None
    starts, ends, whole, groups, open_end = runs if runs is not None else block_runs(blocks, number, key_groups)
    group = heads // kv_heads
    positions = positions.to(torch.int32)
    if positions.shape[1] == 1:
        positions = positions.expand(batch, heads, rows, number)
    blocks = blocks.to(torch.int32).contiguous()
    flag = unused(value.device)
    valid = valid.to(torch.int8).contiguous() if valid is not None else flag
    if open_groups is not None:
        query_groups, key_groups = (t.to(torch.int32).contiguous() for t in open_groups)
    else:
        query_groups = key_groups = open_end = flag
    chosen = {**launch_config(group * rows, batch * kv_heads, count), **(config or {})}
    tile, splits, split_keys = chosen["BM"], chosen["SPLITS"], chosen["SPLIT_KEYS"]
    out = torch.empty(batch, rows, heads, dim, dtype=value.dtype, device=value.device).transpose(1, 2)
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    part = stats = flag
    if splits > 1:
        part = torch.empty(batch * heads * rows, splits, dim, dtype=acc, device=value.device)
        stats = torch.empty(batch * heads * rows, splits, 2, dtype=acc, device=value.device)
    grid = (triton.cdiv(group * rows, tile), batch * kv_heads, splits)
    _block_attention_kernel[grid](
        query, *query.stride()[:3],
        positions, *positions.stride(),
        cos, sin, cos.stride(0),
        first, *first.stride()[:3], first.shape[2],
        second, *second.stride()[:3],
        value, *value.stride()[:3],
        blocks, blocks.stride(0), starts, ends, whole, groups, starts.stride(0), number,
        valid, valid.stride(0),
        query_groups, query_groups.stride(0), key_groups, key_groups.stride(0), open_end,
        out, *out.stride()[:3],
        part, stats, split_keys, length if length is not None else flag,
        rows, count, group, kv_heads, scale * math.log2(math.e),
        HALF=dim // 2, BM=tile, BN=chosen["BN"], SPLITS=splits, TAIL=bool(chosen["TAIL"]),
        SAME_HALVES=cos.shape[-1] == dim // 2,
        HAS_VALID=valid is not flag, HAS_OPEN=open_groups is not None, HAS_LENGTH=length is not None,
        PRECISION="ieee" if value.dtype == torch.float32 else "tf32", ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=chosen["num_warps"], num_stages=chosen["num_stages"],
    )  # fmt: skip
    if splits > 1:
        combine(part, stats, out, out, out.stride()[:3], batch * heads * rows, heads, rows, splits, dim)
    return out


@functools.cache
def unused(device: torch.device) -> torch.Tensor:
    """A placeholder for the optional inputs a launch goes without."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def launch_config(rows: int, programs: int, keys: int) -> dict[str, int]:
    """Tile sizes, warps and key splits: large query tiles for a prefill; for a few rows (a decode
    step), small tiles and the keys split over enough programs to fill the GPU."""
    if rows > 16:
        return {
            "BM": 128 if rows >= 1024 else 64,
            "BN": 64,
            "num_warps": 4,
            "num_stages": 2,
            "SPLITS": 1,
            "SPLIT_KEYS": keys,
            "TAIL": 1,
        }
    splits = 1
    while splits < 64 and programs * splits < 256 and keys // (2 * splits) >= 256:
        splits *= 2
    return {
        "BM": 16,
        "BN": 64,
        "num_warps": 4,
        "num_stages": 2,
        "SPLITS": splits,
        "SPLIT_KEYS": -(-keys // splits),
        "TAIL": 1,
    }


def block_runs(blocks: torch.Tensor, number: int, key_groups: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """int32 [batch, V] each: the first key and last key + 1 of every block (the kernel reads block
    v's keys there; an absent block not at all), whether that run holds only the block's keys and,
    given ``key_groups`` [batch, keys], one group (so the kernel reads neither per key), and the
    group of its first key; then int32 [batch]: the last key + 1 of any group > 0 (how far an open
    query reads; 0 without groups). One call serves every layer that reads the same blocks."""
    count = blocks.shape[-1]
    index = torch.arange(count, device=blocks.device)
    mine = blocks[:, None, :] == torch.arange(number, device=blocks.device)[None, :, None]
    starts = torch.where(mine, index, count).amin(-1)
    ends = torch.where(mine, index + 1, 0).amax(-1)
    whole = mine.sum(-1) == (ends - starts).clamp(min=0)
    group = torch.zeros_like(starts)
    open_end = torch.zeros_like(starts[:, 0])
    if key_groups is not None:
        first = key_groups.gather(1, starts.clamp(max=count - 1))
        inside = (index >= starts[..., None]) & (index < ends[..., None])
        whole &= ~(inside & (key_groups[:, None, :] != first[..., None])).any(-1)
        group = first
        open_end = torch.where(key_groups > 0, index + 1, 0).amax(-1)
    return tuple(t.to(torch.int32).contiguous() for t in (starts, ends, whole, group, open_end))
