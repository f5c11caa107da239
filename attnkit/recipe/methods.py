"""Every method's parameters: one typed config per method, field defaults the paper's defaults.

The configs live apart from the methods so that reading a recipe, ``attnkit list`` and every
``--help`` need neither torch nor transformers. A config names its method in ``method``; the
method class (``attnkit.methods``) names its config in ``config_class``, and the contract test
checks that the two registries match.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from attnkit.heads import (
    HeadArtifact,
    HeadSetError,
    HeadSetSpec,
    ModelShape,
    load_artifact,
)


class MethodConfig(BaseModel):
    """A method's parameters; field defaults are the paper's published defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    method: str
    needs_masks: ClassVar[str | None] = None
    """The stage that reads per-head (4-D) masks, which flash backends cannot take; None: runs on any backend.
    Lets ``validate`` refuse the clash before the weights load (the engine refuses it again when applied)."""


class ACTConfig(MethodConfig):
    """ACT: calibrates hidden attention sinks in selected heads.

    Defaults from the reference code (beta 0.4, threshold 0.1, layers 2 to L-2).
    """

    method: str = "act"
    beta: float = Field(0.4, ge=0.0, le=1.0, description="factor kept on sink columns; 1 = identity")
    threshold: float = Field(0.1, gt=0.0, lt=1.0, description="sink if column mean > threshold")
    alpha: float | None = Field(None, gt=0.0, description="paper form: sink if column mean > alpha / N")
    heads: HeadSetSpec | None = Field(None, description="heads to calibrate; default all heads of layers 2 to L-2")
    path: Literal["fast", "eager"] = Field("fast", description="fast: kernel output + exact correction")
    chunk_mb: int = Field(256, ge=1, description="memory for the chunked column statistic (fast path)")


class HeadMaskConfig(MethodConfig):
    """Scales listed heads' outputs before the output projection (0 removes them, 1 is the identity)."""

    method: str = "head_mask"
    heads: HeadSetSpec = Field(description="heads whose output is scaled")
    scale: float = Field(0.0, description="factor on each listed head's output; 0 removes it")


class KVConfig(MethodConfig):
    """Fields common to KV methods."""

    needs_masks: ClassVar[str | None] = "KV compression"

    reduction: Literal["mean", "max", "sum"] = Field(
        "mean", description="how a KV head's score is made from the scores of its query heads (GQA)"
    )


def check_budget(value: float) -> float:
    if value <= 0:
        raise ValueError(
            f"budget {value} must be positive: a token count (e.g. 1024) or a fraction of the prompt (e.g. 0.2)"
        )
    if value >= 1 and value != int(value):
        raise ValueError(f"budget {value} is neither a whole token count nor a fraction below 1")
    return value


class BudgetConfig(KVConfig):
    """A KV method whose cache size is a token budget."""

    budget: float = Field(description="tokens kept per KV head: a count (1024) or a fraction of the prompt (0.2)")

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: float) -> float:
        return check_budget(value)


PROFILER = "conflict-heads"
SWEEP_KS = (1, 3, 5, 7, 9, 15)
RANKING = {"context": "memory_heads", "memory": "context_heads"}
"""Which ranking each steering direction prunes."""


class PH3Config(MethodConfig):
    """PH3: prunes the top-k memory heads (steer toward context) or context heads (toward memory).

    ``heads`` is a conflict-heads artifact.
    """

    method: str = "ph3"
    heads: str = Field(description="path of a `attnkit profile conflict-heads` artifact")
    steer: Literal["context", "memory"] = Field(
        description="context: prune the top-k memory heads; memory: prune the top-k context heads"
    )
    k: int | Literal["auto"] = Field(
        "auto", description="heads to prune (0 = none), or auto: the k chosen by `attnkit profile ph3-sweep`"
    )

    def check_against_model(self, shape: ModelShape, allow_foreign: bool = False) -> list[str]:
        """Problems with ``k`` for this artifact, as ``field: message`` lines (empty when fine)."""
        try:
            artifact = load_artifact(self.heads, shape, allow_foreign=allow_foreign)
            ph3_heads(artifact, self.steer, self.k, self.heads)
        except HeadSetError as err:
            return [f"{getattr(err, 'field', 'heads')}: {err}"]
        return []


