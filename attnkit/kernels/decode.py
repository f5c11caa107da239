"""Flash-decoding (Triton): one decode step's attention over a preallocated (static) KV cache.

A decode step has one query per head against a cache whose capacity is fixed and whose filled part
(``lengths``) grows on the device. The launch depends on the shapes alone and nothing is read back
to the host, so the step can be captured once in a CUDA graph and replayed at every length. The
keys are split over programs to fill the GPU (flash-decoding), each program reading its key range
once for all the query heads of one KV head (GQA); ranges past a row's length or before its window
cost an empty partial. The mask is the one a static cache needs: the filled slots, padding from a
2-D mask, an optional sliding window, and Gemma 2's logit soft-capping. Given an index, a program
reads only the listed slots (a sparse read), the list split over programs instead of the cache.
On request each head's log-sum-exp comes out too, from the softmax's own running max and sum.
"""

from __future__ import annotations

import math

import torch

from attnkit.kernels.backend import combine, online_softmax, tl, triton

DECODE_HEAD_DIMS = (16, 32, 64, 128, 256)
"""The head dims the decode kernel compiles for."""

if triton is not None:

    @triton.jit
    def _decode_kernel(
        Q, sqb, sqh,
        K, skb, skh, skn,
        V, svb, svh, svn,
        LENGTHS, slb,
        VALID, sab, sac,
        INDEX, sib, siu, sie,
        BIAS, sbb, sbh, sbn,
        OUT, sob, soh, LSE,
        PART, STATS,
        UNITS, G, PER_KV, capacity, entries, split_keys, window, scale, cap,
        DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, RETURN_LSE: tl.constexpr,
    ):  # fmt: skip
        """A program per (split, batch, unit): a unit is G query heads u * G + g of KV head
        u // PER_KV (a KV head and its group, or one query head when the index lists per query
        head). Its range is of cache slots or, given an index, of the unit's listed entries."""
        split, bu = tl.program_id(0), tl.program_id(1)
        b, u = (bu // UNITS).to(tl.int64), bu % UNITS
        kvh = u // PER_KV
        g = tl.arange(0, BM)
        row_ok = g < G
        h = u * G + g
        d = tl.arange(0, DIM)
        q = tl.load(Q + b * sqb + h[:, None] * sqh + d[None, :], mask=row_ok[:, None], other=0.0).to(DOT)

        length = tl.minimum(tl.load(LENGTHS + b * slb).to(tl.int32), capacity)
        end = length
        if HAS_INDEX:
            end = entries
        lo = split * split_keys
        hi = tl.minimum(lo + split_keys, end)
        if HAS_WINDOW:
            lo = tl.maximum(lo, length - window)

        top = tl.full([BM], float("-inf"), tl.float32)
        total = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DIM], tl.float32)
        k_base, v_base = K + b * skb + kvh * skh, V + b * svb + kvh * svh
        for start in range(lo, hi, BN):  # empty for a range past the end or before the window
            n = start + tl.arange(0, BN)  # the tile's slots, or its entries of the index
            ok = n < hi
            if HAS_INDEX:  # the listed slots; -1 (padding) and slots past the length are skipped
                n = tl.load(INDEX + b * sib + u * siu + n * sie, mask=ok, other=-1)
                ok = (n >= 0) & (n < length)
            if HAS_VALID:
                ok = ok & (tl.load(VALID + b * sab + n * sac, mask=ok, other=0) != 0)
            if HAS_BIAS:  # each slot's logit bias (natural log); -inf: an empty slot, not read
                bias = tl.load(BIAS + b * sbb + kvh * sbh + n * sbn, mask=ok, other=0.0)
                ok = ok & (bias > float("-inf"))
            k = tl.load(k_base + n[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION) * scale
            if HAS_SOFTCAP:  # cap * tanh(s), tanh from exp2 (stable at both ends)
                s = cap * (1.0 - 2.0 / (tl.exp2(s * 2.8853900817779268) + 1.0))
            if HAS_BIAS:  # in base 2, as the logits
                s = s + tl.where(ok, bias, 0.0)[None, :] * 1.4426950408889634
            s = tl.where(ok[None, :], s, float("-inf"))
            p, alpha, top, total = online_softmax(s, top, total)
            v = tl.load(v_base + n[:, None] * svn + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)

        row = b * UNITS * G + h
        if SPLITS == 1:
            if RETURN_LSE:  # ln 2 (top + log2 total), the logits being base 2; -inf if none read
                tl.store(LSE + row, (top + tl.log2(total)) * 0.6931471805599453, mask=row_ok)
            total = tl.where(total == 0.0, 1.0, total)  # a row that reads no key: 0, not NaN
            o_at = OUT + b * sob + h[:, None] * soh + d[None, :]
            tl.store(o_at, (acc / total[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])
        else:  # partial sums per split, combined by backend.combine_splits
            tl.store(PART + (row[:, None] * SPLITS + split) * DIM + d[None, :], acc, mask=row_ok[:, None])
            tl.store(STATS + (row * SPLITS + split) * 2, top, mask=row_ok)
            tl.store(STATS + (row * SPLITS + split) * 2 + 1, total, mask=row_ok)


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    splits: int | None = None,
    index: torch.Tensor | None = None,
    return_lse: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decode step's attention output [batch, 1, heads, dim], contiguous, in ``values``' dtype
    (the layout attention functions return).

    ``query`` [batch, heads, 1, dim]; ``keys`` and ``values`` [batch, kv heads, capacity, dim], the
    preallocated cache (any strides); query head h reads KV head ``h // (heads // kv heads)``.
    ``lengths`` int [batch] or [1] on the device: the filled slots of each row. Row b attends to the
    slots c < lengths[b] with ``valid[b, c] != 0`` (``valid`` [batch, >= capacity], e.g. a
    left-padded batch's 2-D mask) and, given ``window``, c >= lengths[b] - window; no other slot is
    read. ``softcap`` caps the logits at ``softcap * tanh(logits / softcap)``. A row that reads no
    slot gets 0. ``splits``: key ranges per (batch, KV head) (per (batch, head) for an index per
    query head); the default fills the GPU.

    ``index`` int32 or int64 [batch (or 1), kv heads or heads, n]: read only the listed slots (a
    sparse read), per KV head (for all its query heads) or per query head; the softmax is over the
    listed slots that the rules above let through. Entries < 0 pad a list. The order does not
    matter; a slot listed twice counts twice (lists are not checked for duplicates). The splits
    then divide the n entries. Not with ``window`` (ValueError).

    ``bias`` float [batch (or 1), kv heads, >= capacity]: added to each slot's logit after the
    soft-cap (a compressed cache's compensation slot, log of the tokens it stands for; -inf: an
    empty slot, never read).

    ``return_lse``: return ``(output, lse)``, ``lse`` float32 [batch, heads] the natural-log
    log-sum-exp of each head's logits as its softmax saw them (scaled, soft-capped) over the slots
    it read, -inf where it read none; from the softmax's running max and sum, no second read.

    No host synchronisation and allocations sized by the shapes alone, so the call can be captured
    in a CUDA graph and replayed after ``lengths`` (and ``valid``, ``index``) change in place. Head
    dims are powers of two from 16 to 256: others raise ValueError (callers fall back to torch).
    """
    if triton is None:
        raise RuntimeError("decode_attention needs Triton")
    batch, heads, one, dim = query.shape
    _, kv_heads, capacity, _ = keys.shape
    if dim not in DECODE_HEAD_DIMS:
        raise ValueError(f"decode_attention: head dim {dim} (one of {DECODE_HEAD_DIMS})")
    shapes = f"query {tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
    if one != 1 or keys.shape != values.shape or keys.shape[0] != batch or keys.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"decode_attention: {shapes}")
    if lengths.dim() != 1 or lengths.shape[0] not in (1, batch):
        raise ValueError(f"decode_attention: lengths of shape {tuple(lengths.shape)} for {shapes}")
    if valid is not None and (valid.dim() != 2 or valid.shape[0] not in (1, batch) or valid.shape[1] < capacity):
        raise ValueError(f"decode_attention: valid of shape {tuple(valid.shape)} for {shapes}")
    query, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys, values))
    units, entries = kv_heads, capacity  # a program per (split, batch, KV head), over the cache
    if index is not None:
        if window is not None:
            raise ValueError("decode_attention: an index with a window (sparse reads are for full attention)")
        if (
            index.dim() != 3
            or index.shape[0] not in (1, batch)
            or index.shape[1] not in (kv_heads, heads)
            or index.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(f"decode_attention: index {index.dtype} of shape {tuple(index.shape)} for {shapes}")
        units, entries = index.shape[1], index.shape[2]  # a program per (split, batch, listing head)
    programs = batch * units
    splits = splits or default_splits(programs, entries)
    padded = triton.next_power_of_2(splits)  # the combine pass takes a power of two; the rest are empty
    split_keys = max(1, -(-entries // splits))

    out = torch.empty(batch, 1, heads, dim, dtype=values.dtype, device=values.device)
    part = stats = lse = out  # placeholders when one split writes the output itself, and for no LSE
    if return_lse:
        lse = torch.empty(batch, heads, dtype=torch.float32, device=values.device)
    if padded > 1:
        part = torch.empty(batch * heads, padded, dim, dtype=torch.float32, device=values.device)
        stats = torch.empty(batch * heads, padded, 2, dtype=torch.float32, device=values.device)
    if bias is not None and (
        bias.dim() != 3 or bias.shape[0] not in (1, batch) or bias.shape[1] != kv_heads or bias.shape[2] < capacity
    ):
        raise ValueError(f"decode_attention: bias of shape {tuple(bias.shape)} for {shapes}")
    biased, bias_strides = lengths, (0, 0, 0)  # a pointer the kernel never reads without a bias
    if bias is not None:
        biased, bias_strides = bias, (bias.stride(0) if bias.shape[0] > 1 else 0, *bias.stride()[1:])
    if valid is not None and valid.dtype == torch.bool:
        valid = valid.view(torch.uint8)
    flags = lengths if valid is None else valid  # a pointer the kernel never reads without a mask
    listed, index_strides = lengths, (0, 0, 0)  # likewise without an index
    if index is not None:
        listed, index_strides = index, (index.stride(0) if index.shape[0] > 1 else 0, *index.stride()[1:])
    log2e = math.log2(math.e)
    dot = getattr(tl, str(values.dtype).removeprefix("torch."))
    if values.device.type == "cpu" and values.dtype == torch.bfloat16:
        dot = tl.float32  # Triton's interpreter (3.9) multiplies bfloat16 as raw integers
    _decode_kernel[(padded, programs)](
        query, query.stride(0), query.stride(1),
        keys, *keys.stride()[:3],
        values, *values.stride()[:3],
        lengths, lengths.stride(0) if lengths.shape[0] > 1 else 0,
        flags, flags.stride(0) if valid is not None and valid.shape[0] > 1 else 0, flags.stride(-1),
        listed, *index_strides,
        biased, *bias_strides,
        out, out.stride(0), out.stride(2), lse,
        part, stats,
        units, heads // units, units // kv_heads, capacity, entries, split_keys, window or 0,
        scale / softcap if softcap else scale * log2e, softcap * log2e if softcap else 1.0,
        DIM=dim, BM=max(16, triton.next_power_of_2(heads // units)), BN=64 if dim <= 128 else 32,
        SPLITS=padded, HAS_VALID=valid is not None, HAS_WINDOW=window is not None, HAS_SOFTCAP=bool(softcap),
        HAS_INDEX=index is not None, HAS_BIAS=bias is not None, DOT=dot, PRECISION="ieee" if values.dtype == torch.float32 else "tf32",
        RETURN_LSE=return_lse, num_warps=4, num_stages=2,
    )  # fmt: skip
    if padded > 1:
        combine(
            part, stats, out, lse, (out.stride(0), out.stride(2), 0), batch * heads, heads, 1, padded, dim, return_lse
        )
    return (out, lse) if return_lse else out


def default_splits(programs: int, keys: int) -> int:
    """Ranges per program of the grid's other axis (a (batch, KV head) or, for an index per query
    head, a (batch, head)) over its ``keys`` (slots or listed entries): enough programs to fill the
    GPU (an H200 measured best at about 512), at least 128 keys each."""
    splits = 1
    while splits < 64 and programs * splits < 512 and keys // (2 * splits) >= 128:
        splits *= 2
    return splits
