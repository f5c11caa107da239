"""Attach methods to a loaded model and take them off again.

``apply(model, recipe)`` routes the model's attention through attnkit's function, installs each
method's hooks in recipe order and returns a :class:`Handle`. ``handle.remove()`` (or leaving the
``with`` block) restores the attention implementation and removes every hook, leaving no state.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import torch

from transformers import DynamicCache

from attnkit import attention, compat
from attnkit.attention import AttentionCall, LayerPlan, ModelPlan, OutputEdit, ScoreEdit
from attnkit.heads import HeadSet, HeadSetSpec, ModelShape, resolve_heads, text_config
from attnkit.methods.base import Method, MethodConfig

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


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The language model's self-attention modules by layer index."""
    config = text_config(model.config)
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if getattr(module, "config", None) is config and hasattr(module, "o_proj") and hasattr(module, "layer_idx"):
            found[module.layer_idx] = module
    if len(found) != config.num_hidden_layers:
        raise TypeError(
            f"{type(model).__name__}: found {len(found)} attention modules with o_proj and layer_idx, "
            f"expected {config.num_hidden_layers}; this architecture is not supported by attnkit yet"
        )
    return found


class Attachment:
    """What a method sees while attaching: the model's shape and the stage registration points."""

    def __init__(self, model: torch.nn.Module, plan: ModelPlan, shape: ModelShape, allow_foreign_heads: bool):
        self.model = model
        self.plan = plan
        self.shape = shape
        self.modules = attention_modules(model)
        self.allow_foreign_heads = allow_foreign_heads
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.post_prefill_fns: list[Callable[[Any, CallState], None]] = []
        self.begin_call_fns: list[Callable[[CallState], None]] = []

    def heads(self, spec: HeadSetSpec, level: Literal["query", "kv"] = "query") -> HeadSet:
        """Resolve and validate a head set against this model."""
        return resolve_heads(spec, self.shape, level=level, allow_foreign=self.allow_foreign_heads)

    def _layer(self, layer: int) -> LayerPlan:
        return self.plan.layers.setdefault(layer, LayerPlan())

    def head_output(self, layer: int, fn: Callable[[torch.Tensor, CallState], torch.Tensor]) -> None:
        """Edit the per-head outputs [batch, seq, heads * head_dim] before the output projection."""
        plan = self.plan

        def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (fn(args[0], plan.state), *args[1:])

        self.hooks.append(self.modules[layer].o_proj.register_forward_pre_hook(pre_hook))

    def score_edit(self, layer: int, fn: ScoreEdit) -> None:
        """Edit the masked attention logits [batch, heads, queries, keys] before the softmax."""
        self._layer(layer).score_edits.append(fn)

    def prob_edit(self, layer: int, fn: ScoreEdit) -> None:
        """Edit the attention probabilities after the softmax (keep rows summing to 1)."""
        self._layer(layer).prob_edits.append(fn)

    def output_edit(self, layer: int, fn: OutputEdit) -> None:
        """Correct the backend kernel's output [batch, queries, heads, head_dim] exactly, without
        materialising the attention matrix (e.g. a probability edit on a few key columns)."""
        self._layer(layer).output_edits.append(fn)

    def decode_step(self, layer: int, fn: Callable[[AttentionCall], AttentionCall]) -> None:
        """Change what a decode step reads (keys, values, mask) before the kernel runs."""
        self._layer(layer).decode_steps.append(fn)

    def post_prefill(self, fn: Callable[[Any, CallState], None]) -> None:
        """Called after a prefill call with the model's cache (per layer keys/values, KV heads)."""
        self.post_prefill_fns.append(fn)

    def compress_kv(self, layer: int, fn: Callable[[AttentionCall, Any], Any]) -> None:
        """After ``layer``'s prefill attention, replace its cache layer by ``fn(call, cache_layer)``
        (a :class:`attnkit.kvcache.CompressedLayer`, or None to keep it). One compressor per layer."""
        plan = self._layer(layer)
        if plan.compressor is not None:
            raise ValueError(f"layer {layer} already has a KV-compression method; use one KV method per layer")
        plan.compressor = fn

    def owns(self) -> Callable[[], bool]:
        """A check that this attachment's handle is still active (compressed caches need it)."""
        config, plan = text_config(self.model.config), self.plan
        return lambda: attention.PLANS.get(id(config)) is plan

    def begin_call(self, fn: Callable[[CallState], None]) -> None:
        """Called at the start of every forward call with its fresh state."""
        self.begin_call_fns.append(fn)


ATTACHED: "weakref.WeakSet[Method]" = weakref.WeakSet()
"""Method objects applied through an active handle: one object serves one handle at a time."""


def as_methods(spec: Any) -> list[Method]:
    """Methods from a Recipe, a list of configs or Method objects, a single Method, or None."""
    from attnkit.recipe import Recipe
    from attnkit.registry import get_method

    if spec is None:
        return []
    if isinstance(spec, Recipe):
        spec = spec.methods
    if isinstance(spec, (Method, MethodConfig)):
        spec = [spec]
    methods = []
    for item in spec:
        if isinstance(item, Method):
            methods.append(item)
        elif isinstance(item, MethodConfig):
            methods.append(get_method(item.method)(item))
        else:
            raise TypeError(f"cannot apply {item!r}: pass a Recipe, Method objects or method configs")
    return methods


