"""``sink_redistribute``: visual attention sink redistribution, VAR (Kang et al., "See What You Are Told", ICLR 2025).

VAR moves attention that a head wastes on sink tokens onto the non-sink tokens of a target span
(the image in a LLaVA-style model, a declared span in a text model), only in the heads and query
rows that already look at that span. Reference code: ``MICV-yonsei/VisAttnSink``
(``src/logic/logic.py``: ``DimProspector``, ``HeadFork``, ``VARProcessor``). What is done here,
with every choice where the reference is ambiguous:

1. **Sinks (massive activation).** At prefill, on each edited layer's *input* hidden state ``x``
   (the residual stream before the layer's norm; a forward pre-hook on the decoder layer), a token
   is a sink if ``phi(x) = max_{d in sink_dims} |x_d / rms(x)| > tau`` (``rms`` without a learned
   weight, ``eps = 1e-6``), per batch row; padding is never a sink. Sinks inside the target span
   are *span sinks*, the rest *text sinks*. Decode (and extend) steps reuse the prefill's sink set,
   stored per layer by absolute position in ``CallState.sequence``; as in the reference, new
   tokens are never checked (the reference runs its detector during prefill only). An extend
   call (several new tokens on a cache, which the reference never makes) is treated like a
   decode step: prefill sinks and span, its rows after the span edited.
2. **Rows (online, per input).** For every head ``h`` and query row ``i`` of an edited layer::

       summation = sum_{j in span} A_ij
       portion   = sum_{j in span & sinks} A_ij / sum_{j in span} (A_ij + 1e-6)

   and the row is kept if ``portion <= rho`` and ``summation >= summ``, exactly the reference's
   test (including its ``1e-6`` added to each span weight in the denominator). The paper words it
   as a non-sink ratio ``1 - portion >= rho``; the two agree at the default ``rho = 0.5``, and
   the config's ``rho`` is the code's (a bound on the *sink* share). As in the reference, a layer
   whose span holds no sink (in that batch row) is left alone, even if text sinks exist.
   Only query rows after the span are edited (the reference's text queries after the image,
   ``i >= span end``); a decode step's new row always lies after it.
3. **Redistribution** of a kept row: every sink key (text and span) keeps ``p`` of its weight;
   the budget ``(1 - p) * sum_{j in sinks} A_ij`` goes to the span's non-sink keys in proportion
   to their weights. Rows still sum to 1. A kept row with no weight on span non-sink keys (only
   possible with ``rho >= 1`` or ``summ = 0``) is left unchanged instead of dividing by zero.
4. **Layers** ``first_layer`` (2) to ``L - 2``: the reference detects sinks from layer 2 on and
   skips the last layer (``except_last_layer``). All heads of those layers are candidates.

The target span:

* LLaVA-style models (a config with ``image_token_id``, e.g. ``LlavaForConditionalGeneration``):
  the positions whose ``input_ids`` equal the image token, per batch row.
* Text models: ``span: {start, end}`` -- token positions ``[start, end)`` counted from each row's
  first real token (so a left-padded row and the same prompt alone agree); or
  ``span_markers: [open, close]`` -- the tokens strictly between the first occurrence of ``open``
  and the next occurrence of ``close`` (markers excluded). A marker is a token id, a list of token
  ids, or a string encoded without special tokens by the tokenizer (``SinkRedistribute(..., tokenizer=tok)``,
  else the one saved beside the model); pick markers that tokenize the same in context (special
  tokens, or tags on their own line). A row whose span is not found is never edited and is counted
  in ``rows_without_span``.

The edit needs the span rows of the attention matrix, so it runs in the engine's eager
probability stage (``prob_edit``) on the edited layers only; every other layer keeps the model's
own fast backend (sdpa / flash). ``p = 1`` is the identity: nothing is attached.

Stats per call: ``text_sinks`` / ``span_sinks`` (summed over edited layers and batch rows, at
prefill), ``span_tokens``, ``rows_without_span``, ``layer_calls``, ``rows_redistributed``,
``heads_redistributed`` (layer, batch row, head with at least one kept row), ``budget_moved``
(summed attention mass moved) and ``mean_budget_moved`` (per kept row).
"""

from __future__ import annotations

from typing import Any

import torch

from attnkit.engine.plan import AttentionCall
from attnkit.engine.state import CallState
from attnkit.heads import text_config
from attnkit.methods.base import Method, register
from attnkit.methods.markers import find, marker_ids, saved_tokenizer
from attnkit.recipe.methods import Marker, SinkRedistributeConfig
from attnkit.sinks import at_positions, massive_activation

PORTION_EPS = 1e-6
"""The reference adds this to every span weight in the portion's denominator."""


