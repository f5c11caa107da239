"""The call tracker: begins and ends every forward call of a patched model."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import DynamicCache

from attnkit import compat
from attnkit.engine.attach import Attachment
from attnkit.engine.plan import ModelPlan
from attnkit.engine.state import CallState, Phase
from attnkit.heads import text_config
from attnkit.stats import Stats


class CallTracker:
    """Starts and ends forward calls: a fresh state each, sequence space tied to the cache."""

    def __init__(self, plan: ModelPlan, stats: list[Stats], at: Attachment):
        self.plan, self.stats, self.at = plan, stats, at
        self.sequences: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self.verified: set[Phase] = set()
        self.keyword = compat.cache_keyword(at.model)

    def begin(
        self, query_length: int, attention_mask: torch.Tensor | None, cache: Any = None, input_ids: Any = None
    ) -> CallState:
        past = cache.get_seq_length() if cache is not None else 0
        phase: Phase = "prefill" if past == 0 else ("decode" if query_length == 1 else "extend")
        ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        state = CallState(phase, past, query_length, attention_mask, ids, cache=cache)
        if cache is not None:
            if phase == "prefill" or cache not in self.sequences:
                self.sequences[cache] = {}
            state.sequence = self.sequences[cache]
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
        state = self.plan.state
        if state is not None and state.phase == "prefill" and cache is not None:
            for fn in self.at.post_prefill_fns:
                fn(cache, state)
        self.plan.state = None

    @staticmethod
    def wants_cache(model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
        use_cache = kwargs.get("use_cache")
        return bool(use_cache if use_cache is not None else getattr(text_config(model.config), "use_cache", False))

    def hooks(self, model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Model-level hooks that begin and end a call around every forward pass."""

        compresses = any(layer.compressor is not None for layer in self.plan.layers.values())

        def before(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            ids = kwargs.get("input_ids", args[0] if args else None)
            query_length = (ids if ids is not None else kwargs.get("inputs_embeds")).shape[1]
            cache = compat.call_cache(kwargs)
            if compresses and cache is None and self.wants_cache(model, kwargs):
                # The model would make its cache inside; KV methods need to see it, so make it here.
                for name in compat.CACHE_KEYWORDS:
                    kwargs.pop(name, None)
                cache = kwargs[self.keyword] = DynamicCache(config=text_config(model.config))
            self.begin(query_length, kwargs.get("attention_mask"), cache, ids)
            return args, kwargs

        def after(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            cache = compat.output_cache(output)
            self.check(cache)
            self.end(cache)

        return [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]
