"""Attention-sink statistics shared by ACT, VAR and ``attnkit inspect sinks``.

Two detectors: ACT's causal column mean of the attention map (a token that every later query
attends to), and VAR's massive activation on sink dimensions of the hidden state. Both take
padding into account: padded keys are never sinks and padded queries never vote.
"""

from __future__ import annotations

import torch

from attnkit.primitives import causal_keep


def column_mean(probs: torch.Tensor, allowed: torch.Tensor, query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``s_j = sum_i A_ij / #{valid queries i allowed to attend to j}``, per batch row and head.

    probs: [batch, heads, queries, keys]; allowed: bool [batch or 1, 1 or heads, queries, keys] (the
    mask: causal, padding, sliding window); query_valid: bool [batch, queries] (False = padding).
    Returns [batch, heads, keys], 0 where no valid query sees the key.
    """
    voters = allowed if query_valid is None else allowed & query_valid[:, None, :, None]
    voters = voters.to(probs.dtype)
    counts = voters.sum(dim=2)
    sums = (probs * voters).sum(dim=2)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


def causal_column_mean(
    probs: torch.Tensor, key_valid: torch.Tensor | None = None, query_offset: int | None = None
) -> torch.Tensor:
    """ACT's statistic on a causal map: ``s_j = sum_i A_ij / (n - j)``, padding excluded.

    key_valid: [batch, keys] bool (False = padding); query i sits at key position
    ``query_offset + i`` (default: the last ``queries`` keys).
    """
    _, _, q, k = probs.shape
    offset = k - q if query_offset is None else query_offset
    allowed = causal_keep(torch.arange(q, device=probs.device) + offset, k)
    query_valid = None
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
        query_valid = key_valid[:, offset : offset + q]
    return column_mean(probs, allowed, query_valid)


def select_sinks(
    column_mean: torch.Tensor,
    threshold: float | torch.Tensor,
    key_valid: torch.Tensor | None = None,
    skip_first: bool = True,
) -> torch.Tensor:
    """Keys whose column mean exceeds ``threshold``; the first such key per row and head dropped.

    ACT leaves the initial sink alone and calibrates only the later, "hidden" ones.
    ``threshold`` may be a tensor broadcastable to [batch, heads, keys] (a per-row alpha / N).
    Returns bool [batch, heads, keys].
    """
    sinks = column_mean > threshold
    if key_valid is not None:
        sinks = sinks & key_valid[:, None, :]
    if skip_first:
        first = torch.cumsum(sinks.int(), dim=-1) == 1
        sinks = sinks & ~first
    return sinks


def calibrate(probs: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """Scale sink columns by ``beta``; give the freed mass to the other keys in proportion.

    probs: [batch, heads, queries, keys]; sinks: bool [batch, heads, keys]. Rows keep summing to 1.
    A row whose whole mass sits on sinks has nothing to redistribute to and is left unchanged.
    """
    on_sinks = sinks[:, :, None, :].to(probs.dtype)
    sink_mass = (probs * on_sinks).sum(-1, keepdim=True)
    rest = 1.0 - sink_mass
    scale = torch.where(rest > 1e-6, (1.0 - beta * sink_mass) / rest.clamp(min=1e-6), torch.ones_like(rest))
    beta_or_one = torch.where(rest > 1e-6, torch.full_like(rest, beta), torch.ones_like(rest))
    return probs * (on_sinks * beta_or_one + (1 - on_sinks) * scale)


def massive_activation(hidden: torch.Tensor, dims: list[int], eps: float = 1e-6) -> torch.Tensor:
    """VAR's ``phi(x) = max_{d in dims} |x_d / rms(x)|`` per token. hidden: [batch, seq, dim]."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return (x[..., dims] / rms).abs().amax(-1)


def at_positions(values: torch.Tensor, first: int, keys: int) -> torch.Tensor:
    """Flags stored by absolute position [..., known] mapped onto keys ``first .. first + keys``
    (False where nothing is known): prefill findings seen from a later call, whose keys may be
    only the last ones (a sliding-window layer)."""
    out = torch.zeros(*values.shape[:-1], keys, dtype=torch.bool, device=values.device)
    known = values.shape[-1]
    lo, hi = max(first, 0), min(known, first + keys)
    if hi > lo:
        out[..., lo - first : hi - first] = values[..., lo:hi]
    return out
