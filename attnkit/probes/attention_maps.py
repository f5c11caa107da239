"""Reading attention probabilities layer by layer, through public extension points only.

Profilers that score heads need each layer's softmax attention. Asking the model for
``output_attentions`` keeps every layer's [batch, heads, queries, keys] map alive until the forward
ends (30 layers x 8K^2 x 9 heads is 72 GB for SmolLM2); a forward hook on each attention module
sees the map its eager attention returns, reduces it to what the profiler needs, and lets it go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from attnkit.engine import attention
from attnkit.engine.attach import attention_modules, set_text_attention
from attnkit.heads import text_config

__all__ = ["attention_probabilities", "eager_attention"]


@contextmanager
def eager_attention(model: Any, doing: str = "profiling heads") -> Iterator[None]:
    """Run ``model`` with eager attention inside the block (so attention modules return their
    probabilities); its own implementation is restored afterwards, also on errors. Refuses a model
    with an attnkit handle applied (``doing`` says what the refusal stops)."""
    config = text_config(model.config)
    original = attention.untouched_implementation(config, doing)
    if original != "eager":
        set_text_attention(model, "eager")
    try:
        yield
    finally:
        if original != "eager":
            set_text_attention(model, original)


@contextmanager
def attention_probabilities(model: Any, fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Inside the block, every attention module's forward calls ``fn(layer, probabilities)`` with
    its softmax attention [batch, heads, queries, keys] (eager attention is switched on for the block)."""

    def hook(module: torch.nn.Module, _args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"{type(module).__name__} (layer {module.layer_idx}) returned no attention probabilities "
                "under eager attention; this architecture is not supported by the head profilers yet"
            )
        fn(module.layer_idx, weights)

    with eager_attention(model):
        handles = [m.register_forward_hook(hook) for m in attention_modules(model).values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
