"""The call tracker: begins and ends every forward call of a patched model."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import DynamicCache

from attnkit import compat
from attnkit.engine.attach import Attachment
from attnkit.engine.graphs import GraphCache
from attnkit.engine.plan import ModelPlan
from attnkit.engine.state import CallState, Phase, append_tokens
from attnkit.heads import text_config
from attnkit.stats import Stats


class CallTracker:
    """Starts and ends forward calls: a fresh state each, sequence space tied to the cache."""

    def __init__(self, plan: ModelPlan, stats: list[Stats], at: Attachment):
        self.plan, self.stats, self.at = plan, stats, at
        self.sequences: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self.verified: set[Phase] = set()
        self.keyword = compat.cache_keyword(at.model)
        self.keeps_positions = any(layer.positions is not None for layer in plan.layers.values())
        """Whether a positions stage reads the call's positions and those of cached keys (made and
        kept only then: a decode step of a model without one should not pay for them)."""

    def begin(
        self,
        query_length: int,
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        inputs: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CallState:
        """Begin a call of ``query_length`` tokens: ``inputs`` are its ids or embeddings,
        ``position_ids`` the forward's own where it was given them."""
        past = cache.get_seq_length() if cache is not None else 0
        phase: Phase = "prefill" if past == 0 else ("decode" if query_length == 1 else "extend")
        ids = inputs if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() else None
        positions = None
        if self.keeps_positions:
            like = inputs if inputs is not None else attention_mask
            positions = call_positions(position_ids, past, query_length, like)
        state = CallState(phase, past, query_length, attention_mask, ids, positions, cache=cache)
        if phase == "decode" and isinstance(cache, GraphCache):
            state.graph = cache
        if cache is not None:
            if phase == "prefill" or cache not in self.sequences:
                self.sequences[cache] = {}
            state.sequence = self.sequences[cache]
        if positions is not None and state.graph is None:  # a captured step reads none
            state.sequence["positions"] = append_tokens(state.key_positions, positions, past)
        self.plan.state = state
        self.plan.calls += 1
        for stats in self.stats:
            stats.begin_call(phase)
        for fn in self.at.begin_call_fns:
            fn(state)
        return state

    def check(self, returned: Any) -> None:
        """Raise at once if the phase attnkit took this call for disagrees with the cache the model
        returned: a renamed cache keyword or a cache transformers ignored would otherwise make every
        call look like a prefill, and decode-time methods would act wrongly without a sign.

        A blind engine takes every call for a prefill, so every prefill is checked; a decode or
        extend step only until one agreed (the names do not change within a run, and a decode step
        should not pay for the check).
        """
        state = self.plan.state
        if returned is None or state is None or state.phase in self.verified:
            return
        if state.cache is not None and returned is not state.cache:
            raise compat.TransformersChanged(
                f"the model returned another KV cache than the one attnkit read from the call; this model takes "
                f"its cache as {self.keyword!r}: pass it under that name"
            )
        held = returned.get_seq_length()
        if held != state.total_length:
            raise compat.TransformersChanged(
                f"attnkit took this {state.query_length}-token call for a {state.phase} after {state.past_length} "
                f"cached tokens, but the cache the model returned holds {held}: attnkit did not see the call's cache"
            )
        if state.phase != "prefill":
            self.verified.add(state.phase)

    def end(self, cache: Any = None) -> None:
        """End the call; ``cache`` is the one the model returned. A cache the model made itself
        takes on the call's sequence space, so a next call given that cache continues it."""
        state = self.plan.state
        if state is not None and cache is not None:
            if state.cache is None:
                self.sequences[cache] = state.sequence
            if state.phase == "prefill":
                for fn in self.at.post_prefill_fns:
                    fn(cache, state)
        self.plan.state = None

    def share(self, cache: Any, copy: Any) -> None:
        """``copy`` continues ``cache``'s sequence (a copy of it made for captured decoding): what
        the prefill found stays there for the decode steps."""
        self.sequences[copy] = self.sequences.setdefault(cache, {})

    @staticmethod
    def wants_cache(model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
        use_cache = kwargs.get("use_cache")
        return bool(use_cache if use_cache is not None else getattr(text_config(model.config), "use_cache", False))

    def hooks(self, model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Model-level hooks that begin and end a call around every forward pass."""

        compresses = any(layer.compressor is not None for layer in self.plan.layers.values())

        def before(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            ids = kwargs.get("input_ids", args[0] if args else None)
            inputs = ids if ids is not None else kwargs.get("inputs_embeds")
            query_length = inputs.shape[1]
            cache = compat.call_cache(kwargs)
            if compresses and cache is None and self.wants_cache(model, kwargs):
                # The model would make its cache inside; KV methods need to see it, so make it here.
                for name in compat.CACHE_KEYWORDS:
                    kwargs.pop(name, None)
                cache = kwargs[self.keyword] = DynamicCache(config=text_config(model.config))
            self.begin(query_length, kwargs.get("attention_mask"), cache, inputs, kwargs.get("position_ids"))
            return args, kwargs

        def after(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            cache = compat.output_cache(output)
            self.check(cache)
            self.end(cache)

        # host-side bookkeeping: where torch.compile compiles the model, these run as they are
        # (traced, their Python state would become guards that fail at every call)
        return [
            model.register_forward_pre_hook(torch.compiler.disable(before), with_kwargs=True),
            model.register_forward_hook(torch.compiler.disable(after), with_kwargs=True),
        ]


def call_positions(
    position_ids: torch.Tensor | None, past: int, query_length: int, like: torch.Tensor | None
) -> torch.Tensor | None:
    """The positions a call's tokens are rotated at, [batch, query] with the batch of ``like`` (the
    call's inputs or padding mask): the forward's ``position_ids`` where given, else the decoder's
    default ``past + arange(query_length)``. None for position ids of another shape (multimodal
    rope's [3, batch, query]), which are not one position per token."""
    batch, device = (like.shape[0], like.device) if like is not None else (1, None)
    if position_ids is None:
        position_ids = torch.arange(past, past + query_length, device=device)
    elif position_ids.dim() > 2:
        return None
    return position_ids.expand(batch, query_length)
