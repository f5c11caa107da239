"""``head_mask``: scale (0 = remove) the output of chosen attention heads.

The pruning primitive: a head's contribution to the residual stream is its slice of the
output projection's input, so scaling that slice scales the head, on any attention backend.
"""

from __future__ import annotations

import torch

from attnkit.engine.attach import Attachment
from attnkit.engine.state import CallState
from attnkit.methods.base import Method, register
from attnkit.recipe.methods import HeadMaskConfig
from attnkit.stats import Stats


@register
class HeadMask(Method):
    """Scales listed heads' outputs before the output projection."""

    name = "head_mask"
    config_class = HeadMaskConfig
    replayable = True

    def attach(self, at: Attachment) -> None:
        heads = at.heads(self.config.heads)
        self.stats.describe("heads", len(heads))
        for layer, indices in heads.by_layer().items():
            scale_heads(at, layer, indices, self.config.scale, self.stats)


def scale_heads(at: Attachment, layer: int, heads: list[int], scale: float, stats: Stats) -> None:
    """Scale ``heads`` of ``layer`` by ``scale`` at the head-output stage, counted in ``stats``."""
    shape = at.shape
    weights = torch.ones(shape.num_heads * shape.head_dim)
    for head in heads:
        weights[head * shape.head_dim : (head + 1) * shape.head_dim] = scale
    cached: dict[tuple, torch.Tensor] = {}

    def scale_outputs(x: torch.Tensor, state: CallState | None) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cached:
            cached[key] = weights.to(device=x.device, dtype=x.dtype)
        stats.add("head_outputs_scaled", len(heads))
        return x * cached[key]

    at.head_output(layer, scale_outputs)
