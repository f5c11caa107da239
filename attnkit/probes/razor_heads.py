"""``attnkit profile razor-heads``: RazorAttention's retrieval heads from echo and induction scores.

The input is BOS followed by a block of ``block`` random token ids (sampled without replacement
from the vocabulary minus special tokens, seeded) repeated ``repeats`` times; one forward pass
with eager attention. For every query position i in copies 2..R of the block and every earlier
copy k (1 <= k <= copy index):

- echo: attention from i to the same token in the earlier copy, key ``i - k*block``;
- induction: attention from i to the token after that copy, key ``i - k*block + 1``
  (the token that came next last time, i.e. the one to predict now).

A query head's score is the per-position sum over earlier copies, averaged over all positions of
copies 2..R. A KV head's score is the maximum over its query heads. All KV heads of all layers are
ranked together; the top ``induction_ratio`` by induction and the top ``echo_ratio`` by echo are
kept (their union; the paper's defaults 0.14 and 0.01).

The paper's input (2500 x 4 + BOS = 10,001 tokens) does not fit a model with fewer positions
(SmolLM2: 8192); ``block`` is then shrunk to ``(max_position_embeddings - 1) // repeats`` and the
artifact records both numbers. Sliding-window layers (Gemma 3) cannot see an earlier copy when the
window is shorter than the block; their scores come out near zero.

Each layer is one unit of progress: on Llama-family decoders the layers run one at a time and the
hidden state after the last finished layer is kept next to the artifact, so an interrupted run
resumes with the next layer; other models run whole (a resumed run scores only the layers missing).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import attnkit
from attnkit.heads import HeadArtifact, Selection, text_config
from attnkit.probes.attention_maps import attention_probabilities
from attnkit.probes.configs import ProfileError, RazorHeadsConfig
from attnkit.probes.layers import layer_inputs, run_layer, tail_supported
from attnkit.probes.run import ProfileRun, digest

__all__ = [
    "RazorInput",
    "echo_induction",
    "kv_max",
    "profile",
    "razor_input",
    "top_union",
]

log = logging.getLogger(__name__)


class RazorProfileError(ProfileError):
    """Settings the profile cannot run with; the message names the fix."""


@dataclass
class RazorInput:
    """The repeated-random-token input and how it was sized."""

    input_ids: torch.Tensor
    """[1, prefix + block * repeats]"""
    block: int
    block_requested: int
    repeats: int
    prefix: int
    """1 with a BOS token in front, else 0."""
    shrunk: str | None
    """Why ``block`` is smaller than requested, or None."""


def razor_input(tokenizer: Any, config: Any, *, block: int, repeats: int, seed: int) -> RazorInput:
    """BOS + ``block`` random ids (no special tokens, no repeats within a block) x ``repeats``, sized to
    fit the model's ``max_position_embeddings`` (``block`` shrinks, and says so)."""
    if repeats < 2:
        raise RazorProfileError(f"repeats={repeats}: echo and induction need at least 2 copies of the block")
    if block < 2:
        raise RazorProfileError(f"block={block}: use a block of at least 2 tokens (the paper uses 2500)")
    config = text_config(config)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    prefix = 0 if bos is None else 1
    requested, shrunk = block, None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and prefix + block * repeats > limit:
        block = (limit - prefix) // repeats
        shrunk = (
            f"{prefix} + {requested} x {repeats} = {prefix + requested * repeats} tokens exceed the model's "
            f"max_position_embeddings {limit}; block shrunk to {block}"
        )
        if block < 2:
            raise RazorProfileError(
                f"the model's {limit} positions leave no room for {repeats} repeats; lower --repeats"
            )
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | ({bos} if bos is not None else set())
    candidates = torch.tensor([i for i in range(config.vocab_size) if i not in special])
    if block > len(candidates):
        raise RazorProfileError(
            f"block={block} exceeds the {len(candidates)} non-special token ids of the vocabulary; use a smaller --block"
        )
    generator = torch.Generator().manual_seed(seed)
    chunk = candidates[torch.randperm(len(candidates), generator=generator)[:block]]
    ids = torch.cat([torch.tensor([bos] if prefix else [], dtype=torch.long), chunk.repeat(repeats)])
    return RazorInput(ids.unsqueeze(0), block, requested, repeats, prefix, shrunk)