class PH3Error(HeadSetError):
    """A ``ph3`` setting that does not fit its artifact; ``field`` names the recipe field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def ph3_heads(
    artifact: HeadArtifact, steer: str, k: int | str, path: Any = "the artifact"
) -> tuple[list[tuple[int, int]], int, str]:
    """The heads to prune, the k used, and where k came from (the recipe or the validation sweep)."""
    if artifact.method != PROFILER:
        raise PH3Error(
            f"{path} was written by the {artifact.method!r} profiler, not {PROFILER!r}; "
            f"run `attnkit profile {PROFILER}` for ph3",
            "heads",
        )
    key = RANKING[steer]
    ranking = artifact.parameters.get(key)
    if not isinstance(ranking, list):
        raise PH3Error(f"{path} has no {key} ranking; profile again with `attnkit profile {PROFILER}`", "heads")
    kind = key.split("_")[0]
    source = "recipe"
    if k == "auto":
        sweep = artifact.parameters.get("sweep") or {}
        chosen = (sweep.get("chosen") or {}).get(steer)
        if chosen is None:
            raise PH3Error(
                f"k: auto needs the validation sweep's choice, and {path} has none for steer: {steer}; "
                f"run `attnkit profile ph3-sweep --heads {path} --data VALIDATION.jsonl`, or give k as a number",
                "k",
            )
        k = int(chosen)
        source = f"validation sweep on {sweep.get('data')} (n={sweep.get('n')})"
    if k > len(ranking):
        raise PH3Error(
            f"k={k} but {path} ranks only {len(ranking)} {kind} heads (steer: {steer} prunes {kind} "
            f"heads); use k <= {len(ranking)}",
            "k",
        )
    return [(int(layer), int(head)) for layer, head, _ in ranking[:k]], k, source


class RazorConfig(KVConfig):
    """RazorAttention: full cache on retrieval heads, sinks + recent window + a compensation token on the rest.

    Defaults from the paper (4 sinks, buffer max(4000, N/5)).
    """

    method: str = "razor"
    heads: HeadSetSpec = Field(
        description="retrieval heads that keep the full cache: a head-list artifact (`attnkit profile razor-heads`, "
        "`retrieval-heads` or `kv-gates`) or an inline set; query-level sets keep a KV head when any of its query heads is listed"
    )
    sink: int = Field(4, ge=0, description="initial tokens every head keeps (N0)")
    local: int = Field(4000, ge=1, description="minimum recent window of non-retrieval heads (S0)")
    ratio: float | None = Field(
        5.0, gt=1, description="compression ratio C: the recent window is max(local, N / C); null: always `local`"
    )
    compensation: Literal["weighted", "plain", "none"] = Field(
        "weighted",
        description="weighted: the paper's compensation token counted as the N_d tokens it replaces; "
        "plain: counted once; none: dropped tokens are simply gone",
    )

    def recent(self, length: int) -> int:
        """The recent window a non-retrieval head keeps of a ``length``-token prompt."""
        return razor_recent(length, self.local, self.ratio)


def razor_recent(length: int, local: int, ratio: float | None) -> int:
    """RazorAttention's recent window L_h = max(local, ceil(N / ratio)) (``local`` when no ratio)."""
    return local if ratio is None else max(local, math.ceil(length / ratio))


