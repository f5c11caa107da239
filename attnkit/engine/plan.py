"""Plans: which stage hooks each layer of a patched model runs, and what one attention call sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from attnkit import kernels
from attnkit.engine.state import CallState
from attnkit.errors import UserError
from attnkit.primitives import logits, rotate

if TYPE_CHECKING:
    from attnkit.engine.positions import PositionStage

ScoreEdit = Callable[[torch.Tensor, "AttentionCall"], torch.Tensor]
"""(scores or probabilities [batch, heads, queries, keys], call) -> edited tensor of the same shape."""

OutputEdit = Callable[["AttentionCall", torch.Tensor], torch.Tensor]
"""(call, attention output [batch, queries, heads, head_dim]) -> corrected output of the same shape."""


@dataclass
class AttentionCall:
    """What a stage hook sees of one attention call: the layer, its inputs, and the forward call."""

    module: torch.nn.Module
    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    """Additive float mask [batch, 1, queries, keys] (0 = attend, -inf = masked) or None.
    Only built on layers that run eager edits or decode steps; see ``raw_mask`` otherwise."""
    state: CallState | None
    """The forward call's state (phase, padding, scratch space); None outside a tracked call."""
    raw_mask: torch.Tensor | None = None
    """The mask exactly as the backend received it (None, boolean keep-mask, or additive)."""
    scaling: float = 1.0
    softcap: float | None = None
    carried: tuple[torch.Tensor, torch.Tensor] | None = None
    """(cos, sin) [batch, keys, rotary dims]: the rotation every key carries (the call's queries are
    the last keys), set by the positions stage before its hook runs."""
    inverse: tuple[torch.Tensor, torch.Tensor] | None = None
    """(cos, sin) [batch, 1, keys, rotary dims] in the compute dtype that undo ``carried``
    (:func:`attnkit.primitives.unrotation`), made once per call and rotary by the positions stage."""
    rotate_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """(x [batch, heads, n, dim], positions [batch, 1 or heads, n]) -> x rotated there with the
    layer's own rotary: set by the positions stage for its hook."""
    columns: torch.Tensor | None = None
    """The cache columns a decode-step read chose for this layer [batch, KV heads or query heads, n]
    (-1: none), which the decode kernel gathers as it reads: on a captured step (``state.graph``),
    and on an eager one where :func:`attnkit.engine.attention.reads_columns` says so."""
    lse: torch.Tensor | None = None
    """On a captured decode step with output corrections: the kernel's log-sum-exp of each query
    head's logits [batch, heads] (float32), for corrections that need the softmax's normaliser."""
    raw: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """The un-rotated query and key, made on first use."""

    def unrotated_query(self, narrow: bool = False) -> torch.Tensor:
        """The query with the rotation it carries undone [batch, heads, queries, dim], at least float32;
        ``narrow``: in the query's own dtype (what kernels that rotate it again read: half the bytes of
        a bf16 model's float32 copy, read once per block of keys)."""
        return self._unrotated("query", self.query, -self.query.shape[-2], narrow)

    def unrotated_key(self, narrow: bool = False) -> torch.Tensor:
        """The keys with the rotation they carry undone [batch, kv heads, keys, dim], at least float32;
        ``narrow``: in the keys' own dtype."""
        return self._unrotated("key", self.key, 0, narrow)

    def _unrotated(self, name: str, x: torch.Tensor, start: int, narrow: bool) -> torch.Tensor:
        """``x`` (the call's query or keys, from token ``start`` of the carried rotation) un-rotated,
        made once; narrow on CUDA in one pass without the float32 copy."""
        key = f"narrow {name}" if narrow else name
        if key not in self.raw:
            cos, sin = self._inverse(start)
            if not narrow:
                self.raw[key] = rotate(x.to(cos.dtype), cos, sin)
            elif name not in self.raw and fused_rotation(x, cos):
                self.raw[key] = kernels.rotate(x, cos, sin, x.dtype)
            else:
                self.raw[key] = self._unrotated(name, x, start, False).to(x.dtype)
        return self.raw[key]

    def _inverse(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inverse is None:
            raise RuntimeError("the un-rotated query and key exist inside a positions hook only")
        return self.inverse[0][:, :, start:], self.inverse[1][:, :, start:]

    def logits(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Attention logits (at least float32) as this layer computes them (scale, softcap), unmasked."""
        return logits(query, key, self.scaling, self.softcap)


@dataclass
class LayerPlan:
    """The stage hooks of one layer, in recipe order."""

    score_edits: list[ScoreEdit] = field(default_factory=list)
    prob_edits: list[ScoreEdit] = field(default_factory=list)
    decode_steps: list[Callable[[AttentionCall], AttentionCall]] = field(default_factory=list)
    decode_gathers: bool = False
    """A decode step may replace the keys by a gathered subset (``Attachment.decode_step(gathers=True)``)."""
    output_edits: list[OutputEdit] = field(default_factory=list)
    compressor: Callable[[AttentionCall, Any], Any] | None = None
    """After this layer's prefill attention: (call, its cache layer) -> a compressed layer or None."""
    positions: PositionStage | None = None
    """Where this layer's queries and keys are rotated (:mod:`.positions`), or None to leave them."""

    @property
    def needs_eager(self) -> bool:
        return bool(self.score_edits or self.prob_edits)


@dataclass
class ModelPlan:
    """Everything the attention and mask functions need to know about one patched model."""

    backend_name: str
    backend: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None
    mask_fn: Callable[..., Any]
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    state: CallState | None = None
    calls: int = 0


class ApplyError(UserError, ValueError):
    """Methods that cannot be applied together, or not to this model; the message names the fix."""


def routes(plan: ModelPlan) -> bool:
    """Whether the model's attention must run through attnkit's function: some method acts inside
    attention on some layer. Methods that only hook modules around it (head outputs, layer inputs)
    leave the model its own function, call for call."""
    return bool(plan.layers)


def touched_layers(plan: ModelPlan) -> dict[int, int]:
    """How many stage hooks each layer of ``plan`` holds (compare two counts to see what an attach added)."""
    return {
        index: len(layer.score_edits) + len(layer.prob_edits) + len(layer.decode_steps) + len(layer.output_edits)
        + (layer.compressor is not None) + (layer.positions is not None)
        for index, layer in plan.layers.items()
    }  # fmt: skip


PLANS: dict[int, ModelPlan] = {}
"""id(text config) -> plan of the model whose attention is routed through attnkit."""


def plan_for(config: Any) -> ModelPlan:
    plan = PLANS.get(id(config))
    if plan is None:
        raise RuntimeError(
            "this model's attention is set to attnkit but no attnkit handle is active on it; "
            "use attnkit.apply(model, recipe), or set the model's attn_implementation back to sdpa"
        )
    return plan


def check_plan(plan: ModelPlan) -> None:
    """Refuse combinations the engine cannot run exactly (named, with the fix)."""
    for index, layer in sorted(plan.layers.items()):
        if layer.positions is not None:
            check_positions(index, layer, plan.backend_name)
        if layer.decode_gathers:
            check_gathers(index, layer, plan.backend_name)
        if layer.compressor is None:
            continue
        if "flash" in plan.backend_name:
            raise ApplyError(
                f"KV compression reads per-head masks, which {plan.backend_name} cannot take; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        if layer.needs_eager or layer.decode_steps or layer.output_edits:
            raise ApplyError(
                f"layer {index}: a KV-compression method and an attention-score/probability edit (ACT, VAR) "
                "act on the same layer; this combination is not supported yet, restrict one method's heads "
                "or layers so they do not overlap"
            )


def check_positions(index: int, layer: LayerPlan, backend_name: str) -> None:
    """A positions stage computes the layer's logits itself from re-rotated queries and keys: it
    needs 4-D masks, and a stage that reads or corrects the backend's own attention on that layer
    (KV compression, decode-step reads, ACT's fast output correction) would see the wrong one."""
    if "flash" in backend_name:
        raise ApplyError(
            f"the positions stage reads 4-D masks, which {backend_name} cannot give; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    if layer.compressor is not None or layer.decode_steps or layer.output_edits:
        raise ApplyError(
            f"layer {index}: a positions method (re-positioning queries and keys) and a KV-compression, decode-step "
            "or output-correction method (ACT's fast path; use path='eager') act on the same layer; this combination "
            "is not supported, restrict one method's layers so they do not overlap"
        )


def check_gathers(index: int, layer: LayerPlan, backend_name: str) -> None:
    """A decode step that gathers keys reads a subset of the full cache: a compressed cache no longer
    holds what it selects from, and score/probability edits and output corrections index the cache's
    columns, which the gathered keys no longer are. Its per-head masks need a 4-D mask backend."""
    if layer.compressor is not None:
        raise ApplyError(
            f"layer {index}: a sparse-decoding method (tidaldecode) selects from the full KV cache, which a "
            "KV-compression method (snapkv, razor, streaming) on the same layer no longer keeps; this combination "
            "is not supported, use one of them"
        )
    if layer.needs_eager or layer.output_edits:
        raise ApplyError(
            f"layer {index}: a sparse-decoding method (tidaldecode) gathers a subset of the cached keys, and an "
            "attention-score/probability edit or output correction (ACT, VAR) on the same layer indexes the cache's "
            "columns; this combination is not supported, restrict one method's layers so they do not overlap"
        )
    if "flash" in backend_name:
        raise ApplyError(
            f"sparse decoding reads per-head masks, which {backend_name} cannot take; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )


def fused_rotation(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`attnkit.kernels.rotate` rotates ``x`` by a table like ``cos`` (every dim rotary)."""
    return kernels.available(x) and cos.shape[-1] == x.shape[-1] and x.shape[-1] in kernels.HEAD_DIMS