def echo_induction(probs: torch.Tensor, block: int, repeats: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (echo, induction) scores, float64 [heads], from attention probabilities
    [heads, T, T] (or [1, heads, T, T]) of the repeated input; see the module docstring."""
    if probs.dim() == 4:
        probs = probs[0]
    heads, length = probs.shape[0], probs.shape[-1]
    if length != prefix + block * repeats:
        raise ValueError(f"attention over {length} keys, expected {prefix} + {block} x {repeats}")
    echo = torch.zeros(heads, dtype=torch.float64, device=probs.device)
    induction = torch.zeros_like(echo)
    for k in range(1, repeats):
        # diagonal d holds probs[j + d, j]; keys j from the first block token on
        echo += torch.diagonal(probs, offset=-k * block, dim1=-2, dim2=-1)[:, prefix:].double().sum(-1)
        induction += torch.diagonal(probs, offset=-k * block + 1, dim1=-2, dim2=-1)[:, prefix + 1 :].double().sum(-1)
    positions = block * (repeats - 1)
    return (echo / positions).cpu(), (induction / positions).cpu()


def kv_max(scores: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """[layers, query heads] -> [layers, KV heads]: each KV head takes the max over its query heads."""
    layers, heads = scores.shape
    return scores.reshape(layers, num_kv_heads, heads // num_kv_heads).max(-1)


def top_count(ratio: float, total: int) -> int:
    """How many of ``total`` heads the top ``ratio`` keeps (rounded, at least 1 for a positive ratio)."""
    return 0 if ratio <= 0 else min(total, max(1, round(ratio * total)))


def top_union(
    induction: np.ndarray, echo: np.ndarray, induction_ratio: float, echo_ratio: float
) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """The top ``induction_ratio`` heads by induction plus the top ``echo_ratio`` by echo, ranked over
    all layers together; returns {layer: [heads]} and the counts and cut-off scores."""
    total = induction.size
    chosen: set[tuple[int, int]] = set()
    facts: dict[str, Any] = {}
    for name, scores, ratio in (("induction", induction, induction_ratio), ("echo", echo, echo_ratio)):
        count = top_count(ratio, total)
        order = np.argsort(-scores.ravel(), kind="stable")[:count]
        chosen |= {divmod(int(i), scores.shape[1]) for i in order}
        facts[f"n_{name}"] = count
        facts[f"{name}_cutoff"] = float(scores.ravel()[order[-1]]) if count else None
    selected: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        selected.setdefault(layer, []).append(head)
    facts["n_selected"] = len(chosen)
    return selected, facts


def profile(
    model: Any,
    tokenizer: Any,
    config: RazorHeadsConfig,
    *,
    model_id: str,
    output: Path | None = None,
    progress: bool = True,
) -> HeadArtifact:
    """Score every head's echo and induction on repeated random tokens and select RazorAttention's
    retrieval heads (KV-head level); write the artifact to ``output`` when given."""
    for name, ratio in (("induction_ratio", config.induction_ratio), ("echo_ratio", config.echo_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise RazorProfileError(f"{name}={ratio}: use a fraction of all KV heads in [0, 1] (paper: 0.14 and 0.01)")
    data = razor_input(tokenizer, model.config, block=config.block, repeats=config.repeats, seed=config.seed)
    if data.shrunk:
        log.warning(data.shrunk)
    run = ProfileRun(
        "razor-heads",
        model,
        config,
        model_id=model_id,
        output=output,
        progress=progress,
        data=digest(data.input_ids.tolist()),
    )
    shape = run.shape
    units = layer_scores(run, data)
    echo_q = np.array([units[f"layer {layer}"]["echo"] for layer in range(shape.num_layers)])
    induction_q = np.array([units[f"layer {layer}"]["induction"] for layer in range(shape.num_layers)])
    echo_kv, induction_kv = kv_max(echo_q, shape.num_kv_heads), kv_max(induction_q, shape.num_kv_heads)
    selected, facts = top_union(induction_kv, echo_kv, config.induction_ratio, config.echo_ratio)
    # one map for plots and ranking: >= 1 exactly where a head made either cut
    cut_i = max(facts["induction_cutoff"] or math.inf, 1e-12)
    cut_e = max(facts["echo_cutoff"] or math.inf, 1e-12)
    combined = np.maximum(induction_kv / cut_i, echo_kv / cut_e)
    rule = (
        f"top {config.induction_ratio:g} of all {induction_kv.size} KV heads by induction score ({facts['n_induction']}) "
        f"plus top {config.echo_ratio:g} by echo score ({facts['n_echo']}), ranked over all layers together; "
        f"KV-head score = max over its query heads; {facts['n_selected']} heads in the union. "
        f"scores = max(induction / {facts['induction_cutoff']:.4g}, echo / {facts['echo_cutoff'] or 0:.4g}), "
        ">= 1 exactly for the selected heads"
    )
    artifact = HeadArtifact(
        attnkit_version=attnkit.__version__,
        model_id=model_id,
        config_fingerprint=shape.fingerprint,
        method="razor",
        parameters={
            "block": data.block,
            "block_requested": data.block_requested,
            "block_shrunk": data.shrunk,
            "repeats": data.repeats,
            "bos_prefix": bool(data.prefix),
            "tokens": int(data.input_ids.shape[1]),
            "induction_ratio": config.induction_ratio,
            "echo_ratio": config.echo_ratio,
            **facts,
            "reduction": "max over the query heads of a KV head",
            "induction_kv": induction_kv.round(6).tolist(),
            "echo_kv": echo_kv.round(6).tolist(),
            "induction_query": induction_q.round(6).tolist(),
            "echo_query": echo_q.round(6).tolist(),
            "seconds": run.seconds(),
        },
        data=f"repeated random tokens: {'BOS + ' if data.prefix else ''}{data.block} ids x {data.repeats} (seed {config.seed})",
        samples=1,
        seed=config.seed,
        level="kv",
        scores=combined.round(6).tolist(),
        selection=Selection(rule=rule, heads=selected),
    )
    return run.save(artifact)


def layer_scores(run: ProfileRun, data: RazorInput) -> dict[str, dict[str, Any]]:
    """Every layer's echo and induction scores per query head, one unit ``layer i`` per layer."""
    units = {f"layer {layer}": layer for layer in range(run.shape.num_layers)}
    if all(key in run.done for key in units):
        return {key: run.done[key] for key in units}
    label = f"{data.input_ids.shape[1]} tokens, layers"
    scorer = LayerScorer(run, data)
    with torch.no_grad(), attention_probabilities(run.model, scorer):
        if tail_supported(run.model):
            return layer_by_layer(run, data, units, label, scorer)
        whole_model(run.model, data)  # every layer runs; a resumed run scores the unfinished ones
        return run.each(label, units, scorer.unit)


class LayerScorer:
    """Echo and induction scores of each unfinished layer, from the attention probabilities its
    attention module returns (:func:`attention_probabilities` calls it)."""

    def __init__(self, run: ProfileRun, data: RazorInput):
        self.run, self.data = run, data
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int, probs: torch.Tensor) -> None:
        if f"layer {layer}" not in self.run.done:
            self.scores[layer] = echo_induction(probs, self.data.block, self.data.repeats, self.data.prefix)

    def unit(self, layer: int) -> dict[str, Any]:
        """The finished layer's unit: its scores as lists."""
        echo, induction = self.scores.pop(layer)
        return {"echo": echo.tolist(), "induction": induction.tolist()}


