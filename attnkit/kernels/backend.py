"""Triton, where it is installed (GPU machines; CPU machines use the torch paths instead)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None
