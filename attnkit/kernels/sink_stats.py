"""Fused GPU kernels (Triton) for sink statistics: row log-sum-exp and column sums of attention.

ACT needs, for a few heads, each row's log-sum-exp and each key's summed attention, without the
N x N matrix. Two flash-style passes do it with the scores kept on chip: pass A walks each query
block along its visible keys (online log-sum-exp); pass B walks each key block along the queries
that see it, summing ``exp(s - lse)``. The mask is the one every supported text model uses:
causal, padding from the 2-D mask, and an optional sliding window (``i - j < window``).
Used on CUDA when Triton is installed; :mod:`attnkit.methods.act` falls back to torch otherwise.
"""

from __future__ import annotations

import torch

from attnkit.kernels.backend import tl, triton

if triton is not None:

    @triton.jit
    def _allowed(q_pos, k_pos, n_keys, window, valid_ptr, HAS_VALID: tl.constexpr):
        ok = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < n_keys) & (k_pos[None, :] >= 0)
        ok = ok & ((window == 0) | (q_pos[:, None] - k_pos[None, :] < window))
        if HAS_VALID:
            kv = tl.load(valid_ptr + k_pos, mask=(k_pos < n_keys) & (k_pos >= 0), other=0)
            ok = ok & (kv[None, :] != 0)
        return ok

    @triton.jit
    def _row_lse_kernel(
        Q,
        K,
        VALID,
        LSE,
        scale,
        M,
        N,
        offset,
        window,
        heads,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_VALID: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            Q + bh * M * D + offs_m[:, None] * D + offs_d[None, :],
            mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
            other=0.0,
        )
        q_pos = offs_m + offset
        valid_ptr = VALID + (bh // heads) * N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M + offset)
        lo = tl.where(window > 0, tl.maximum(pid_m * BLOCK_M + offset - window + 1, 0), 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(
                K + bh * N * D + offs_n[:, None] * D + offs_d[None, :],
                mask=(offs_n[:, None] < N) & (offs_d[None, :] < D),
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(_allowed(q_pos, offs_n, N, window, valid_ptr, HAS_VALID), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("inf"))
        tl.store(LSE + bh * M + offs_m, lse, mask=offs_m < M)

    @triton.jit
    def _column_sum_kernel(
        Q,
        K,
        VALID,
        LSE,
        COL,
        scale,
        M,
        N,
        offset,
        window,
        heads,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_VALID: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(
            K + bh * N * D + offs_n[:, None] * D + offs_d[None, :],
            mask=(offs_n[:, None] < N) & (offs_d[None, :] < D),
            other=0.0,
        )
        valid_ptr = VALID + (bh // heads) * N
        acc = tl.zeros([BLOCK_N], tl.float32)
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        hi = tl.where(window > 0, tl.minimum(M, (pid_n + 1) * BLOCK_N + window - 1 - offset), M)
        for start in range(lo, hi, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q = tl.load(
                Q + bh * M * D + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
                other=0.0,
            )
            lse = tl.load(LSE + bh * M + offs_m, mask=offs_m < M, other=float("inf"))
            q_pos = offs_m + offset
            ok = _allowed(q_pos, offs_n, N, window, valid_ptr, HAS_VALID) & (offs_m[:, None] < M)
            if HAS_VALID:
                qv = tl.load(valid_ptr + q_pos, mask=offs_m < M, other=0)
                ok = ok & (qv[:, None] != 0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            acc += tl.sum(tl.where(ok, tl.exp(s - lse[:, None]), 0.0), 0)
        tl.store(COL + bh * N + offs_n, acc, mask=offs_n < N)


def sink_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None,
    window: int | None,
    with_sums: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row log-sum-exp [b, h, q] and column sums of attention over valid queries [b, h, k].

    query [b, h, q, d] and key [b, h, k, d] (one key head per query head); query i sits at key
    position ``k - q + i``. Fully masked rows get an lse of +inf (zero attention everywhere).
    """
    b, h, m, d = query.shape
    n = key.shape[2]
    q = query.reshape(b * h, m, d).contiguous()
    k = key.reshape(b * h, n, d).contiguous()
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else q.new_empty(1, dtype=torch.int8)
    lse = torch.empty(b * h, m, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d))
    # float32 inputs: full-precision products (Triton would use TF32); half inputs are exact anyway
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    args = dict(D=d, BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=64, HAS_VALID=key_valid is not None, PRECISION=precision)
    common = (scale, m, n, n - m, window or 0, h)
    _row_lse_kernel[(triton.cdiv(m, 64), b * h)](q, k, valid, lse, *common, **args)
    sums = None
    if with_sums:
        sums = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
        _column_sum_kernel[(triton.cdiv(n, 64), b * h)](q, k, valid, lse, sums, *common, **args)
        sums = sums.view(b, h, n)
    return lse.view(b, h, m), sums
