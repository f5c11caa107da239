"""Typed task configs; ``kind`` picks the task."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class TaskBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "GenerateTask":
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of `prompts` (a list) or `prompts_file` (a JSONL path)")
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


TaskConfig = Annotated[Union[GenerateTask, ChoiceTask], Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TaskConfig)


def parse_task(value: Any) -> GenerateTask | ChoiceTask:
    """Validate a recipe's ``task`` section; errors are RecipeError lines under ``task``."""
    from attnkit.recipe import RecipeError, pydantic_errors

    if isinstance(value, BaseModel):
        return value
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as err:
        lines = [line.replace("task.generate", "task").replace("task.choice", "task") for line in pydantic_errors(err, "task")]
        raise RecipeError(lines) from None