class SnapKVConfig(BudgetConfig):
    """SnapKV: keeps, per KV head, the prefix tokens the observation window attends to most.

    Defaults from the paper's LongBench configs (window 32, kernel 7, max pooling).
    """

    method: str = "snapkv"
    window: int = Field(32, ge=1, description="observation window: the prompt's last tokens, always kept")
    kernel: int = Field(7, ge=1, description="1-D pooling kernel over the summed window attention (odd)")
    pooling: Literal["max", "avg"] = "max"
    schedule: Literal["uniform", "pyramid"] = Field(
        "uniform",
        description="uniform: every layer keeps `budget`; pyramid: PyramidKV's schedule, "
        "more in lower layers, fewer in upper ones, the same total",
    )
    pyramid_beta: int = Field(20, ge=1, description="PyramidKV's beta: the top layer keeps (budget - window) / beta")

    @model_validator(mode="after")
    def _fits(self) -> SnapKVConfig:
        if self.budget >= 1 and self.budget <= self.window:
            raise ValueError(
                f"budget {int(self.budget)} must be larger than window {self.window}: the window alone "
                "is kept whole, and the budget adds the prefix tokens on top"
            )
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel {self.kernel} must be odd so the pooled scores stay aligned with their tokens")
        return self


class StreamingConfig(BudgetConfig):
    """StreamingLLM: keeps attention sinks and a recent window in every head.

    ``budget`` tokens per head: ``sink`` first tokens plus ``budget - sink`` most recent.
    """

    method: str = "streaming"
    sink: int = Field(4, ge=0, description="initial tokens always kept (attention sinks)")

    @model_validator(mode="after")
    def _fits(self) -> StreamingConfig:
        if self.budget >= 1 and self.budget <= self.sink:
            raise ValueError(f"budget {int(self.budget)} must be larger than sink {self.sink} to keep any recent token")
        return self


Marker = str | int | list[int]


