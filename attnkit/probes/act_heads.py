"""``attnkit profile act-heads``: ACT's head search, made affordable.

The reference calibrates one (layer, head) at a time and keeps the heads whose calibration beats
the uncalibrated model's accuracy on a labelled dev set. Here the same rule is applied with three
savings that do not change any score: items are batched; calibrating layer l leaves layers below
it untouched, so their outputs are computed once and every candidate in layer l runs only layers
l..L-1 (Llama-family decoders; others run the whole model); and coarse-to-fine search first
calibrates whole layers on every ``coarse_every``-th batch (batches are length-sorted, so the
subset spans all lengths) to rank the layers, then scores single heads on every item in the
``fine_layers`` best layers; ``search: full`` scores every head. The selection rule only ever
compares single heads on the whole dev set. Progress is appended to a file, so an interrupted run
resumes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm

import attnkit
from attnkit.handle import Handle, apply
from attnkit.heads import HeadArtifact, Selection
from attnkit.methods.act import ACT
from attnkit.plots import head_map
from attnkit.probes.configs import ActHeadsConfig
from attnkit.probes.layers import layer_inputs, run_layer, tail_supported
from attnkit.probes.run import ProfileRun, file_digest
from attnkit.recipe.tasks import ChoiceTask
from attnkit.tasks.choice import label_word_items, left_pad, load_items

__all__ = ["last_logits", "make_batches", "plot_act_heads", "profile", "tail_supported"]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: list[list[int]]
    answers: list[int]
    hidden: dict[int, torch.Tensor]
    """Untouched input to each searched layer, for running only the layers from there on."""


def make_batches(tokenizer: Any, data: str, limit: int, batch_size: int) -> list[Batch]:
    """Items as left-padded batches of similar length (less padding), in a fixed order."""
    items = load_items(ChoiceTask(data=data, limit=limit))
    encoded = label_word_items(tokenizer, items, chat=False)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        ids, mask, positions = left_pad([encoded[i][0] for i in chosen], tokenizer.pad_token_id)
        batches.append(
            Batch(ids, mask, positions, [encoded[i][1] for i in chosen], [items[i].answer for i in chosen], {})
        )
    return batches


def last_logits(model: Any, batch: Batch, start: int | None, handle: Handle | None) -> torch.Tensor:
    """Last-position logits, from layer ``start`` on (its cached input) or the whole model."""
    if start is None:
        return model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=1,
        ).logits[:, -1]
    hidden = batch.hidden[start]
    with handle.call(batch.attention_mask, hidden.shape[1]) if handle else nullcontext():
        inputs = layer_inputs(model, hidden, batch.attention_mask, batch.position_ids)
        for index in range(start, len(model.model.layers)):
            hidden = run_layer(model, index, hidden, inputs)
        return model.lm_head(model.model.norm(hidden[:, -1:]))[:, -1]


def correct(logits: torch.Tensor, batch: Batch) -> int:
    """How many items' answer has the highest label-token logit."""
    hits = 0
    for row, labels in enumerate(batch.labels):
        scores = logits[row, labels]
        hits += int(scores.argmax().item() == batch.answers[row])
    return hits