def whole_model(model: Any, data: RazorInput) -> None:
    """One forward of the whole model on the repeated tokens (only the attention maps are used)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:  # full-vocabulary logits unused
        kwargs["logits_to_keep"] = 1
    model(input_ids=data.input_ids.to(model.device), **kwargs)


def layer_by_layer(
    run: ProfileRun, data: RazorInput, units: dict[str, int], label: str, scorer: LayerScorer
) -> dict[str, dict[str, Any]]:
    """Llama-family decoders: the layers one at a time, from the hidden state the last finished
    layer left (kept with its unit, so a resumed run starts there; the last layer's is not needed)."""
    model = run.model
    ids = data.input_ids.to(model.device)
    start = sum(key in run.done for key in units)  # layers finish in order
    hidden = run.done[f"layer {start - 1}"]["hidden"].to(model.device) if start else model.model.embed_tokens(ids)
    inputs = layer_inputs(model, hidden, None, torch.arange(ids.shape[1], device=model.device)[None])

    def layer_run(layer: int) -> dict[str, Any]:
        nonlocal hidden
        hidden = run_layer(model, layer, hidden, inputs)
        return {**scorer.unit(layer), **({"hidden": hidden} if layer + 1 < len(units) else {})}

    return run.each(label, units, layer_run, chained=True)
