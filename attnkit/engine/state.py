"""The state of one forward call: its phase read from the cache, its padding, space for methods."""

from __future__ import annotations

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
    scratch: dict[str, Any] = field(default_factory=dict)
    """Per-call space for methods, keyed by method label."""
    cache: Any = None
    """The call's KV cache object, if it was given one."""
    sequence: dict[str, Any] = field(default_factory=dict)
    """Space that lives as long as the call's cache: what prefill found (sinks, say) for decode
    steps to reuse. Fresh at every prefill; a call without a cache gets a fresh one too."""

    @property
    def total_length(self) -> int:
        return self.past_length + self.query_length
