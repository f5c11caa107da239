"""Triton, where it is installed (GPU machines; CPU machines use the torch paths instead), and what
the kernels share: the online-softmax step and flash-decoding's combine pass."""

from __future__ import annotations

from typing import Any

HEAD_DIMS = (32, 64, 128, 256)
"""The head dims the block, segment-order and rotary kernels compile for (their tiles split each
head dim in two halves of a power of two)."""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def row_tile(tile, bkv, HKV, G, M, BM: tl.constexpr):
        """The rows of one program over a (batch, KV head): a tile of the KV head's G query heads x
        M queries, as (batch, KV head, rows in range, query head, query)."""
        b, kvh = bkv // HKV, bkv % HKV
        r = tile * BM + tl.arange(0, BM)
        g, m = r // M, r % M
        return b, kvh, r < G * M, kvh * G + g, m

    @triton.jit
    def online_softmax(s, top, total):
        """One tile of an online softmax over base-2 logits ``s`` [rows, keys] (-inf: masked):
        the tile's weights, the factor that rescales what was summed before, and the running max
        and sum. A row that has seen no key yet keeps weight 0 and never turns NaN."""
        new_top = tl.maximum(top, tl.max(s, 1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)
        p = tl.exp2(s - safe[:, None])
        alpha = tl.exp2(top - safe)
        return p, alpha, new_top, total * alpha + tl.sum(p, 1)

    @triton.jit
    def combine_splits(
        PART, STATS, OUT, LSE, sob, soh, som, ROWS, H, M,
        SPLITS: tl.constexpr, DIM: tl.constexpr, BR: tl.constexpr, RETURN_LSE: tl.constexpr,
    ):  # fmt: skip
        """Flash-decoding's second pass: each row's output from its splits' partial sums and their
        (base-2 max, sum) STATS; rows are (batch, head, query) in that order, written at the strides
        of OUT; given RETURN_LSE, the row's natural log-sum-exp (-inf for a row that read nothing)."""
        row = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = row < ROWS
        split = tl.arange(0, SPLITS)
        at = (row[:, None] * SPLITS + split[None, :]) * 2
        top = tl.load(STATS + at, mask=ok[:, None], other=float("-inf"))
        total = tl.load(STATS + at + 1, mask=ok[:, None], other=0.0)
        best = tl.max(top, 1)
        best = tl.where(best == float("-inf"), 0.0, best)
        weight = tl.exp2(top - best[:, None])
        norm = tl.sum(total * weight, 1)
        if RETURN_LSE:
            tl.store(LSE + row, (best + tl.log2(norm)) * 0.6931471805599453, mask=ok)
        norm = tl.where(norm == 0.0, 1.0, norm)
        d = tl.arange(0, DIM)
        part = tl.load(
            PART + (row[:, None, None] * SPLITS + split[None, :, None]) * DIM + d[None, None, :],
            mask=ok[:, None, None],
            other=0.0,
        )
        out = tl.sum(part * weight[:, :, None], 1) / norm[:, None]
        o_at = OUT + (row // (H * M)) * sob + ((row // M) % H) * soh + (row % M) * som
        tl.store(o_at[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=ok[:, None])
else:
    online_softmax = combine_splits = row_tile = None


def combine(
    part: Any, stats: Any, out: Any, lse: Any, strides: tuple[int, int, int], rows: int, heads: int, queries: int,
    splits: int, dim: int, return_lse: bool = False,
) -> None:  # fmt: skip
    """Launch :func:`combine_splits` over ``rows`` (batch, head, query) rows of ``splits`` partial
    sums, with few enough rows per program that a row's splits stay in registers (16 rows of 16
    splits of 128 dims spill, and took 61 us where 8 programs of 2 rows take a few)."""
    tile = max(1, min(16, 4096 // (splits * dim)))
    combine_splits[(triton.cdiv(rows, tile),)](
        part, stats, out, lse, *strides, rows, heads, queries,
        SPLITS=splits, DIM=dim, BR=tile, RETURN_LSE=return_lse,
    )  # fmt: skip
