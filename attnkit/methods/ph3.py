"""``ph3``: steer knowledge conflicts by pruning memory heads or context heads (PH3, Jin et al. 2024).

``steer: context`` prunes the top-k memory heads of a ``conflict-heads`` artifact (so the model
follows the context more); ``steer: memory`` prunes the top-k context heads. Pruning is
``head_mask`` at scale 0 (the head's slice of the ``o_proj`` input is zeroed), so it works on every
attention backend and with the KV cache. ``k: auto`` takes the k that ``attnkit profile ph3-sweep``
chose on a validation set and recorded in the artifact; ``k: 0`` is the identity.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from attnkit.heads import HeadArtifact, HeadSetError, ModelShape, load_artifact
from attnkit.methods.base import Method, MethodConfig
from attnkit.methods.head_mask import HeadMask
from attnkit.registry import register

PROFILER = "conflict-heads"
SWEEP_KS = (1, 3, 5, 7, 9, 15)
RANKING = {"context": "memory_heads", "memory": "context_heads"}
"""Which ranking each steering direction prunes."""


class PH3Config(MethodConfig):
    """``heads``: a conflict-heads artifact; ``steer`` toward context or memory; prune the top ``k``."""

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


def ph3_heads(artifact: HeadArtifact, steer: str, k: int | str, path: Any = "the artifact") -> tuple[list[tuple[int, int]], int, str]:
    """The heads to prune, the k used, and where k came from (the recipe or the validation sweep)."""
    if artifact.method != PROFILER:
        raise PH3Error(f"{path} was written by the {artifact.method!r} profiler, not {PROFILER!r}; "
                       f"run `attnkit profile {PROFILER}` for ph3", "heads")
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
            raise PH3Error(f"k: auto needs the validation sweep's choice, and {path} has none for steer: {steer}; "
                           f"run `attnkit profile ph3-sweep --heads {path} --data VALIDATION.jsonl`, or give k as a number",
                           "k")
        k = int(chosen)
        source = f"validation sweep on {sweep.get('data')} (n={sweep.get('n')})"
    if k > len(ranking):
        raise PH3Error(f"k={k} but {path} ranks only {len(ranking)} {kind} heads (steer: {steer} prunes {kind} "
                       f"heads); use k <= {len(ranking)}", "k")
    return [(int(layer), int(head)) for layer, head, _ in ranking[:k]], k, source


@register
class PH3(Method):
    """Prunes the top-k memory heads (steer toward context) or context heads (toward memory)."""

    name = "ph3"
    config_class = PH3Config

    def attach(self, at) -> None:
        artifact = load_artifact(self.config.heads, at.shape, allow_foreign=at.allow_foreign_heads)
        heads, k, source = ph3_heads(artifact, self.config.steer, self.config.k, self.config.heads)
        self.stats.describe("steer", self.config.steer)
        self.stats.describe("k", k)
        self.stats.describe("k_source", source)
        self.stats.describe("pruned", ", ".join(f"L{layer}H{head}" for layer, head in heads) or "none")
        if not heads:
            self.stats.describe("heads", 0)
            return
        mask = HeadMask(heads=[list(pair) for pair in heads], scale=0.0)
        mask.stats = self.stats  # one set of counters: heads, head_outputs_scaled per call
        mask.attach(at)
