"""Running a decoder's layers one at a time, for profilers that run only some of them.

A profiler that changes layer l (act-heads), or scores one layer at a time and resumes after the
last finished one (razor-heads), needs the input of layer l and the keywords every layer takes.
This is done for Llama-family decoders (the decoder's own ``embed_tokens``, ``rotary_emb``,
``layers`` and ``norm``, full attention everywhere); other models run whole.
"""

from __future__ import annotations

from typing import Any

import torch

from attnkit import compat
from attnkit.primitives import layer_window


def tail_supported(model: Any) -> bool:
    """Running layers l..L-1 alone is done for Llama-family decoders with full attention everywhere."""
    decoder = getattr(model, "model", None)
    config = model.config
    return (
        all(hasattr(decoder, name) for name in ("rotary_emb", "layers", "norm", "embed_tokens"))
        and hasattr(model, "lm_head")
        and not any(layer_window(config, i) for i in range(config.num_hidden_layers))
        and not getattr(config, "final_logit_softcapping", None)
        and "gemma" not in config.model_type
    )


def layer_inputs(
    model: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
) -> dict[str, Any]:
    """The keywords each decoder layer of a :func:`tail_supported` model takes for ``hidden``
    [batch, tokens, hidden]: the causal mask (of the attention implementation set now), the
    rotary position embeddings and the positions."""
    decoder = model.model
    return {
        "attention_mask": compat.causal_mask(decoder.config, hidden, attention_mask, position_ids),
        "position_embeddings": decoder.rotary_emb(hidden, position_ids=position_ids),
        "position_ids": position_ids,
    }


def run_layer(model: Any, index: int, hidden: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """Decoder layer ``index`` on ``hidden``, with the keywords of :func:`layer_inputs`."""
    out = model.model.layers[index](hidden, **inputs)
    return out[0] if isinstance(out, tuple) else out
