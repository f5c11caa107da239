"""The state of one forward call: its phase read from the cache, its padding and positions, space for methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Phase = Literal["prefill", "decode", "extend"]


@dataclass
class CallState:
    """State of one forward call. Made fresh for every call; nothing carries over to the next input."""

    phase: Phase
    past_length: int
    query_length: int
    attention_mask: torch.Tensor | None
    """The caller's 2-D padding mask [batch, past + query] (1 = token, 0 = padding), if given."""
    input_ids: torch.Tensor | None = None
    """The call's token ids [batch, query], when it was given ids rather than embeddings."""
    positions: torch.Tensor | None = None
    """The position ids the model rotates the call's tokens at [batch, query]: the forward's
    ``position_ids`` where given (generate passes them, counting only real tokens of a left-padded
    batch), else ``past_length + arange(query_length)`` as the decoder makes them. None where the
    model takes position ids of another shape (multimodal rope's [3, batch, query]), and where no
    positions stage is attached: only one reads them, and a decode step should not pay for them."""
    scratch: dict[str, Any] = field(default_factory=dict)
    """Per-call space for methods, keyed by method label."""
    cache: Any = None
    """The call's KV cache object, if it was given one."""
    graph: Any = None
    """The cache of a decode step on a captured-decoding cache (:class:`attnkit.engine.graphs.GraphCache`):
    every layer then attends through the length-reading kernel, and no mask is built."""
    sequence: dict[str, Any] = field(default_factory=dict)
    """Space that lives as long as the call's cache: what prefill found (sinks, say) for decode
    steps to reuse. Fresh at every prefill; a call without a cache gets a fresh one too, which the
    cache the model makes for it (``use_cache=True``) takes on for the calls that continue it."""

    @property
    def total_length(self) -> int:
        return self.past_length + self.query_length

    @property
    def key_positions(self) -> torch.Tensor | None:
        """[batch, tokens]: the position every token of the sequence was rotated at, the cached ones
        (from earlier calls on this cache) then this call's; a layer's keys are its last ones (a
        sliding-window layer keeps fewer). Appended at every call while a positions stage is
        attached (None otherwise), so a decode step knows where the keys it reads were rotated."""
        return self.sequence.get("positions")


def append_tokens(held: torch.Tensor | None, new: torch.Tensor, past: int) -> torch.Tensor:
    """``held`` [batch, tokens, ...] then ``new``, along the tokens: what a cache of ``past`` tokens
    holds, kept beside it. A cache cropped since (``Cache.crop``: assisted decoding, a benchmark
    rewinding) has the held tokens cut to its length; a cache whose batch grew since
    (``Cache.batch_repeat_interleave``, each row repeated: the conflict task's shared prefix) has
    its rows repeated alike; after any other change of batch the held tokens are dropped, and a
    stage that needs them says so."""
    if held is None:
        return new
    held = held[:, :past]
    if held.shape[0] != new.shape[0]:
        if new.shape[0] % held.shape[0]:
            return new
        held = held.repeat_interleave(new.shape[0] // held.shape[0], dim=0)
    return torch.cat((held, new), dim=1)


def shared(state: CallState | None, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``make()`` once per forward call and ``key``: what every layer of a call builds alike (its
    additive mask, from the one mask transformers hands to every layer of a kind)."""
    if state is None:
        return make()
    key = ("attnkit", *key)
    if key not in state.scratch:
        state.scratch[key] = make()
    return state.scratch[key]
