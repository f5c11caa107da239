"""``attnkit profile ph3-sweep``: choose PH3's k on a validation set and record it in the artifact.

As in the PH3 baseline of JuICE (``GaotangLi/JUICE``, ``main_intervene.py --ph3``): every k in
{1, 3, 5, 7, 9, 15} is tried for each steering direction on validation items, and the k with the
best validation rate wins (context rate for ``steer: context``, memory rate for ``steer: memory``;
ties go to the larger mean log-prob margin toward the target, then to the smaller k). The choice
and every tried k's rates are written into the artifact's ``parameters.sweep``, which ``k: auto``
reads, and which a run's report shows through the method's ``k`` and ``k_source``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from attnkit.handle import apply
from attnkit.heads import HeadArtifact, ModelShape, load_artifact
from attnkit.methods import PH3
from attnkit.recipe.methods import RANKING, SWEEP_KS, ph3_heads
from attnkit.recipe.tasks import ConflictTask
from attnkit.tasks.conflict import load_conflict_items, run_conflict
from attnkit.tasks.result import progress_bar


def evaluate(model: Any, tokenizer: Any, task: ConflictTask, methods: list[Any]) -> dict[str, float]:
    """Log-likelihood context/memory rates and mean margin (context minus memory log-prob) under ``methods``."""
    with apply(model, methods):
        result = run_conflict(model, tokenizer, task, progress=False)
    margins = [row["loglik"]["context"] - row["loglik"]["memory"] for row in result.rows]
    return {"context_rate": result.metrics["context_rate"], "memory_rate": result.metrics["memory_rate"],
            "mean_context_margin": sum(margins) / len(margins)}


def ph3_sweep(
    model: Any,
    tokenizer: Any,
    heads: str | Path,
    data: str,
    *,
    ks: tuple[int, ...] = SWEEP_KS,
    steers: tuple[str, ...] = ("context", "memory"),
    limit: int = 200,
    batch_size: int = 8,
    task: ConflictTask | None = None,
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Try each k per steering direction on ``data``; return (and write into the artifact) the sweep."""
    shape = ModelShape.from_config(model.config)
    artifact: HeadArtifact = load_artifact(heads, shape)
    task = (task or ConflictTask(data=data)).model_copy(
        update={"data": data, "limit": limit, "scoring": "loglik", "with_context": True, "batch_size": batch_size}
    )
    start = time.perf_counter()
    results: dict[str, Any] = {"untouched": evaluate(model, tokenizer, task, [])}
    chosen: dict[str, int] = {}
    runs = [(steer, k) for steer in steers for k in ks
            if k <= len(artifact.parameters.get(RANKING[steer], []))]
    with progress_bar("ph3-sweep", len(runs), progress) as advance:
        for steer in steers:
            results[steer] = {}
            for k in ks:
                if (steer, k) not in runs:
                    continue
                ph3_heads(artifact, steer, k, heads)  # validates the artifact before the run
                results[steer][str(k)] = evaluate(model, tokenizer, task, [PH3(heads=str(heads), steer=steer, k=k)])
                advance(1)
            if not results[steer]:
                continue
            sign = 1 if steer == "context" else -1
            best = max(results[steer].items(), key=lambda kv: (kv[1][f"{steer}_rate"],
                                                              sign * kv[1]["mean_context_margin"], -int(kv[0])))
            chosen[steer] = int(best[0])
    sweep = {"data": str(data), "n": len(load_conflict_items(task)), "ks": list(ks), "chosen": chosen, "results": results,
             "rule": "best validation rate (context rate for steer: context, memory rate for steer: memory); ties: "
                     "larger mean log-prob margin toward the target, then smaller k",
             "seconds": round(time.perf_counter() - start, 1)}
    if write:
        artifact.parameters["sweep"] = sweep
        artifact.save(heads)
    return sweep