class Handle:
    """The methods applied to one model. A context manager; ``remove()`` undoes everything."""

    def __init__(self, model: torch.nn.Module, methods: list[Method], attachment: Attachment, original: str):
        self.model = model
        self.methods = methods
        self._attachment = attachment
        self._original = original
        self._labels = unique_labels(methods)
        self.active = True
        self.tracker: CallTracker | None = None

    def stats(self, total: bool = False) -> dict[str, dict[str, Any]]:
        """What each method did on the last forward call (``total=True``: summed since apply)."""
        return {label: m.stats.snapshot(total) for label, m in zip(self._labels, self.methods)}

    @contextmanager
    def call(self, attention_mask: torch.Tensor | None, query_length: int) -> Iterator[CallState]:
        """Treat what runs inside as one prefill call, for code that drives some layers itself
        (a profiler running only the layers after the one it changes)."""
        state = self.tracker.begin(query_length, attention_mask)
        try:
            yield state
        finally:
            self.tracker.end()

    def remove(self) -> None:
        """Restore the model exactly: attention implementation, hooks, plan. Safe to call twice."""
        if not self.active:
            return
        for hook in self._attachment.hooks:
            hook.remove()
        for method in self.methods:
            ATTACHED.discard(method)
        config = text_config(self.model.config)
        attention.PLANS.pop(id(config), None)
        set_text_attention(self.model, self._original)
        self.active = False

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        body = ", ".join(repr(m) for m in self.methods) or "no methods"
        return f"<attnkit.Handle {state} on {type(self.model).__name__}: {body}>"


def unique_labels(methods: Iterable[Method]) -> list[str]:
    """``head_mask``, ``head_mask#2``... so two instances of one method keep separate stats."""
    seen: dict[str, int] = {}
    labels = []
    for method in methods:
        seen[method.label] = seen.get(method.label, 0) + 1
        labels.append(method.label if seen[method.label] == 1 else f"{method.label}#{seen[method.label]}")
    return labels


def set_text_attention(model: torch.nn.Module, name: str) -> None:
    """Set the language model's attention implementation (the vision tower keeps its own)."""
    compat.set_attn_implementation(model, text_config(model.config), name)


def apply(model: torch.nn.Module, recipe: Any = None, *, allow_foreign_heads: bool = False) -> Handle:
    """Apply a recipe (or methods) to ``model``; returns a handle that removes them again.

    Nothing is half-applied: if any method fails to attach, everything attached so far is removed
    and the error is raised.
    """
    methods = as_methods(recipe)
    check_methods_free(methods)
    config = text_config(model.config)
    if id(config) in attention.PLANS:
        raise RuntimeError(
            "attnkit is already applied to this model; remove that handle first, "
            "or put all methods in one recipe"
        )
    original = compat.attn_implementation(config)
    if original.startswith(attention.NAME):
        raise RuntimeError(f"model attention is {original!r}, left by an attnkit handle that was never removed")
    plan = ModelPlan(original, attention.backend_function(original), attention.mask_function(original))
    at = Attachment(model, plan, ModelShape.from_config(model.config), allow_foreign_heads)
    attention.PLANS[id(config)] = plan
    handle = Handle(model, methods, at, original)
    try:
        for method in methods:
            ATTACHED.add(method)
            method.stats.reset()  # totals count from this apply
            method.attach(at)
        check_plan(plan)
        handle.tracker = CallTracker(plan, methods, at)
        at.hooks.extend(handle.tracker.hooks(model))
        set_text_attention(model, attention.register(original))
    except BaseException:
        handle.remove()
        raise
    return handle


def check_methods_free(methods: list[Method]) -> None:
    """One method object serves one handle at a time, once: its stats count that handle's calls."""
    for i, method in enumerate(methods):
        if method in ATTACHED or any(method is other for other in methods[:i]):
            raise RuntimeError(
                f"this {type(method).__name__} object is already applied (by another active handle, or twice in "
                "this list); remove that handle first, or make a new method object for each use"
            )


def check_plan(plan: ModelPlan) -> None:
    """Refuse combinations the engine cannot run exactly (named, with the fix)."""
    for index, layer in sorted(plan.layers.items()):
        if layer.compressor is None:
            continue
        if "flash" in plan.backend_name:
            raise ValueError(
                f"KV compression reads per-head masks, which {plan.backend_name} cannot take; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        if layer.needs_eager or layer.decode_steps or layer.output_edits:
            raise ValueError(
                f"layer {index}: a KV-compression method and an attention-score/probability edit (ACT, VAR) "
                "act on the same layer; this combination is not supported yet, restrict one method's heads "
                "or layers so they do not overlap"
            )


class CallTracker:
    """Starts and ends forward calls: a fresh state each, sequence space tied to the cache."""

    def __init__(self, plan: ModelPlan, methods: list[Method], at: Attachment):
        self.plan, self.methods, self.at = plan, methods, at
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
        for method in self.methods:
            method.stats.begin_call(phase)
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
