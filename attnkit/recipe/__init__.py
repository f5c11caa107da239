"""YAML recipes: parsed with a safe loader into typed configs, every error naming its recipe path.

The package is the recipe's whole schema (model, :mod:`.methods` configs, :mod:`.tasks` configs)
and imports neither torch nor transformers.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from attnkit.catalog import DEFAULT_MODEL
from attnkit.heads import HeadSetError, ModelShape, resolve_heads
from attnkit.recipe.errors import RecipeError, pydantic_errors
from attnkit.recipe.methods import MethodConfig, config_for
from attnkit.recipe.safe_yaml import MAX_BYTES, read_yaml
from attnkit.recipe.tasks import TaskConfig, parse_task

PLACEHOLDERS = ("recipe_name",)
"""What ``output`` may name in braces: ``runs/{recipe_name}``."""


class ModelSpec(BaseModel):
    """Which model to load and how."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name_or_path: str = Field(DEFAULT_MODEL, description="HF id, local folder, .gguf file, or embedded alias")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    device: str | None = None
    device_map: str | dict[str, Any] | None = None
    trust_remote_code: bool = False
    revision: str | None = Field(None, description="Hub branch, tag or commit (Hub ids only)")
    from_pretrained: dict[str, Any] = Field(
        default_factory=dict,
        description="more keywords for transformers' from_pretrained, e.g. {low_cpu_mem_usage: true, max_memory: ...}",
    )

    @field_validator("from_pretrained")
    @classmethod
    def _not_a_field(cls, extra: dict[str, Any]) -> dict[str, Any]:
        owned = {"dtype", "torch_dtype", "attn_implementation", "device_map", "trust_remote_code", "revision"}
        clash = sorted(owned & set(extra))
        if clash:
            raise ValueError(f"{', '.join(clash)}: set these as model.<key> itself, not inside from_pretrained")
        return extra


class Recipe(BaseModel):
    """A model, an ordered list of methods, and a task to run."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = "recipe"
    model: ModelSpec = Field(default_factory=ModelSpec)
    methods: list[SerializeAsAny[MethodConfig]] = Field(default_factory=list)
    task: TaskConfig | None = None
    baseline: bool = Field(False, description="also run the task on the untouched model, side by side")
    allow_foreign_heads: bool = False
    seed: int = 0
    output: str = "runs/{recipe_name}"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name.strip() or name.strip() in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{name!r} cannot name a folder (it fills {{recipe_name}} in `output`); use letters, digits, - and _"
            )
        return name

    @field_validator("output")
    @classmethod
    def _known_placeholders(cls, output: str) -> str:
        if not output.strip():
            raise ValueError("empty; give a folder for the report, e.g. runs/{recipe_name}")
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(output) if field is not None]
        except ValueError as err:
            raise ValueError(f"{output!r}: {err}; write a literal brace as {{{{ or }}}}") from None
        for field in fields:
            if field not in PLACEHOLDERS:
                raise ValueError(
                    f"{output!r} names {{{field}}}, which attnkit does not fill; the only placeholder is {{recipe_name}}"
                )
        return output

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, as saved beside each report."""
        return self.model_dump(mode="json")

    def output_dir(self) -> Path:
        """The report folder: ``output`` with ``{recipe_name}`` filled in (both checked when read)."""
        return Path(self.output.format(recipe_name=self.name))


def parse_methods(value: Any) -> list[MethodConfig]:
    """Each entry validated by its own method's config class; errors carry ``methods[i]``."""
    if not isinstance(value, list):
        raise RecipeError([f"methods: expected a list of methods, got {type(value).__name__}"])
    configs, errors = [], []
    for i, entry in enumerate(value):
        if isinstance(entry, MethodConfig):
            configs.append(entry)
            continue
        if not isinstance(entry, dict) or "method" not in entry:
            errors.append(f"methods[{i}]: each method needs a `method:` name, e.g. `- method: head_mask`")
            continue
        try:
            configs.append(config_for(entry["method"]).model_validate(entry))
        except KeyError as err:
            errors.append(f"methods[{i}].method: {err.args[0]}")
        except ValidationError as err:
            errors.extend(pydantic_errors(err, f"methods[{i}]"))
    if errors:
        raise RecipeError(errors)
    return configs


def set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``methods.0.scale=0.5`` to the raw recipe dict; the value is read as YAML."""
    if "=" not in assignment:
        raise RecipeError([f"--set {assignment!r}: write it as path=value, e.g. methods.0.scale=0.5"])
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError([f"--set {path}: {where} is not an index of a list of {len(node)}"])
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
            if not last and key not in node:
                node[key] = {}
        else:
            raise RecipeError([f"--set {path}: {'.'.join(parts[:depth])} is a value, not a section"])
        if last:
            node[key] = read_yaml(raw, f"--set {path}")
        else:
            node = node[key]


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Read a recipe from a YAML path, YAML text or a dict, apply ``--set`` overrides, validate."""
    name = "recipe"
    if isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        path = Path(source)
        if isinstance(source, Path) or (
            len(str(source)) < 4096 and "\n" not in str(source) and path.suffix in {".yaml", ".yml"}
        ):
            if not path.is_file():
                raise RecipeError([f"recipe file {str(path)!r} not found"])
            name = path.stem
            text = read_text(path)
        else:
            text = str(source)
        try:
            data = read_yaml(text, "recipe") or {}
        except RecipeError as err:
            raise RecipeError(err.errors, name) from None
    if not isinstance(data, dict):
        raise RecipeError([f"the recipe must be a mapping of sections, got {type(data).__name__}"], name)
    data.setdefault("name", name)
    for assignment in overrides or []:
        set_override(data, assignment)
    errors: list[str] = []
    try:
        data["methods"] = parse_methods(data.get("methods") or [])
    except RecipeError as err:
        errors.extend(err.errors)
        data.pop("methods")
    if data.get("task") is not None:
        try:
            data["task"] = parse_task(data["task"])
        except RecipeError as err:
            errors.extend(err.errors)
            data.pop("task")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        errors.extend(pydantic_errors(err))
    if errors:
        raise RecipeError(errors, name)
    return recipe


def read_text(path: Path) -> str:
    """A recipe file's text: at most :data:`MAX_BYTES` (and one more, so reading it says it is too big), UTF-8."""
    with path.open("rb") as file:
        raw = file.read(MAX_BYTES + 1)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError([f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"]) from None


def check_against_model(recipe: Recipe, shape: ModelShape) -> None:
    """Validate every head set in the recipe against the model's layers and heads."""
    errors = []
    for i, config in enumerate(recipe.methods):
        for field_name, value in config:
            if field_name == "heads" and value is not None:
                try:
                    resolve_heads(value, shape, allow_foreign=recipe.allow_foreign_heads)
                except HeadSetError as err:
                    errors.append(f"methods[{i}].heads: {err}")
        check = getattr(config, "check_against_model", None)
        if callable(check) and not any(e.startswith(f"methods[{i}].") for e in errors):
            errors.extend(f"methods[{i}].{line}" for line in check(shape, recipe.allow_foreign_heads))
    if errors:
        raise RecipeError(errors, recipe.name)
