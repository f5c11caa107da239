"""Head sets and head-list artifacts.

A head set names (layer, head) pairs a method acts on. Users write it inline (``{2: [0, 3]}``),
as ranges (``{layers: "2-29", heads: "all"}``), as ``"all"``, or as the path of a JSON artifact
written by ``attnkit profile``. Everything is validated against the model's shape, so a typo
fails at apply time with the offending index, not as a silent no-op.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from attnkit.errors import UserError
from attnkit.files import write_atomic

HeadSetSpec = str | dict[Any, Any] | list[Any]
"""What a recipe may write for ``heads``: "all", a path, a mapping, or a list of [layer, head]."""

FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "head_dim",
    "vocab_size",
    "intermediate_size",
)


class HeadSetError(UserError, ValueError):
    """A head set that does not fit the model or cannot be parsed."""


@dataclass(frozen=True)
class ModelShape:
    """The facts about a model that head sets are checked against."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_id: str = ""
    fingerprint: str = ""
    max_positions: int | None = None
    """``max_position_embeddings``: the longest prompt plus reply the model was made for (None: unknown)."""

    @classmethod
    def from_config(cls, config: Any, model_id: str = "") -> ModelShape:
        config = text_config(config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            model_id=model_id or getattr(config, "name_or_path", "") or "",
            fingerprint=config_fingerprint(config),
            max_positions=getattr(config, "max_position_embeddings", None),
        )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def config_fingerprint(config: Any) -> str:
    """A short hash of the shape-defining config fields; artifacts carry it to catch model mix-ups."""
    config = text_config(config)
    fields = {name: getattr(config, name, None) for name in FINGERPRINT_FIELDS}
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class HeadSet:
    """A validated set of (layer, head) pairs; ``level`` says whether heads are query or KV heads."""

    pairs: frozenset[tuple[int, int]]
    level: Literal["query", "kv"] = "query"

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, head in sorted(self.pairs):
            out.setdefault(layer, []).append(head)
        return out

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.pairs})

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"HeadSet({len(self.pairs)} {self.level} heads in {len(self.layers)} layers)"


def parse_range(value: Any, limit: int, what: str) -> list[int]:
    """``"all"``, an int, ``"2-29"``, ``"0,3,5-7"`` or a list of those, checked against ``limit``."""
    if value == "all":
        return list(range(limit))
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise HeadSetError(f"{what} {item!r} is not an index")
        if isinstance(item, int):
            out.append(item)
            continue
        for part in str(item).split(","):
            part = part.strip()
            try:
                if "-" in part.lstrip("-"):
                    lo, hi = part.split("-", 1)
                    start, stop = int(lo), int(hi)
                    if stop < start:
                        raise HeadSetError(f"{what} range {part!r} is empty; write it low-high")
                    out.extend(range(start, min(stop, limit - 1) + 1))  # ``stop`` itself is checked below
                    out.append(stop)
                else:
                    out.append(int(part))
            except ValueError as err:
                raise HeadSetError(f"{what} {part!r} is not an index or a range like 2-29") from err
    for index in out:
        if index < 0 or index >= limit:
            plural = what + "s" if not what.endswith("s") else what
            raise HeadSetError(f"{what} {index} does not exist, model has {limit} {plural} (0-{limit - 1})")
    return sorted(set(out))


def resolve_heads(
    spec: HeadSetSpec,
    shape: ModelShape,
    *,
    level: Literal["query", "kv"] = "query",
    allow_foreign: bool = False,
) -> HeadSet:
    """Turn a recipe's ``heads`` value into a validated :class:`HeadSet`."""
    per_layer = shape.num_heads if level == "query" else shape.num_kv_heads
    pairs: set[tuple[int, int]] = set()
    if isinstance(spec, str) and spec != "all":
        artifact = load_artifact(spec, shape, allow_foreign=allow_foreign)
        selected = convert_level(artifact.selected, artifact.level, level, shape)
        return resolve_heads(selected, shape, level=level, allow_foreign=allow_foreign)
    if spec == "all":
        spec = {"layers": "all", "heads": "all"}
    if isinstance(spec, list):
        for item in spec:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise HeadSetError(f"list entries must be [layer, head] pairs, got {item!r}")
            layer = parse_range(item[0], shape.num_layers, "layer")[0]
            pairs.add((layer, parse_range(item[1], per_layer, "head")[0]))
    elif isinstance(spec, dict) and set(spec) <= {"layers", "heads"} and "layers" in spec:
        layers = parse_range(spec["layers"], shape.num_layers, "layer")
        heads = parse_range(spec.get("heads", "all"), per_layer, "head")
        pairs = {(layer, head) for layer in layers for head in heads}
    elif isinstance(spec, dict):
        for key, heads in spec.items():
            for layer in parse_range(key, shape.num_layers, "layer"):
                for head in parse_range(heads, per_layer, "head"):
                    pairs.add((layer, head))
    else:
        raise HeadSetError(
            f"cannot read {spec!r} as heads; write 'all', {{layer: [heads]}}, "
            "{layers: 2-29, heads: all}, or the path of a head-list artifact"
        )
    if not pairs:
        raise HeadSetError("the head set is empty; name at least one head")
    return HeadSet(frozenset(pairs), level)


