"""Attachment points: where a method registers its stage hooks on one model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from attnkit import compat
from attnkit.engine.plan import (
    PLANS,
    AttentionCall,
    LayerPlan,
    ModelPlan,
    OutputEdit,
    ScoreEdit,
)
from attnkit.engine.positions import PositionsFn, position_stage
from attnkit.engine.state import CallState
from attnkit.heads import HeadSet, HeadSetSpec, ModelShape, resolve_heads, text_config


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


def decoder_layers(model: torch.nn.Module, attention: dict[int, torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """The decoder layer holding each attention module (its direct parent), by layer index."""
    parents: dict[int, torch.nn.Module] = {}
    wanted = {id(module): layer for layer, module in attention.items()}
    for module in model.modules():
        for child in module.children():
            if id(child) in wanted:
                parents[wanted[id(child)]] = module
    missing = sorted(set(attention) - set(parents))
    if missing:
        raise TypeError(f"no decoder layer found around the attention modules of layers {missing}")
    return parents


def set_text_attention(model: torch.nn.Module, name: str) -> None:
    """Set the language model's attention implementation (the vision tower keeps its own)."""
    compat.set_attn_implementation(model, text_config(model.config), name)


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
        self._decoder_layers: dict[int, torch.nn.Module] | None = None

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

        # methods' hooks keep Python state (stats, caches): torch.compile leaves them out of its graphs
        self.hooks.append(self.modules[layer].o_proj.register_forward_pre_hook(torch.compiler.disable(pre_hook)))

    def layer_input(self, layer: int, fn: Callable[[torch.Tensor, CallState | None], None]) -> None:
        """Read the decoder layer's input hidden state [batch, seq, hidden] (the residual stream before
        the layer's norm) on every call; ``fn`` observes, it does not change the input."""
        plan, module = self.plan, self._decoder_layer(layer)

        def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(kwargs.get("hidden_states", args[0] if args else None), plan.state)

        self.hooks.append(module.register_forward_pre_hook(torch.compiler.disable(pre_hook), with_kwargs=True))

    def _decoder_layer(self, layer: int) -> torch.nn.Module:
        if self._decoder_layers is None:
            self._decoder_layers = decoder_layers(self.model, self.modules)
        return self._decoder_layers[layer]

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

    def decode_step(self, layer: int, fn: Callable[[AttentionCall], AttentionCall], gathers: bool = False) -> None:
        """Change what a decode step reads (keys, values, mask) before the kernel runs.

        ``gathers``: ``fn`` may hand back a subset of the cached keys (their columns are then no longer
        the cache's), which stages that index cache columns cannot follow: ``check_plan`` refuses
        score or probability edits and output corrections on that layer. The keys may then hold one
        head per query head (a selection per query head); the engine attends those itself, since a
        backend expands KV heads by the module's group count.
        """
        plan = self._layer(layer)
        plan.decode_steps.append(fn)
        plan.decode_gathers = plan.decode_gathers or gathers

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
        return lambda: PLANS.get(id(config)) is plan

    def begin_call(self, fn: Callable[[CallState], None]) -> None:
        """Called at the start of every forward call with its fresh state."""
        self.begin_call_fns.append(fn)

    def positions(self, layer: int, fn: PositionsFn) -> None:
        """Say where ``layer``'s queries and keys are rotated: ``fn(call)`` returns a
        :class:`~attnkit.engine.positions.Repositioning` (query groups, each with its rows, query
        positions and key positions) or None to leave the call alone; the engine re-rotates them
        with the model's own rotary. Refused for a layer without RoPE. One positions hook per layer."""
        plan = self._layer(layer)
        if plan.positions is not None:
            raise ValueError(f"layer {layer} already has a positions method; use one positions method per layer")
        plan.positions = position_stage(self.model, self.modules[layer], fn, self.shape.head_dim)
