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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import attnkit
from attnkit import compat
from attnkit.handle import Handle, apply
from attnkit.heads import HeadArtifact, ModelShape, Selection
from attnkit.methods.act import ACT
from attnkit.primitives import layer_window
from attnkit.probes.progress import Progress
from attnkit.recipe.tasks import ChoiceTask
from attnkit.tasks.choice import label_word_items, left_pad, load_items
from attnkit.tasks.result import progress_bar


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
        batches.append(Batch(ids, mask, positions, [encoded[i][1] for i in chosen], [items[i].answer for i in chosen], {}))
    return batches


def tail_supported(model: Any) -> bool:
    """Running layers l..L-1 alone is done for Llama-family decoders with full attention everywhere."""
    decoder = getattr(model, "model", None)
    config = model.config
    return (
        all(hasattr(decoder, name) for name in ("rotary_emb", "layers", "norm", "embed_tokens"))
        and hasattr(model, "lm_head")
        and not any(layer_window(config, i) for i in range(config.num_hidden_layers))
        and not getattr(config, "final_logit_softcapping", None)
        and "gemma" not in config.model_type
    )


def last_logits(model: Any, batch: Batch, start: int | None, handle: Handle | None) -> torch.Tensor:
    """Last-position logits, from layer ``start`` on (its cached input) or the whole model."""
    if start is None:
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            logits_to_keep=1,
        ).logits[:, -1]
    decoder = model.model
    hidden = batch.hidden[start]
    with handle.call(batch.attention_mask, hidden.shape[1]) if handle else _nothing():
        mask = compat.causal_mask(decoder.config, hidden, batch.attention_mask, batch.position_ids)
        rope = decoder.rotary_emb(hidden, position_ids=batch.position_ids)
        for layer in decoder.layers[start:]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=batch.position_ids)
        return model.lm_head(decoder.norm(hidden[:, -1:]))[:, -1]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def correct(logits: torch.Tensor, batch: Batch) -> int:
    """How many items' answer has the highest label-token logit."""
    hits = 0
    for row, labels in enumerate(batch.labels):
        scores = logits[row, labels]
        hits += int(scores.argmax().item() == batch.answers[row])
    return hits


def profile_act_heads(
    model: Any,
    tokenizer: Any,
    data: str,
    *,
    model_id: str,
    output: Path,
    limit: int = 200,
    beta: float = 0.4,
    threshold: float = 0.1,
    layers: list[int] | None = None,
    search: Literal["coarse-to-fine", "full"] = "coarse-to-fine",
    fine_layers: int = 2,
    coarse_every: int = 2,
    batch_size: int = 16,
    progress: bool = True,
) -> HeadArtifact:
    """Score calibrating each candidate on ``data`` (choice JSONL, label-word accuracy); write the artifact."""
    shape = ModelShape.from_config(model.config, model_id)
    layers = layers or list(range(2, shape.num_layers - 1))
    setup = {"model": shape.fingerprint, "data": str(data), "limit": limit, "beta": beta, "threshold": threshold,
             "layers": layers, "batch_size": batch_size, "coarse_every": coarse_every}
    record = Progress(output.with_suffix(".progress.jsonl"), setup)
    start_time = time.perf_counter()
    batches = make_batches(tokenizer, data, limit, batch_size)
    total = sum(len(b.answers) for b in batches)
    tail = tail_supported(model)

    with torch.no_grad():
        baseline_hits = []
        with progress_bar("act-heads: untouched pass", len(batches), progress) as advance:
            for batch in batches:
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, output_hidden_states=tail, logits_to_keep=1)
                baseline_hits.append(correct(out.logits[:, -1], batch))
                if tail:
                    batch.hidden = {layer: out.hidden_states[layer] for layer in layers}
                advance(1)
        baseline = sum(baseline_hits) / total
        timings = {"untouched_pass": time.perf_counter() - start_time}

        def evaluate(key: str, heads: dict[int, Any], subset: list[Batch]) -> float:
            if key in record.done:
                return record.done[key]["accuracy"]
            start = min(heads) if tail else None
            hits, sinks = 0, 0
            with apply(model, [ACT(heads=heads, beta=beta, threshold=threshold)]) as handle:
                for batch in subset:
                    hits += correct(last_logits(model, batch, start, handle), batch)
                    sinks += handle.stats()["act"].get("sinks_found", 0)
            accuracy = hits / sum(len(b.answers) for b in subset)
            record.record(key, {"accuracy": accuracy, "sinks": sinks})
            return accuracy

        coarse = batches[::coarse_every]

        candidates = [(f"L{l}", {l: "all"}) for l in layers] if search == "coarse-to-fine" else []
        with progress_bar("act-heads: whole layers", len(candidates), progress) as advance:
            layer_acc = {}
            for key, heads in candidates:
                layer_acc[min(heads)] = evaluate(key, heads, coarse)
                advance(1)
        timings["whole_layers"] = time.perf_counter() - start_time - sum(timings.values())
        fine = sorted(layer_acc, key=lambda l: -layer_acc[l])[:fine_layers] if search == "coarse-to-fine" else layers
        singles = [(f"L{l}H{h}", {l: [h]}) for l in sorted(fine) for h in range(shape.num_heads)]
        head_acc: dict[tuple[int, int], float] = {}
        with progress_bar("act-heads: single heads", len(singles), progress) as advance:
            for key, heads in singles:
                (layer, (head,)), = heads.items()
                head_acc[(layer, head)] = evaluate(key, heads, batches)
                advance(1)
        timings["single_heads"] = time.perf_counter() - start_time - sum(timings.values())

    scores = [[0.0] * shape.num_heads for _ in range(shape.num_layers)]
    for (layer, head), acc in head_acc.items():
        scores[layer][head] = acc - baseline
    selected: dict[int, list[int]] = {}
    for (layer, head), acc in sorted(head_acc.items()):
        if acc > baseline:
            selected.setdefault(layer, []).append(head)
    rule = (
        f"heads whose calibration alone beats the uncalibrated label-word accuracy ({baseline:.4f}) on {total} items; "
        + (f"single heads searched in the {fine_layers} layers whose whole-layer calibration scored best on "
           f"{sum(len(b.answers) for b in coarse)} of the items" if search == "coarse-to-fine"
           else "every head of the searched layers")
    )
    artifact = HeadArtifact(
        attnkit_version=attnkit.__version__, model_id=model_id, config_fingerprint=shape.fingerprint, method="act",
        parameters={"beta": beta, "threshold": threshold, "search": search, "fine_layers": fine_layers,
                    "layers": layers, "baseline_accuracy": baseline,
                    "layer_accuracy": {str(k): v for k, v in layer_acc.items()},
                    "evaluated_heads": {str(l): list(range(shape.num_heads)) for l in sorted(fine)},
                    "coarse_every": coarse_every, "seconds": round(time.perf_counter() - start_time, 1),
                    "stage_seconds": {k: round(v, 1) for k, v in timings.items()}, "tail_only": tail},
        data=str(data), samples=total, seed=None, scores=scores, selection=Selection(rule=rule, heads=selected),
    )
    artifact.save(output)
    return artifact