class Span(BaseModel):
    """Token positions ``[start, end)`` counted from the first real (non-padding) token."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    start: int = Field(ge=0)
    end: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end <= self.start:
            raise ValueError(f"span end ({self.end}) must be greater than start ({self.start})")
        return self


class SinkRedistributeConfig(MethodConfig):
    """VAR: redistributes sink attention to a target span's non-sink tokens.

    Defaults from the reference's experiment config (tau 20, rho 0.5, summ 0.2, p 0.6).
    """

    method: str = "sink_redistribute"
    sink_dims: list[int] = Field(min_length=1, description="hidden dims of massive activations (model-specific)")
    tau: float = Field(20.0, gt=0.0, description="sink if max over sink dims of |x_d / rms(x)| > tau")
    rho: float = Field(0.5, ge=0.0, le=1.0, description="keep a row if the span's sink share <= rho")
    summ: float = Field(0.2, ge=0.0, le=1.0, description="keep a row if its attention on the span >= summ")
    p: float = Field(0.6, ge=0.0, le=1.0, description="fraction of sink attention kept; 1 = identity")
    first_layer: int = Field(2, ge=0, description="first edited layer (the reference skips layers 0-1)")
    except_last_layer: bool = Field(True, description="leave the last layer alone, as the reference does")
    span: Span | None = Field(None, description="text models: target positions {start, end} from the first real token")
    span_markers: list[Marker] | None = Field(
        None, min_length=2, max_length=2, description="text models: [open, close] markers around the target"
    )

    @model_validator(mode="after")
    def _one_target(self) -> SinkRedistributeConfig:
        if self.span is not None and self.span_markers is not None:
            raise ValueError("give either span or span_markers, not both")
        return self


class PineConfig(MethodConfig):
    """PINE: makes the output invariant to the order of a prompt's segments (documents, options).

    Segments see each other bidirectionally, each placed by its importance to the reader; defaults
    from the paper (every layer and head). ``markers`` find the segments in the prompt; without them,
    give segment ids in Python (``Pine.segments``).
    """

    method: str = "pine"
    needs_masks: ClassVar[str | None] = "the positions stage"
    markers: list[Marker] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[open, close]: a segment runs from its open marker to the next one; the last ends at the "
        "close marker after it (strings or token ids); null: segment ids given in Python",
    )


TIDAL_RESELECTION = (13, 32)
"""TidalDecode's re-selection layer in its Llama-3-8B scripts: layer 13 of 32 (the kernel model has 12,
``modify_llama.py``'s default 9); ``reselection_layer: auto`` scales it to the model's depth."""


class TidalDecodeConfig(MethodConfig):
    """TidalDecode: decode steps read only the tokens a selection layer's top-k logits pick (no memory saved).

    Defaults from the reference's Llama-3-8B scripts: budget 256 (its README demo; 128 in its needle
    script, 4096 for LongBench), token selection at layer 2, re-selection at layer 13 of 32.
    """

    method: str = "tidaldecode"
    needs_masks: ClassVar[str | None] = "sparse decoding"
    budget: int = Field(256, ge=2, description="tokens each sparse layer reads per head, the new token included")
    selection_layer: int = Field(
        2, ge=0, description="the layer that selects the tokens with full attention; the layers below it stay full"
    )
    reselection_layer: int | Literal["auto"] | None = Field(
        "auto",
        description="the layer that selects again for the layers after it; auto: round(13/32 x layers), "
        "the paper's layer 13 of 32 scaled to the model's depth; null: no re-selection",
    )
    selection: Literal["query_head", "kv_head_union", "kv_head_sum"] = Field(
        "query_head",
        description="query_head: each query head's own top-k logits (the reference); kv_head_union: one set per KV "
        "head, its query heads' rankings merged rank by rank; kv_head_sum: one set per KV head, by its query heads' "
        "summed attention probabilities (one gather serves the group)",
    )
    recent: int = Field(0, ge=0, description="most recent tokens always read, inside the budget; 0 = the reference")

    @field_validator("reselection_layer")
    @classmethod
    def _layer(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"reselection_layer {value} must be a layer index (>= 0), auto or null")
        return value

    @model_validator(mode="after")
    def _fits(self) -> TidalDecodeConfig:
        if self.recent > self.budget - 2:
            raise ValueError(
                f"recent {self.recent} must be at most budget - 2 = {self.budget - 2}: the budget holds the new token, "
                "the recent tokens and at least one selected token"
            )
        if isinstance(self.reselection_layer, int) and self.reselection_layer <= self.selection_layer:
            raise ValueError(
                f"reselection_layer {self.reselection_layer} must come after selection_layer {self.selection_layer} "
                "(or be null for no re-selection)"
            )
        return self

    def reselection_for(self, num_layers: int) -> int | None:
        """The re-selection layer for a model of ``num_layers`` layers; None when there is none (auto
        gives none when the scaled layer is not after the selection layer or past the last one)."""
        if self.reselection_layer != "auto":
            return self.reselection_layer
        scaled = math.floor(TIDAL_RESELECTION[0] * num_layers / TIDAL_RESELECTION[1] + 0.5)
        return scaled if self.selection_layer < scaled < num_layers else None

    def check_against_model(self, shape: ModelShape, allow_foreign: bool = False) -> list[str]:
        """The layers against the model's depth, as ``field: message`` lines (empty when fine)."""
        problems = []
        for name in ("selection_layer", "reselection_layer"):
            value = getattr(self, name)
            if isinstance(value, int) and value >= shape.num_layers:
                problems.append(f"{name}: layer {value} does not exist; the model has layers 0-{shape.num_layers - 1}")
        return problems


def method_configs() -> dict[str, type[MethodConfig]]:
    """Method name -> its config class, for every config that names a method."""
    found: dict[str, type[MethodConfig]] = {}
    pending = list(MethodConfig.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        name = cls.model_fields["method"].default
        if isinstance(name, str):
            if name in found and found[name] is not cls:
                raise ValueError(f"method name {name!r} has two configs: {found[name].__name__} and {cls.__name__}")
            found[name] = cls
    return dict(sorted(found.items()))


def config_for(name: str) -> type[MethodConfig]:
    """The config class of method ``name``, or an error listing the known names."""
    configs = method_configs()
    try:
        return configs[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(configs)} (see `attnkit list`)") from None
