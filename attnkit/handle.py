"""Attach methods to a loaded model and take them off again.

``apply(model, recipe)`` installs each method's hooks in recipe order, routes the model's attention
through attnkit's function where a method acts inside attention (an empty recipe, or head outputs
alone, leave the model its own function), and returns a :class:`Handle`. ``handle.remove()`` (or
leaving the ``with`` block) restores the attention implementation and removes every hook, leaving
no state.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from attnkit import compat
from attnkit.engine import attention
from attnkit.engine.attach import Attachment, set_text_attention
from attnkit.engine.calls import CallTracker
from attnkit.engine.plan import PLANS, ApplyError, ModelPlan, check_plan, routes, touched_layers
from attnkit.engine.state import CallState
from attnkit.heads import ModelShape, text_config
from attnkit.methods import Method, get_method
from attnkit.recipe import Recipe, load_recipe
from attnkit.recipe.methods import MethodConfig

ATTACHED: weakref.WeakSet[Method] = weakref.WeakSet()
"""Method objects applied through an active handle: one object serves one handle at a time."""

HANDLES: dict[int, Handle] = {}
"""id(text config) -> the active handle on that model."""


def active_handle(model: torch.nn.Module) -> Handle | None:
    """The handle applied to ``model``, if any."""
    return HANDLES.get(id(text_config(model.config)))


def hook_count(at: Attachment) -> int:
    """Hooks and per-call functions an attachment holds (compare two counts to see what an attach added)."""
    return len(at.hooks) + len(at.begin_call_fns) + len(at.post_prefill_fns)


def as_methods(spec: Any) -> list[Method]:
    """Methods from a Recipe, a list of configs or Method objects, a single Method, or None."""
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
        self.routed = False
        """Whether the model's attention runs through attnkit's function (see :func:`routes`)."""
        self._labels = unique_labels(methods)
        self.active = True
        self.tracker: CallTracker | None = None
        self.unreplayable: list[str] = []
        """Labels of the methods whose decode-time work a captured decode step cannot replay."""

    def label(self, method: Method) -> str:
        """``method``'s label in :meth:`stats`."""
        return self._labels[self.methods.index(method)]

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

    @contextmanager
    def routing(self) -> Iterator[None]:
        """Route the model's attention through attnkit's function for what runs inside, where the
        methods alone leave it unrouted: a captured decode step reads its fixed-capacity cache there.
        Inside another ``routing()`` it leaves the routing to that one."""
        if self.routed or compat.attn_implementation(text_config(self.model.config)).startswith(attention.NAME):
            yield
            return
        set_text_attention(self.model, attention.register(self._original))
        try:
            yield
        finally:
            set_text_attention(self.model, self._original)

    def remove(self) -> None:
        """Restore the model exactly: attention implementation, hooks, plan. Safe to call twice."""
        if not self.active:
            return
        for hook in self._attachment.hooks:
            hook.remove()
        for method in self.methods:
            ATTACHED.discard(method)
        config = text_config(self.model.config)
        PLANS.pop(id(config), None)
        if HANDLES.get(id(config)) is self:
            del HANDLES[id(config)]
        set_text_attention(self.model, self._original)
        self.active = False

    def __enter__(self) -> Handle:
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


def apply(model: torch.nn.Module, recipe: Any = None, *, allow_foreign_heads: bool = False) -> Handle:
    """Apply a recipe (a Recipe, a YAML path, a dict) or methods to ``model``; returns a handle that
    removes them again.

    Nothing is half-applied: if any method fails to attach, everything attached so far is removed
    and the error is raised.
    """
    if isinstance(recipe, (str, Path, dict)):
        recipe = load_recipe(recipe)
    if isinstance(recipe, Recipe):
        allow_foreign_heads = allow_foreign_heads or recipe.allow_foreign_heads
    methods = as_methods(recipe)
    check_methods_free(methods)
    config = text_config(model.config)
    if id(config) in PLANS:
        raise RuntimeError(
            "attnkit is already applied to this model; remove that handle first, or put all methods in one recipe"
        )
    original = compat.attn_implementation(config)
    if original.startswith(attention.NAME):
        raise RuntimeError(f"model attention is {original!r}, left by an attnkit handle that was never removed")
    plan = ModelPlan(original, attention.backend_function(original), attention.mask_function(original))
    at = Attachment(model, plan, ModelShape.from_config(model.config), allow_foreign_heads)
    PLANS[id(config)] = plan
    handle = Handle(model, methods, at, original)
    try:
        touched = []
        for method in methods:
            ATTACHED.add(method)
            method.stats.reset()  # totals count from this apply
            before, hooks = touched_layers(plan), hook_count(at)
            method.attach(at)
            touched.append({i for i, n in touched_layers(plan).items() if n != before.get(i, 0)})
            if (touched[-1] or hook_count(at) != hooks) and not method.replayable:
                handle.unreplayable.append(handle.label(method))
        check_stacking(methods, touched)
        check_plan(plan)
        handle.tracker = CallTracker(plan, [m.stats for m in methods], at)
        at.hooks.extend(handle.tracker.hooks(model))
        if routes(plan):
            set_text_attention(model, attention.register(original))
            handle.routed = True
        HANDLES[id(config)] = handle
    except BaseException:
        handle.remove()
        raise
    return handle


def check_stacking(methods: list[Method], touched: list[set[int]]) -> None:
    """Refuse two instances of a method that cannot share a layer (``Method.one_per_layer``) on one layer."""
    for j, method in enumerate(methods):
        for i, other in enumerate(methods[:j]):
            shared = touched[i] & touched[j]
            if method.one_per_layer and type(other) is type(method) and shared:
                raise ApplyError(
                    f"methods[{i}] and methods[{j}] are both `{method.name}` and both edit layer {min(shared)}"
                    f"{f' (and {len(shared) - 1} more)' if len(shared) > 1 else ''}: {method.one_per_layer}; "
                    "put their heads in one entry, or give the entries layers that do not overlap"
                )


def check_methods_free(methods: list[Method]) -> None:
    """One method object serves one handle at a time, once: its stats count that handle's calls."""
    for i, method in enumerate(methods):
        if method in ATTACHED or any(method is other for other in methods[:i]):
            raise RuntimeError(
                f"this {type(method).__name__} object is already applied (by another active handle, or twice in "
                "this list); remove that handle first, or make a new method object for each use"
            )
