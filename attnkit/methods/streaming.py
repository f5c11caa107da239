"""``streaming``: keep the first ``sink`` tokens and the most recent ones (StreamingLLM's cache).

The classic baseline for KV compression (Xiao et al., 2024): attention sinks plus a recent
window, nothing chosen by content. With the same budget as SnapKV it shows what content-aware
selection buys; on a needle far from the end it is expected to fail.
"""

from __future__ import annotations

import torch

from attnkit.engine.kvcache import KVGroup, keep, top_columns
from attnkit.methods.base import register
from attnkit.methods.kv import KVMethod, row_budgets
from attnkit.recipe.methods import StreamingConfig


def sink_and_recent(length: int, starts: torch.Tensor, sink: int, recent: torch.Tensor) -> torch.Tensor:
    """[b, length] scores: +inf on each row's first ``sink`` real tokens and last ``recent[row]``
    tokens, 0 on the rest of its tokens, -inf on padding."""
    columns = torch.arange(length, device=starts.device)[None, :]
    real = columns >= starts[:, None]
    kept = real & ((columns < starts[:, None] + sink) | (columns >= length - recent[:, None]))
    scores = torch.where(kept, float("inf"), 0.0)
    return scores.masked_fill(~real, float("-inf"))


@register
class Streaming(KVMethod):
    """Keeps attention sinks and a recent window in every head."""

    name = "streaming"
    config_class = StreamingConfig
    replayable = True

    def select(self, call, keys, values, starts, lengths) -> list[KVGroup] | None:
        budgets = row_budgets(self.config.budget, lengths)
        if bool((lengths <= budgets).all()):
            return None
        sink = self.config.sink
        counts = torch.minimum(budgets.clamp(min=sink + 1), lengths)
        scores = sink_and_recent(keys.shape[2], starts, sink, counts - sink)
        scores = scores[:, None, :].expand(-1, keys.shape[1], -1)
        return [keep(keys, values, list(range(keys.shape[1])), top_columns(scores, counts))]
