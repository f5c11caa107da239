"""``razor`` (RazorAttention): retrieval heads keep the whole cache, the others a few tokens.

RazorAttention (Tang et al., 2024): only a few heads ("retrieval heads": induction and echo heads
found on repeated random tokens, ``attnkit profile razor-heads``) read the whole context. Every
other KV head keeps ``sink`` initial tokens and the recent ``L_h = max(local, N / ratio)``
tokens; the tokens it drops are folded into one compensation token per head, the mean of their
keys and values (paper Eq. 4). In the softmax the compensation token counts as the ``N_d``
tokens it stands for (paper Eq. 5: its exp term is multiplied by ``N_d`` in numerator and
denominator), i.e. a ``log N_d`` bias on its logit (``compensation: weighted``); ``plain`` counts it
once (the MindSpore port's behaviour) and ``none`` drops it.

Heads of one layer then keep different lengths; the cache stores them in two groups, so the
memory saving is real.
"""

from __future__ import annotations

import torch

from attnkit.engine.kvcache import (
    KVGroup,
    compensation,
    compensation_bias,
    keep,
    top_columns,
    with_token,
)
from attnkit.methods.base import register
from attnkit.methods.kv import KVMethod
from attnkit.methods.streaming import sink_and_recent
from attnkit.recipe.methods import RazorConfig


@register
class Razor(KVMethod):
    """Full cache on retrieval heads, sinks + recent window + a compensation token on the rest."""

    name = "razor"
    config_class = RazorConfig
    replayable = True  # a captured step reads each group of heads with its slot biases (compensation)

    def prepare(self, at) -> None:
        retrieval = at.heads(self.config.heads, level="kv").by_layer()
        self.retrieval = {layer: retrieval.get(layer, []) for layer in range(at.shape.num_layers)}
        self.stats.describe("retrieval_kv_heads", sum(map(len, retrieval.values())))

    def recent(self, lengths: torch.Tensor) -> torch.Tensor:
        """L_h per row (the config's rule, once per prefill and layer)."""
        return torch.tensor(
            [self.config.recent(n) for n in lengths.tolist()], dtype=lengths.dtype, device=lengths.device
        )

    def select(self, call, keys, values, starts, lengths) -> list[KVGroup] | None:
        cfg = self.config
        full = self.retrieval[call.layer]
        rest = [h for h in range(keys.shape[1]) if h not in full]
        counts = torch.minimum(cfg.sink + self.recent(lengths), lengths)
        if not rest or bool((counts >= lengths).all()):
            return None
        length = keys.shape[2]
        groups = []
        if full:
            columns = torch.arange(length, device=keys.device)[None, :].expand(keys.shape[0], -1)
            columns = torch.where(columns >= starts[:, None], columns, -1)
            groups.append(keep(keys, values, full, columns[:, None, :].expand(-1, len(full), -1)))
        scores = sink_and_recent(length, starts, cfg.sink, counts - cfg.sink)
        scores = scores[:, None, :].expand(-1, len(rest), -1)
        group = keep(keys, values, rest, top_columns(scores, counts))
        self.stats.add("tokens_dropped", int((scores == 0).sum()))
        if cfg.compensation != "none":
            group = self.with_compensation(group, keys, values, scores == 0)
        return groups + [group]

    def with_compensation(
        self, group: KVGroup, keys: torch.Tensor, values: torch.Tensor, dropped: torch.Tensor
    ) -> KVGroup:
        """Append each head's compensation token (mean of its dropped keys/values)."""
        index = group.kv_index()
        key, value, count, column = compensation(keys.index_select(1, index), values.index_select(1, index), dropped)
        bias = compensation_bias(count)
        if self.config.compensation == "plain":
            bias = torch.where(count > 0, 0.0, float("-inf"))
        self.stats.add("compensation_tokens", int((count > 0).sum()))
        return with_token(group, key, value, torch.where(count > 0, column, -1), bias)
