"""Triton, where it is installed (GPU machines; CPU machines use the torch paths instead), and the
online-softmax step the kernels share."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

if triton is not None:

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
else:
    online_softmax = None
