"""``snapkv``: keep the prefix tokens the prompt's last queries attend to, plus those queries.

SnapKV (Li et al., 2024): the last ``window`` prompt tokens form an observation window; their
softmax attention to the prefix, summed over the window and pooled along the sequence (clusters
of neighbouring tokens survive together), ranks prefix tokens per head. Each KV head keeps its
top ``budget - window`` prefix tokens and the window. Query heads of a GQA group are reduced to
their KV head (``reduction``), so the cache keeps KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.engine.kvcache import KVGroup, keep, top_columns
from attnkit.engine.plan import AttentionCall
from attnkit.methods.base import register
from attnkit.methods.kv import KVMethod, reduce_groups, row_budgets
from attnkit.primitives import additive_mask
from attnkit.recipe.methods import SnapKVConfig


@register
class SnapKV(KVMethod):
    """Keeps, per KV head, the prefix tokens the observation window attends to most."""

    name = "snapkv"
    config_class = SnapKVConfig
    replayable = True

    def select(self, call: AttentionCall, keys, values, starts, lengths) -> list[KVGroup] | None:
        cfg = self.config
        length = keys.shape[2]
        budgets = self.layer_budgets(call.layer, lengths)
        if bool((lengths <= budgets).all()):
            return None
        window = min(cfg.window, length)
        counts = torch.minimum(budgets.clamp(min=window), lengths)
        self.stats.add("rows_clamped_to_window", int((budgets < window).sum()))
        scores = self.scores(call, keys, window, starts)
        return [keep(keys, values, list(range(keys.shape[1])), top_columns(scores, counts))]

    def scores(self, call: AttentionCall, keys: torch.Tensor, window: int, starts: torch.Tensor) -> torch.Tensor:
        """[b, kv heads, length]: pooled window attention on the prefix, +inf on the window, -inf on padding."""
        cfg = self.config
        b, kv_heads, length, _ = keys.shape
        query = call.query[:, :, -window:]
        groups = query.shape[1] // kv_heads
        grouped = query.reshape(b, kv_heads, groups * window, -1)
        logits = call.logits(grouped, keys).view(b, kv_heads * groups, window, length)
        raw = call.raw_mask[..., -window:, :] if call.raw_mask is not None else None
        mask = additive_mask(raw, query, keys)
        if mask is not None:
            logits = logits + mask
        attention = torch.softmax(logits, dim=-1).sum(-2)[..., : length - window]
        pool = F.max_pool1d if cfg.pooling == "max" else F.avg_pool1d
        pooled = pool(attention, kernel_size=cfg.kernel, stride=1, padding=cfg.kernel // 2)
        prefix = reduce_groups(pooled, kv_heads, cfg.reduction)
        scores = torch.cat([prefix, prefix.new_full((b, kv_heads, window), float("inf"))], dim=-1)
        padding = torch.arange(length, device=keys.device)[None, :] < starts[:, None]
        return scores.masked_fill(padding[:, None, :], float("-inf"))

    def layer_budgets(self, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """Tokens each row keeps in ``layer``: the budget, or PyramidKV's share of it."""
        cfg = self.config
        budgets = row_budgets(cfg.budget, lengths)
        if cfg.schedule == "uniform":
            return budgets
        return pyramid_budgets(budgets, lengths, cfg.window, cfg.pyramid_beta, layer, self.num_layers)


def pyramid_budgets(
    budgets: torch.Tensor, lengths: torch.Tensor, window: int, beta: int, layer: int, layers: int
) -> torch.Tensor:
    """PyramidKV's per-layer budget (window included): a linear ramp from ~2x the average prefix
    budget at layer 0 down to 1/beta of it at the top, the average staying the same.

    Rows whose prompt is shorter than twice the prefix budget keep the uniform budget, as in
    PyramidKV's reference code.
    """
    prefix = (budgets - window).clamp(min=0)
    low = prefix // beta
    high = 2 * prefix - low
    over = high > lengths - window
    high = torch.where(over, (lengths - window).clamp(min=0), high)
    low = torch.where(over, 2 * prefix - high, low)
    step = (high - low) // max(layers - 1, 1)
    ramp = high - layer * step + window
    return torch.where(lengths < 2 * prefix, budgets, ramp)