def profile(
    model: Any,
    tokenizer: Any,
    config: ActHeadsConfig,
    *,
    model_id: str,
    output: Path | None = None,
    progress: bool = True,
) -> HeadArtifact:
    """Score calibrating each candidate on ``config.data`` (choice JSONL, label-word accuracy); the
    artifact keeps the heads that beat the uncalibrated model (written to ``output`` when given)."""
    run = ProfileRun(
        "act-heads", model, config, model_id=model_id, output=output, progress=progress, data=file_digest(config.data)
    )
    shape = run.shape
    layers = config.layers or list(range(2, shape.num_layers - 1))
    batches = make_batches(tokenizer, str(config.data), config.limit, config.batch_size)
    total = sum(len(b.answers) for b in batches)
    tail = tail_supported(model)
    coarse = batches[:: config.coarse_every]

    def evaluate(heads: dict[int, Any], subset: list[Batch]) -> dict[str, Any]:
        start = min(heads) if tail else None
        hits, sinks = 0, 0
        with apply(model, [ACT(heads=heads, beta=config.beta, threshold=config.threshold)]) as handle:
            for batch in subset:
                hits += correct(last_logits(model, batch, start, handle), batch)
                sinks += handle.stats()["act"].get("sinks_found", 0)
        return {"accuracy": hits / sum(len(b.answers) for b in subset), "sinks": sinks}

    with torch.no_grad():
        baseline = untouched_accuracy(run, batches, layers if tail else []) / total
        timings = {"untouched_pass": time.perf_counter() - run.started}
        candidates = {f"L{layer}": {layer: "all"} for layer in layers} if config.search == "coarse-to-fine" else {}
        whole = run.each("whole layers", candidates, lambda heads: evaluate(heads, coarse))
        layer_acc = {int(key[1:]): unit["accuracy"] for key, unit in whole.items()}
        timings["whole_layers"] = time.perf_counter() - run.started - sum(timings.values())
        fine = sorted(layer_acc, key=lambda layer: -layer_acc[layer])[: config.fine_layers] if candidates else layers
        singles = {f"L{layer}H{h}": {layer: [h]} for layer in sorted(fine) for h in range(shape.num_heads)}
        scored = run.each("single heads", singles, lambda heads: evaluate(heads, batches))
        head_acc = {
            (layer, head): scored[f"L{layer}H{head}"]["accuracy"]
            for key, heads in singles.items()
            for layer, (head,) in heads.items()
        }
        timings["single_heads"] = time.perf_counter() - run.started - sum(timings.values())

    scores = [[0.0] * shape.num_heads for _ in range(shape.num_layers)]
    for (layer, head), acc in head_acc.items():
        scores[layer][head] = acc - baseline
    selected: dict[int, list[int]] = {}
    for (layer, head), acc in sorted(head_acc.items()):
        if acc > baseline:
            selected.setdefault(layer, []).append(head)
    rule = (
        f"heads whose calibration alone beats the uncalibrated label-word accuracy ({baseline:.4f}) on {total} items; "
        + (
            f"single heads searched in the {config.fine_layers} layers whose whole-layer calibration scored best on "
            f"{sum(len(b.answers) for b in coarse)} of the items"
            if candidates
            else "every head of the searched layers"
        )
    )
    artifact = HeadArtifact(
        attnkit_version=attnkit.__version__,
        model_id=model_id,
        config_fingerprint=shape.fingerprint,
        method="act",
        parameters={
            "beta": config.beta,
            "threshold": config.threshold,
            "search": config.search,
            "fine_layers": config.fine_layers,
            "layers": layers,
            "baseline_accuracy": baseline,
            "layer_accuracy": {str(k): v for k, v in layer_acc.items()},
            "evaluated_heads": {str(layer): list(range(shape.num_heads)) for layer in sorted(fine)},
            "coarse_every": config.coarse_every,
            "seconds": run.seconds(),
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            "tail_only": tail,
        },
        data=str(config.data),
        samples=total,
        seed=None,
        scores=scores,
        selection=Selection(rule=rule, heads=selected),
    )
    return run.save(artifact)


def untouched_accuracy(run: ProfileRun, batches: list[Batch], layers: list[int]) -> int:
    """Correct items of the uncalibrated model; keeps each batch's input to ``layers`` for their tails."""
    model = run.model
    hits = 0
    with run.bar("untouched pass", len(batches)) as advance:
        for batch in batches:
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                output_hidden_states=bool(layers),
                logits_to_keep=1,
            )
            hits += correct(out.logits[:, -1], batch)
            batch.hidden = {layer: out.hidden_states[layer] for layer in layers}
            advance(1)
    return hits


def plot_act_heads(artifact: HeadArtifact, path: Path, model: str) -> None:
    """Accuracy gain of each head evaluated alone; blank where a head was not evaluated."""
    scores = np.full((len(artifact.scores), len(artifact.scores[0])), np.nan)
    for layer, heads in artifact.parameters["evaluated_heads"].items():
        for head in heads:
            scores[int(layer), head] = artifact.scores[int(layer)][head]
    bound = max(1e-3, float(np.nanmax(np.abs(scores))) if np.isfinite(scores).any() else 1e-3)
    head_map(
        scores,
        path,
        title=f"ACT head search, {model}\naccuracy gain per head (blank: not searched)",
        cbar_label="accuracy gain",
        norm=TwoSlopeNorm(0.0, -bound, bound),
        cmap="RdBu",
    )
