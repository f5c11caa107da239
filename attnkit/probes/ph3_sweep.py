"""``attnkit profile ph3-sweep``: choose PH3's k on a validation set and record it in the artifact.

As in the PH3 baseline of JuICE (``GaotangLi/JUICE``, ``main_intervene.py --ph3``): every k in
{1, 3, 5, 7, 9, 15} is tried for each steering direction on validation items, and the k with the
best validation rate wins (context rate for ``steer: context``, memory rate for ``steer: memory``;
ties go to the larger mean log-prob margin toward the target, then to the smaller k). The choice
and every tried k's rates are written into the artifact's ``parameters.sweep``, which ``k: auto``
reads, and which a run's report shows through the method's ``k`` and ``k_source``. Each tried
(steer, k) is one unit of progress (``<artifact>.ph3-sweep.progress.jsonl``), so an interrupted
sweep resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnkit.handle import apply
from attnkit.heads import HeadArtifact, ModelShape, load_artifact
from attnkit.methods import PH3
from attnkit.probes.configs import PH3SweepConfig
from attnkit.probes.run import ProfileRun, digest, file_digest
from attnkit.recipe.methods import RANKING, ph3_heads
from attnkit.recipe.tasks import ConflictTask
from attnkit.tasks.conflict import load_conflict_items, run_conflict


def evaluate(model: Any, tokenizer: Any, task: ConflictTask, methods: list[Any]) -> dict[str, float]:
    """Log-likelihood context/memory rates and mean margin (context minus memory log-prob) under ``methods``."""
    with apply(model, methods):
        result = run_conflict(model, tokenizer, task, progress=False)
    margins = [row["loglik"]["context"] - row["loglik"]["memory"] for row in result.rows]
    return {
        "context_rate": result.metrics["context_rate"],
        "memory_rate": result.metrics["memory_rate"],
        "mean_context_margin": sum(margins) / len(margins),
    }


def profile(
    model: Any, tokenizer: Any, config: PH3SweepConfig, *, model_id: str = "", progress: bool = True
) -> dict[str, Any]:
    """Try each k per steering direction on ``config.data``; return the sweep and write it into the
    artifact ``config.heads``."""
    artifact: HeadArtifact = load_artifact(config.heads, ModelShape.from_config(model.config))
    task = ConflictTask(
        data=str(config.data),
        limit=config.limit,
        scoring="loglik",
        with_context=True,
        batch_size=config.batch_size,
        template=config.template,
        chat_template=config.chat_template,
    )
    rankings = {steer: artifact.parameters.get(RANKING[steer], []) for steer in config.steers}
    run = ProfileRun(
        "ph3-sweep",
        model,
        config,
        model_id=model_id,
        progress=progress,
        data=digest({"data": file_digest(config.data), "rankings": rankings}),
        progress_path=Path(config.heads).with_suffix(".ph3-sweep.progress.jsonl"),
    )
    runs = {f"{steer} k={k}": (steer, k) for steer in config.steers for k in config.ks if k <= len(rankings[steer])}
    for steer, k in runs.values():
        ph3_heads(artifact, steer, k, config.heads)  # validates the artifact before the run

    def tried(unit: tuple[str, int] | None) -> dict[str, Any]:
        methods = [] if unit is None else [PH3(heads=str(config.heads), steer=unit[0], k=unit[1])]
        return evaluate(model, tokenizer, task, methods)

    done = run.each("untouched and each k", {"untouched": None, **runs}, tried)
    results: dict[str, Any] = {"untouched": rates(done["untouched"])}
    chosen: dict[str, int] = {}
    for steer in config.steers:
        results[steer] = {str(k): rates(done[key]) for key, (s, k) in runs.items() if s == steer}
        if results[steer]:
            chosen[steer] = best_k(results[steer], steer)
    sweep = {
        "data": str(config.data),
        "n": len(load_conflict_items(task)),
        "ks": list(config.ks),
        "chosen": chosen,
        "results": results,
        "rule": "best validation rate (context rate for steer: context, memory rate for steer: memory); ties: "
        "larger mean log-prob margin toward the target, then smaller k",
        "seconds": run.seconds(),
    }
    artifact.parameters["sweep"] = sweep
    artifact.save(config.heads)
    return sweep


def rates(unit: dict[str, Any]) -> dict[str, float]:
    """A recorded unit's rates (without its key)."""
    return {name: unit[name] for name in ("context_rate", "memory_rate", "mean_context_margin")}


def best_k(tried: dict[str, dict[str, float]], steer: str) -> int:
    """The k with the best ``steer`` rate; ties: the larger margin toward the target, then the smaller k."""
    sign = 1 if steer == "context" else -1
    best = max(tried.items(), key=lambda kv: (kv[1][f"{steer}_rate"], sign * kv[1]["mean_context_margin"], -int(kv[0])))
    return int(best[0])
