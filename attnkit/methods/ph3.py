"""``ph3``: steer knowledge conflicts by pruning memory heads or context heads (PH3, Jin et al. 2024).

``steer: context`` prunes the top-k memory heads of a ``conflict-heads`` artifact (so the model
follows the context more); ``steer: memory`` prunes the top-k context heads. Pruning is
``head_mask`` at scale 0 (the head's slice of the ``o_proj`` input is zeroed), so it works on every
attention backend and with the KV cache. ``k: auto`` takes the k that ``attnkit profile ph3-sweep``
chose on a validation set and recorded in the artifact; ``k: 0`` is the identity.
"""

from __future__ import annotations

from attnkit.engine.attach import Attachment
from attnkit.heads import load_artifact
from attnkit.methods.base import Method, register
from attnkit.methods.head_mask import scale_heads
from attnkit.recipe.methods import PH3Config, ph3_heads


@register
class PH3(Method):
    """Prunes the top-k memory heads (steer toward context) or context heads (toward memory)."""

    name = "ph3"
    config_class = PH3Config
    replayable = True

    def attach(self, at: Attachment) -> None:
        artifact = load_artifact(self.config.heads, at.shape, allow_foreign=at.allow_foreign_heads)
        heads, k, source = ph3_heads(artifact, self.config.steer, self.config.k, self.config.heads)
        self.stats.describe("steer", self.config.steer)
        self.stats.describe("k", k)
        self.stats.describe("k_source", source)
        self.stats.describe("pruned", ", ".join(f"L{layer}H{head}" for layer, head in heads) or "none")
        self.stats.describe("heads", len(heads))
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        for layer, indices in sorted(by_layer.items()):
            scale_heads(at, layer, sorted(indices), 0.0, self.stats)
