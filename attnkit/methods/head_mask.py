"""``head_mask``: scale (0 = remove) the output of chosen attention heads.

The pruning primitive: a head's contribution to the residual stream is its slice of the
output projection's input, so scaling that slice scales the head, on any attention backend.
"""

from __future__ import annotations

import torch

from attnkit.methods.base import Method, register
from attnkit.recipe.methods import HeadMaskConfig


@register
class HeadMask(Method):
    """Scales listed heads' outputs before the output projection."""

    name = "head_mask"
    config_class = HeadMaskConfig

    def attach(self, at) -> None:
        heads = at.heads(self.config.heads)
        self.stats.describe("heads", len(heads))
        for layer, indices in heads.by_layer().items():
            at.head_output(layer, self._scaler(indices, at))

    def _scaler(self, heads: list[int], at):
        shape = at.shape
        weights = torch.ones(shape.num_heads * shape.head_dim)
        for head in heads:
            weights[head * shape.head_dim : (head + 1) * shape.head_dim] = self.config.scale
        cached: dict[tuple, torch.Tensor] = {}

        def scale_heads(x: torch.Tensor, call) -> torch.Tensor:
            key = (x.device, x.dtype)
            if key not in cached:
                cached[key] = weights.to(device=x.device, dtype=x.dtype)
            self.stats.add("head_outputs_scaled", len(heads))
            return x * cached[key]

        return scale_heads