def convert_level(heads: dict[int, list[int]], have: str, want: str, shape: ModelShape) -> dict[int, list[int]]:
    """Heads of an artifact at the level a method needs: a KV head stands for all its query heads,
    and a KV head is selected when any of its query heads is."""
    if have == want:
        return heads
    group = shape.group_size
    if want == "kv":
        return {layer: sorted({h // group for h in hs}) for layer, hs in heads.items()}
    return {layer: [h * group + i for h in hs for i in range(group)] for layer, hs in heads.items()}


class Selection(BaseModel):
    """How the selected heads were chosen from the scores."""

    model_config = ConfigDict(extra="forbid")
    rule: str
    heads: dict[int, list[int]]


class HeadArtifact(BaseModel):
    """A head list with provenance, written by ``attnkit profile``."""

    model_config = ConfigDict(extra="forbid")
    attnkit_version: str
    model_id: str
    config_fingerprint: str
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: str = ""
    samples: int = 0
    seed: int | None = None
    level: Literal["query", "kv"] = "query"
    scores: list[list[float]]
    selection: Selection

    @property
    def selected(self) -> dict[int, list[int]]:
        return self.selection.heads

    def save(self, path: str | Path) -> Path:
        """Write the artifact as JSON, atomically (a crash leaves the old file or the new one)."""
        return write_atomic(path, self.model_dump_json(indent=1))

    def shape_problem(self) -> str | None:
        """What makes the artifact inconsistent in itself (a ragged score matrix, a selected head
        outside it), or None."""
        widths = {len(row) for row in self.scores}
        if not self.scores or len(widths) != 1:
            return "its score matrix is empty or its rows differ in length"
        width = widths.pop()
        for layer, heads in self.selected.items():
            outside = [h for h in heads if not 0 <= h < width]
            if not 0 <= layer < len(self.scores) or outside:
                return f"it selects layer {layer} heads {heads}, outside its {len(self.scores)} x {width} score matrix"
        return None


def read_artifact(path: str | Path) -> HeadArtifact:
    """Read a head-list artifact and check it is consistent in itself (not yet against a model)."""
    path = Path(path)
    if not path.is_file():
        raise HeadSetError(f"head-list artifact {str(path)!r} not found; run `attnkit profile` to make one")
    try:
        artifact = HeadArtifact.model_validate_json(path.read_bytes())
    except ValueError as err:
        raise HeadSetError(f"{path} is not a head-list artifact: {err}") from None
    problem = artifact.shape_problem()
    if problem:
        raise HeadSetError(f"{path} is damaged: {problem}; profile the model again")
    return artifact


def load_artifact(path: str | Path, shape: ModelShape, *, allow_foreign: bool = False) -> HeadArtifact:
    """Read an artifact and check it was made for this model: its fingerprint, and its score matrix
    (layers x query heads, or x KV heads for ``level: kv``) against the model's shape. Another
    model's artifact is an error (a warning with ``allow_foreign``); one whose matrix does not match
    its own fingerprint's model (an edited ``level``, say) is always an error."""
    import warnings

    artifact = read_artifact(path)
    per_layer = shape.num_heads if artifact.level == "query" else shape.num_kv_heads
    fits = len(artifact.scores) == shape.num_layers and len(artifact.scores[0]) == per_layer
    foreign = bool(shape.fingerprint) and artifact.config_fingerprint != shape.fingerprint
    if shape.fingerprint and not foreign and not fits:
        raise HeadSetError(
            f"{path} has a {len(artifact.scores)} x {len(artifact.scores[0])} score matrix at level "
            f"{artifact.level!r}, but this model has {shape.num_layers} layers of {per_layer} "
            f"{'query' if artifact.level == 'query' else 'KV'} heads; the artifact was edited or damaged, "
            "profile the model again"
        )
    if foreign or not fits:
        message = (
            f"artifact {path} was made for {artifact.model_id!r} (fingerprint {artifact.config_fingerprint}), "
            f"not this model {shape.model_id!r} (fingerprint {shape.fingerprint}); profile this model, "
            "or pass allow_foreign_heads=True to use it anyway"
        )
        if not allow_foreign:
            raise HeadSetError(message)
        warnings.warn(message, stacklevel=2)
    return artifact
