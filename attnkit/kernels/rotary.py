"""RoPE in one pass (Triton): ``x·cos + rotate_half(x)·sin`` read in the input's dtype, computed in
the table's (float32 for a bf16 model) and written in the output's, where torch takes six kernels
and a float32 copy of ``x``. The positions stage un-rotates every query of a layer so (a prefill's
whole query, each time)."""

from __future__ import annotations

import torch

from attnkit.kernels.backend import HEAD_DIMS, tl, triton

if triton is not None:

    @triton.jit
    def _rotate_kernel(
        X, sxb, sxh, sxn, COS, SIN, scb, sch, scn, OUT, sob, soh, son, H, N,
        HALF: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        bh, tile = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        n = tile * BN + tl.arange(0, BN)
        ok = (n < N)[:, None]
        d = tl.arange(0, HALF)[None, :]
        x_at = X + b * sxb + h * sxh + n[:, None] * sxn + d
        c_at = b * scb + h * sch + n[:, None] * scn + d
        x1 = tl.load(x_at, mask=ok, other=0.0).to(COS.dtype.element_ty)  # computed in the table's dtype
        x2 = tl.load(x_at + HALF, mask=ok, other=0.0).to(COS.dtype.element_ty)
        cos1, cos2 = tl.load(COS + c_at, mask=ok, other=0.0), tl.load(COS + c_at + HALF, mask=ok, other=0.0)
        sin1, sin2 = tl.load(SIN + c_at, mask=ok, other=0.0), tl.load(SIN + c_at + HALF, mask=ok, other=0.0)
        o_at = OUT + b * sob + h * soh + n[:, None] * son + d
        tl.store(o_at, (x1 * cos1 - x2 * sin1).to(OUT.dtype.element_ty), mask=ok)
        tl.store(o_at + HALF, (x2 * cos2 + x1 * sin2).to(OUT.dtype.element_ty), mask=ok)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` [batch, heads, n, dim] rotated by ``cos`` and ``sin`` [batch, 1 or heads, n, dim]
    (float32 or wider, every dim rotary), in ``dtype``: :func:`attnkit.primitives.rotate` in one kernel."""
    batch, heads, n, dim = x.shape
    if cos.shape[-1] != dim or dim not in HEAD_DIMS:
        raise ValueError(
            f"rotate: rotary dims {cos.shape[-1]} and head dim {dim} (every dim rotary, one of {HEAD_DIMS})"
        )
    cos, sin = (t.expand(batch, heads, n, dim) for t in (cos, sin))
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(batch, heads, n, dim, dtype=dtype, device=x.device)
    tile = 64
    _rotate_kernel[(batch * heads, triton.cdiv(n, tile))](
        x, *x.stride()[:3], cos, sin, *cos.stride()[:3], out, *out.stride()[:3], heads, n,
        HALF=dim // 2, BN=tile, num_warps=4,
    )  # fmt: skip
    return out