@register
class SinkRedistribute(Method):
    """Redistributes sink attention to a target span's non-sink tokens (VAR, Kang et al. 2025)."""

    name = "sink_redistribute"
    config_class = SinkRedistributeConfig

    def __init__(self, config: SinkRedistributeConfig | None = None, *, tokenizer: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.tokenizer = tokenizer

    def attach(self, at) -> None:
        cfg = self.config
        hidden = text_config(at.model.config).hidden_size
        bad = [d for d in cfg.sink_dims if not 0 <= d < hidden]
        if bad:
            raise ValueError(
                f"sink_redistribute: sink_dims {bad} out of range; the model's hidden size is {hidden} (0-{hidden - 1})"
            )
        last = at.shape.num_layers - (2 if cfg.except_last_layer else 1)
        layers = list(range(cfg.first_layer, last + 1))
        if not layers:
            raise ValueError(
                f"sink_redistribute: no layer to edit: first_layer {cfg.first_layer}, model has {at.shape.num_layers} layers"
                + (" and the last is skipped (except_last_layer)" if cfg.except_last_layer else "")
            )
        target, finder = self._target(at)
        self.stats.describe("layers", f"{layers[0]}-{layers[-1]}")
        self.stats.describe("target", target)
        if cfg.p == 1.0:
            return  # the identity: nothing attached, so the model keeps its exact logits and speed

        key = f"{self.name}@{id(self)}"
        at.begin_call(lambda state: self._begin(state, key, state.input_ids, finder))
        for layer in layers:
            at.layer_input(layer, self._detector(layer, key))
            at.prob_edit(layer, self._edit(layer, key))

    # -- the target span -------------------------------------------------------------------

    def _target(self, at) -> tuple[str, Any]:
        """A name and a function (input_ids or None, valid [b, T]) -> span mask [b, T] or None."""
        cfg = self.config
        if cfg.span is not None:
            span = cfg.span
            return f"span {span.start}-{span.end}", lambda ids, valid: declared_span(valid, span.start, span.end)
        if cfg.span_markers is not None:
            opening, closing = (self._marker_ids(m, at) for m in cfg.span_markers)
            return f"markers {cfg.span_markers}", lambda ids, valid: marked_span(ids, valid, opening, closing)
        image = getattr(at.model.config, "image_token_id", None)
        if image is None:
            image = getattr(at.model.config, "image_token_index", None)
        if image is None:
            raise ValueError(
                "sink_redistribute: no target span: set span: {start, end} or span_markers: [open, close] for a text model, "
                "or apply it to a LLaVA-style model whose config has image_token_id"
            )
        return f"image tokens (id {image})", lambda ids, valid: None if ids is None else (ids == image) & valid

    def _marker_ids(self, marker: Marker, at) -> list[int]:
        return marker_ids(
            marker, self.tokenizer or saved_tokenizer(at.model), "sink_redistribute: span marker", "SinkRedistribute"
        )

    def _begin(self, state, key: str, ids: torch.Tensor | None, finder) -> None:
        """At prefill: find each row's span; decode and extend steps reuse it from ``sequence``."""
        if state.phase != "prefill":
            return
        length = state.query_length
        mask = state.attention_mask
        device = ids.device if ids is not None else (mask.device if mask is not None else None)
        if mask is not None and mask.dim() == 2:
            valid = mask[:, -length:].bool()
        else:
            batch = ids.shape[0] if ids is not None else 1
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        span = finder(ids, valid)
        if span is None:
            span = torch.zeros_like(valid)
        found = span.any(-1)
        positions = torch.arange(length, device=span.device)
        last = torch.where(span, positions, -1).amax(-1)
        end = torch.where(found, last + 1, torch.full_like(last, torch.iinfo(torch.long).max))
        state.sequence[key] = {"span": span, "span_end": end, "sinks": {}}
        self.stats.add("span_tokens", int(span.sum()))
        self.stats.add("rows_without_span", int((~found).sum()))

    # -- sinks: massive activations on the layer input -------------------------------------

    def _detector(self, layer: int, key: str):
        dims, tau = list(self.config.sink_dims), self.config.tau

        def detect(hidden: torch.Tensor, state: CallState | None) -> None:
            if state is None or state.phase != "prefill":
                return  # decode steps reuse the prefill's sinks, as the reference does
            store = state.sequence.get(key)
            if store is None:
                return
            sinks = massive_activation(hidden, dims) > tau
            mask = state.attention_mask
            if mask is not None and mask.dim() == 2:
                sinks = sinks & mask[:, -sinks.shape[-1] :].bool()
            store["sinks"][layer] = sinks
            span = store["span"].to(sinks.device)
            self.stats.add("span_sinks", int((sinks & span).sum()))
            self.stats.add("text_sinks", int((sinks & ~span).sum()))

        return detect

    # -- the edit on the attention probabilities -------------------------------------------

    def _edit(self, layer: int, key: str):
        cfg = self.config

        def edit(probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
            state = call.state
            store = state.sequence.get(key) if state is not None else None
            if store is None or layer not in store["sinks"]:
                self.stats.add("layer_calls_without_sinks")
                return probs
            queries, keys = probs.shape[-2], probs.shape[-1]
            total = state.total_length
            first = total - keys  # absolute position of the first key (a sliding layer holds the last ones)
            sinks = at_positions(store["sinks"][layer], first, keys)
            span = at_positions(store["span"], first, keys)
            q_pos = torch.arange(total - queries, total, device=probs.device)
            rows = q_pos[None, :] >= store["span_end"][:, None].to(probs.device)
            mask = state.attention_mask
            if mask is not None and mask.dim() == 2:
                rows = rows & mask[:, -queries:].bool().to(probs.device)
            whole_sinks = store["sinks"][layer]
            whole_span = store["span"].to(whole_sinks.device)
            out, kept, budget = redistribute(
                probs,
                sinks.to(probs.device),
                span.to(probs.device),
                rows,
                cfg.p,
                cfg.rho,
                cfg.summ,
                span_size=whole_span.sum(-1).to(probs.device),
                span_has_sink=(whole_span & whole_sinks).any(-1).to(probs.device),
            )
            self.stats.add("layer_calls")
            self._count(int(kept.sum()), int(kept.any(-1).sum()), float(torch.where(kept, budget, 0.0).sum()))
            return out

        return edit

    def _count(self, rows: int, heads: int, budget: float) -> None:
        stats = self.stats
        stats.add("rows_redistributed", rows)
        stats.add("heads_redistributed", heads)
        stats.add("budget_moved", budget)
        stats.ratio("mean_budget_moved", "budget_moved", "rows_redistributed")


def redistribute(
    probs: torch.Tensor,
    sinks: torch.Tensor,
    span: torch.Tensor,
    rows: torch.Tensor,
    p: float,
    rho: float,
    summ: float,
    span_size: torch.Tensor | None = None,
    span_has_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAR on attention probabilities, in their own dtype.

    probs: [batch, heads, queries, keys]; sinks, span: bool [batch, keys]; rows: bool [batch,
    queries] (query rows that may be edited). ``span_size`` [batch] (the count in the portion's
    ``1e-6`` term) and ``span_has_sink`` bool [batch] default to what ``span`` and ``sinks`` show;
    a decode step on a sliding-window layer, which sees only the last keys, passes the whole
    sequence's. Returns the edited probabilities, the kept rows (bool [batch, heads, queries]) and
    each row's budget ``(1 - p) * sink mass`` [batch, heads, queries] (moved only where kept).
    """
    target = span & ~sinks
    columns = torch.stack([span, span & sinks, sinks, target], dim=-1).to(probs.dtype)  # [b, k, 4]
    masses = torch.matmul(probs, columns[:, None])  # [b, h, q, 4]
    span_mass, span_sink_mass, sink_mass, target_mass = masses.unbind(-1)
    span_size = span.sum(-1) if span_size is None else span_size
    span_has_sink = (span & sinks).any(-1) if span_has_sink is None else span_has_sink
    portion = span_sink_mass / (span_mass + span_size.to(probs.dtype)[:, None, None] * PORTION_EPS)
    kept = (portion <= rho) & (span_mass >= summ) & (target_mass > 0)
    kept = kept & rows[:, None, :] & span_has_sink[:, None, None]
    budget = (1.0 - p) * sink_mass
    grow = 1.0 + budget / torch.where(target_mass > 0, target_mass, torch.ones_like(target_mass))
    one = torch.ones((), dtype=probs.dtype, device=probs.device)
    factor = torch.where(target[:, None, None, :], grow[..., None], one)
    factor = torch.where(sinks[:, None, None, :], torch.full_like(one, p), factor)
    return torch.where(kept[..., None], probs * factor, probs), kept, budget


def declared_span(valid: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions ``[start, end)`` counted from each row's first real token, clipped to its tokens."""
    index = torch.cumsum(valid.long(), dim=-1) - 1  # index among real tokens; -1 before the first
    return valid & (index >= start) & (index < end)


def marked_span(
    ids: torch.Tensor | None, valid: torch.Tensor, opening: list[int], closing: list[int]
) -> torch.Tensor | None:
    """Per row, the tokens strictly between the first ``opening`` and the next ``closing`` sequence."""
    if ids is None:
        return None
    span = torch.zeros_like(valid)
    for row in range(ids.shape[0]):
        tokens = [t if ok else None for t, ok in zip(ids[row].tolist(), valid[row].tolist())]
        start = find(tokens, opening, 0)
        if start is None:
            continue
        inside = start + len(opening)
        stop = find(tokens, closing, inside)
        if stop is not None and stop > inside:
            span[row, inside:stop] = True
    return span
