"""``act``: attention calibration of hidden attention sinks (Yu et al., ICML 2024).

Per selected head: the column mean ``s_j = sum_i A_ij / (n - j)`` finds sink tokens (``s_j >
threshold``, the initial sink left alone); their columns are scaled by ``beta`` and the freed mass
goes to the other tokens of the row in proportion to their weights, so rows still sum to 1.
Sinks are found at prefill, per batch row, with padding excluded; decode steps calibrate the new
query against the prefill's sinks.

Two paths compute the same thing. ``eager`` materialises the attention matrix of the selected
layers (the reference's approach). ``fast`` keeps the model's kernel and corrects its output:
with ``S`` the sinks and ``s_i = sum_{j in S} A_ij``, the calibrated output is
``beta * sum_S A_ij v_j + c_i * (o_i - sum_S A_ij v_j)``, ``c_i = (1 - beta s_i) / (1 - s_i)``;
the column statistic is accumulated over query chunks, so no N x N matrix is held.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit import kernels
from attnkit.engine.plan import AttentionCall
from attnkit.methods.base import Method, register
from attnkit.primitives import (
    MASKED,
    as_additive,
    causal_keep,
    compute_dtype,
    last_queries,
    layer_window,
)
from attnkit.recipe.methods import ACTConfig
from attnkit.sinks import at_positions, calibrate, column_mean, select_sinks


@register
class ACT(Method):
    """Calibrates hidden attention sinks in selected heads."""

    name = "act"
    config_class = ACTConfig
    one_per_layer = (
        "ACT keeps one set of sinks per layer, and its fast path corrects the kernel's own output, so a second "
        "entry would neither stack nor match the eager path"
    )

    def attach(self, at) -> None:
        spec = self.config.heads
        if spec is None:
            last = at.shape.num_layers - 2
            spec = {"layers": f"2-{last}", "heads": "all"} if last >= 2 else "all"
        heads = at.heads(spec)
        self.stats.describe("heads", len(heads))
        if self.config.beta == 1.0:
            return  # the identity: nothing to attach, so the model keeps its exact logits and speed
        for layer, indices in heads.by_layer().items():
            if self.config.path == "eager":
                at.prob_edit(layer, self._eager_edit(layer, indices))
            else:
                at.output_edit(layer, self._fast_edit(layer, indices))

    # -- shared: which keys are sinks for this call -------------------------------------------

    def _threshold(self, key_valid: torch.Tensor | None, batch: int, keys: int, device) -> torch.Tensor:
        """Per batch row threshold [batch, 1, 1]: fixed, or alpha / (number of real tokens)."""
        if self.config.alpha is None:
            return torch.full((batch, 1, 1), self.config.threshold, device=device)
        n = key_valid.sum(-1) if key_valid is not None else torch.full((batch,), keys, device=device)
        return (self.config.alpha / n.float()).view(batch, 1, 1)

    def _store(self, call: AttentionCall) -> dict:
        return call.state.sequence.setdefault(self.name, {}) if call.state is not None else {}

    def _remember(self, call: AttentionCall, sinks: torch.Tensor) -> None:
        """Keep the prefill's sinks by absolute position, for the decode steps of this sequence."""
        self._store(call)[call.layer] = sinks
        self.stats.add("sinks_found", int(sinks.sum()))
        self.stats.add("heads_calibrated", int(sinks.any(-1).sum()))

    def _recall(self, call: AttentionCall, keys: int) -> torch.Tensor | None:
        """The prefill's sinks mapped onto this call's keys (a sliding layer holds only the last ones)."""
        stored = self._store(call).get(call.layer)
        if stored is None:
            return None
        return at_positions(stored, total_length(call) - keys, keys)

    def _find(self, means: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        threshold = self._threshold(key_valid, means.shape[0], means.shape[-1], means.device)
        return select_sinks(means, threshold.to(means.dtype), key_valid)

    # -- eager path: edit the materialised probabilities -------------------------------------

    def _eager_edit(self, layer: int, heads: list[int]):
        index = head_index(heads)

        def edit(probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
            idx = index(probs.device)
            chosen = probs[:, idx]
            key_valid = valid_keys(call, probs.shape[-1])
            sinks = self._recall(call, probs.shape[-1]) if call.state.phase != "prefill" else None
            if sinks is None:
                allowed = call.mask > MASKED / 2 if call.mask is not None else causal(probs, call)
                means = column_mean(chosen, allowed, query_valid(call, key_valid, probs.shape[-2]))
                sinks = self._find(means, key_valid)
                self._remember(call, sinks)
            probs = probs.clone()
            probs[:, idx] = calibrate(chosen, sinks, self.config.beta)
            self.stats.add("layer_calls")
            return probs

        return edit

    # -- fast path: correct the kernel's output ------------------------------------------------

    def _fast_edit(self, layer: int, heads: list[int]):
        index = head_index(heads)

        def edit(call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
            idx = index(output.device)
            groups = call.query.shape[1] // call.key.shape[1]
            query = call.query[:, idx]
            key = call.key[:, idx // groups]
            value = call.value[:, idx // groups]
            if call.state is not None and call.state.graph is not None:
                return self._captured(call, query, key, value, output, idx)
            keys = key.shape[-2]
            key_valid = valid_keys(call, keys)
            sinks = self._recall(call, keys) if call.state.phase != "prefill" else None
            lse, means = chunked_stats(call, query, key, key_valid, self.config.chunk_mb, sinks is None)
            if sinks is None:
                sinks = self._find(means, key_valid)
                self._remember(call, sinks)
            corrected = correct_output(call, query, key, value, lse, sinks, output[:, :, idx], self.config.beta)
            output = output.clone()
            output[:, :, idx] = corrected
            self.stats.add("layer_calls")
            return output

        return edit

    def _captured(
        self,
        call: AttentionCall,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        idx: torch.Tensor,
    ) -> torch.Tensor:
        """The fast path on a captured decode step: the prefill's sinks (at their own columns of the
        fixed-capacity cache; their padded layout made at the first such step, before the graph is
        captured) and the kernel's log-sum-exp, with no host reads."""
        store = self._store(call)
        if ("columns", call.layer) not in store:
            sinks = store.get(call.layer)
            store["columns", call.layer] = None if sinks is None else sink_columns(sinks)
        columns = store["columns", call.layer]
        if columns is None:
            return output
        window = layer_window(call.module.config, call.layer)
        if window is not None:  # a sink that left the window is not read
            seen = columns[0] >= call.state.graph.layers[call.layer].filled() - window
            columns = (columns[0], columns[1] & seen)
        lse = call.lse[:, idx, None]
        corrected = calibrated(call, query, key, value, lse, columns, None, output[:, :, idx], self.config.beta)
        output = output.clone()
        output[:, :, idx] = corrected
        self.stats.add("layer_calls")
        return output

    @property
    def replayable(self) -> bool:  # type: ignore[override]
        """The fast path replays (an output correction from the kernel's log-sum-exp); the eager
        path edits probabilities, which the captured step's kernel never forms."""
        return self.config.path == "fast"


def head_index(heads: list[int]) -> Callable[[torch.device], torch.Tensor]:
    """``heads`` as an index tensor on a device, copied there once (a captured step copies nothing
    from the host, and an eager step need not copy at every call)."""
    placed: dict[torch.device, torch.Tensor] = {}

    def on(device: torch.device) -> torch.Tensor:
        if device not in placed:
            placed[device] = torch.tensor(heads, device=device)
        return placed[device]

    return on


def total_length(call: AttentionCall) -> int:
    return call.state.total_length if call.state is not None else call.key.shape[-2]


def valid_keys(call: AttentionCall, keys: int) -> torch.Tensor | None:
    """bool [batch, keys]: False on padding, from the caller's 2-D mask (the keys are its last ``keys``)."""
    mask = call.state.attention_mask if call.state is not None else None
    return None if mask is None else mask[:, -keys:].bool()


def query_valid(call: AttentionCall, key_valid: torch.Tensor | None, queries: int) -> torch.Tensor | None:
    return None if key_valid is None else key_valid[:, -queries:]


def causal(probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    q, k = probs.shape[-2], probs.shape[-1]
    return causal_keep(last_queries(q, k, probs.device), k)


def mask_rows(call: AttentionCall, rows: slice, keys: int, device) -> torch.Tensor:
    """Additive mask for query rows ``rows`` and the first ``keys`` keys [batch or 1, 1, rows, keys]."""
    raw = call.raw_mask
    offset = call.key.shape[-2] - call.query.shape[-2]
    if raw is None:
        return as_additive(causal_keep(torch.arange(rows.start, rows.stop, device=device) + offset, keys))
    return as_additive(raw[:, :, rows, :keys])


def chunk_logits(call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Logits in (at least) float32; half-precision inputs keep the fast matmul with a float32 result."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and call.softcap is None:
        b, h, q, d = query.shape
        flat = torch.bmm(query.reshape(b * h, q, d), key.reshape(b * h, -1, d).transpose(1, 2), out_dtype=torch.float32)
        return flat.view(b, h, q, -1).mul_(call.scaling)
    return call.logits(query, key)


def chunked_stats(
    call: AttentionCall,
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor | None,
    chunk_mb: int,
    with_means: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row log-sum-exp [b, h, q] and (optionally) the column mean [b, h, k], over query chunks.

    Never holds more than about ``chunk_mb`` of scores; a chunk reads only the keys its rows can
    see (the causal prefix), so the work is half of a full score matrix.
    """
    if (
        kernels.available(query)
        and call.softcap is None
        and (call.raw_mask is None or call.raw_mask.dtype == torch.bool)
    ):
        lse, sums = kernels.sink_stats(
            query, key, call.scaling, key_valid, layer_window(call.module.config, call.layer), with_means
        )
        return lse, (sums / voter_counts(call, key_valid, query.shape[-2], key.shape[-2]) if with_means else None)
    b, h, q, _ = query.shape
    k = key.shape[-2]
    offset = k - q
    dtype = compute_dtype(query)
    rows_per_chunk = max(1, (chunk_mb << 20) // (b * h * k * dtype.itemsize * 2))
    lse = torch.empty(b, h, q, device=query.device, dtype=dtype)
    sums = torch.zeros(b, h, k, device=query.device, dtype=dtype) if with_means else None
    counts = torch.zeros(b, 1, k, device=query.device, dtype=dtype) if with_means else None
    q_valid = query_valid(call, key_valid, q)
    for start in range(0, q, rows_per_chunk):
        rows = slice(start, min(q, start + rows_per_chunk))
        seen = min(k, rows.stop + offset)
        mask = mask_rows(call, rows, seen, query.device)
        scores = chunk_logits(call, query[:, :, rows], key[:, :, :seen]).add_(mask)
        chunk_lse = torch.logsumexp(scores, dim=-1)
        lse[:, :, rows] = chunk_lse
        if not with_means:
            continue
        probs = scores.sub_(chunk_lse[..., None]).exp_()
        voters = mask > MASKED / 2
        if q_valid is not None:
            voters = voters & q_valid[:, None, rows, None]
            probs.mul_(q_valid[:, None, rows, None])
        sums[..., :seen] += probs.sum(2)
        counts[..., :seen] += voters.sum(2, dtype=dtype)
    if key_valid is not None and with_means:
        counts = counts * key_valid[:, None, :]
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums)) if with_means else None
    return lse, means


def voter_counts(call: AttentionCall, key_valid: torch.Tensor | None, queries: int, keys: int) -> torch.Tensor:
    """How many valid queries see each key [b, 1, k] (causal, window, padding); at least 1."""
    device = call.query.device
    offset = keys - queries
    q_valid = torch.ones(1, queries, device=device) if key_valid is None else key_valid[:, offset:].float()
    ahead = torch.nn.functional.pad(q_valid.cumsum(-1), (1, 0))  # ahead[t] = valid queries before query t
    key_pos = torch.arange(keys, device=device)
    first = (key_pos - offset).clamp(0, queries)
    window = layer_window(call.module.config, call.layer)
    last = torch.full_like(key_pos, queries) if window is None else (key_pos + window - offset).clamp(0, queries)
    counts = (ahead[:, last] - ahead[:, first]).clamp(min=0)
    if key_valid is not None:
        counts = counts * key_valid
    return counts.clamp(min=1)[:, None, :]


def correct_output(
    call: AttentionCall,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    sinks: torch.Tensor,
    output: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The calibrated output of the chosen heads from the kernel's output and the sink columns only.

    output: [b, q, h, d] kernel output of the chosen heads; returns the same shape and dtype.
    """
    columns = sink_columns(sinks)
    if columns is None:
        return output
    mask = sink_mask(call, columns[0], query.shape[2], key.shape[-2])
    return calibrated(call, query, key, value, lse, columns, mask, output, beta)


def sink_columns(sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sink columns of each row and head, padded to the most any has: (columns, present) [b, h, m];
    None without sinks. Reads the count on the host (so a captured step makes it before capture)."""
    width = int(sinks.sum(-1).max()) if sinks.any() else 0
    if width == 0:
        return None
    order = torch.sort(sinks.int(), dim=-1, descending=True, stable=True)
    return order.indices[..., :width], order.values[..., :width].bool()


def calibrated(
    call: AttentionCall,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    columns: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    output: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """ACT's correction of ``output`` [b, q, h, d] from the sink ``columns`` (and the layer's
    ``mask`` there, [b, h, q, m] or None) and the rows' log-sum-exp ``lse`` [b, h, q]."""
    cols, present = columns
    b, h, q, d = query.shape
    gather = cols[..., None].expand(b, h, cols.shape[-1], d)
    key_s, value_s = key.gather(2, gather), value.gather(2, gather)
    scores = call.logits(query, key_s) + torch.where(present, 0.0, MASKED)[:, :, None, :]  # [b, h, q, m]
    if mask is not None:
        scores = scores + mask
    attn = torch.exp(scores - lse[..., None])
    mass = attn.sum(-1, keepdim=True)
    part = torch.matmul(attn, value_s.to(attn.dtype))
    rest = 1.0 - mass
    ok = rest > 1e-6
    c = torch.where(ok, (1.0 - beta * mass) / rest.clamp(min=1e-6), torch.ones_like(rest))
    b_eff = torch.where(ok, torch.full_like(rest, beta), torch.ones_like(rest))
    o = output.transpose(1, 2).to(attn.dtype)
    fixed = b_eff * part + c * (o - part)
    return fixed.transpose(1, 2).to(output.dtype)


def sink_mask(call: AttentionCall, cols: torch.Tensor, queries: int, keys: int) -> torch.Tensor:
    """The layer's additive mask at the sink columns only: [b, h, q, m]."""
    raw = call.raw_mask
    b, h, m = cols.shape
    if raw is None:
        q_pos = last_queries(queries, keys, cols.device)[:, None]
        return as_additive(q_pos[None, None] >= cols[:, :, None, :])
    full = raw[..., :keys].expand(b, h, queries, keys)
    picked = full.gather(-1, cols[:, :, None, :].expand(b, h, queries, m))
    return as_additive(picked)
