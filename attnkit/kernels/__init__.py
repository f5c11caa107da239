"""Fused GPU kernels (Triton): sink statistics for ACT, block-rotated attention for the positions
stage, PINE's segment order, RoPE in one pass, decode attention over a preallocated cache (captured decoding). Each has a torch path beside it, which callers use where
:func:`available` says no."""

from __future__ import annotations

import torch

from attnkit.kernels.backend import HEAD_DIMS, triton
from attnkit.kernels.blocks import block_attention, block_runs
from attnkit.kernels.decode import DECODE_HEAD_DIMS, decode_attention
from attnkit.kernels.rotary import rotate
from attnkit.kernels.segments import MAX_SEGMENTS, segment_order
from attnkit.kernels.sink_stats import sink_stats

__all__ = [
    "DECODE_HEAD_DIMS",
    "HEAD_DIMS",
    "MAX_SEGMENTS",
    "available",
    "installed",
    "block_attention",
    "block_runs",
    "decode_attention",
    "rotate",
    "segment_order",
    "sink_stats",
]


def installed() -> bool:
    """Whether Triton is installed (its kernels then run on CUDA, or in its interpreter on a CPU)."""
    return triton is not None


def available(query: torch.Tensor) -> bool:
    """Whether the kernels run for ``query``: on CUDA, with Triton installed (tests force it on CPU,
    where Triton's interpreter runs them)."""
    return triton is not None and query.is_cuda
