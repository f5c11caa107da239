"""``attnkit profile kv-gates``: the KV heads that need the whole cache, found by training one gate each.

RazorAttention keeps some KV heads whole and gives every other head a few sink tokens and a
recent buffer. Which heads to keep whole is the whole question; the paper scores echo and
induction on repeated random tokens (``razor-heads``), the Retrieval Head paper scores copying
(``retrieval-heads``). This profiler asks the question directly, the way DuoAttention (Xiao et
al. 2024) finds its retrieval heads: one gate ``g`` in [0, 1] per KV head mixes that head's
attention over the whole cache (``g``) with its attention over the sinks and buffer only
(``1 - g``), and the gates are trained, with the model frozen, to keep the model's own
full-cache answers to needle prompts likely while their sum is penalised:

    loss = mean over prompts of NLL(reply tokens 2.. | prompt) + penalty * sum(g)

The prompt is prefilled once with the model's own attention (the first reply token is predicted
there, so it does not depend on the gates); the gates act on the reply tokens, which read the
prompt's cache as a compressed cache would be read while decoding. The gates are an attnkit method
(:class:`Gates`, applied through the engine): an output edit on every full-attention layer mixes
the backend's whole-cache output with the sink-and-buffer attention. Dropped tokens are simply
gone (razor's ``compensation: none``). Only full-attention layers are gated: razor leaves
sliding-window layers as they are. The heads with the largest gates are selected; the artifact
stores every gate and the answers' NLL with the selected heads whole, with none whole and with
all whole.

Progress: each needle prompt is a unit (its reply and token ids are kept), and every
``save_every`` training steps the gates and Adam's moments are kept, so an interrupted run
re-reads the prompts' caches (one prefill each) and trains on from the last saved step.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import attnkit
from attnkit import compat
from attnkit.engine.attach import Attachment
from attnkit.engine.plan import AttentionCall
from attnkit.handle import apply
from attnkit.heads import HeadArtifact, Selection, text_config
from attnkit.methods import Method
from attnkit.primitives import MASKED, additive_mask, layer_window, repeat_kv
from attnkit.probes.configs import KVGatesConfig, ProfileError
from attnkit.probes.razor_heads import top_count
from attnkit.probes.retrieval_heads import NeedleData, grid_problem, read
from attnkit.probes.run import ProfileRun
from attnkit.recipe.methods import razor_recent
from attnkit.tasks.needle import generate_replies, recall
from attnkit.tasks.result import uses_chat_template

__all__ = ["Gates", "KVGatesError", "profile", "read", "top_gates"]


class KVGatesError(ProfileError):
    """Settings or data the profile cannot use; the message names the fix."""


class Gates(Method):
    """One gate per KV head of the full-attention layers, as an (unregistered) attnkit method.

    On calls that read a cache (the reply after a prompt), an output edit on each gated layer
    returns ``g * full + (1 - g) * part``: ``full`` is the backend's attention over the whole cache,
    ``part`` the same heads' attention over razor's layout (``sink`` first tokens and the recent
    ``max(local, N / ratio)`` of the N cached tokens, plus the call's own). ``logits`` [layers, KV
    heads] are the trained parameters (``g = sigmoid(logits)``); ``fixed`` (0/1 per head) replaces
    ``g`` for a discrete evaluation.
    """

    name = "kv_gates"

    def __init__(self, config: KVGatesConfig, model_config: Any):
        super().__init__(config)
        cfg = text_config(model_config)
        self.gated = [layer_window(cfg, i) is None for i in range(cfg.num_hidden_layers)]
        self.logits = torch.full((cfg.num_hidden_layers, cfg.num_key_value_heads), 3.0, requires_grad=True)
        self.fixed: torch.Tensor | None = None

    def attach(self, at: Attachment) -> None:
        for layer, gated in enumerate(self.gated):
            if gated:
                at.output_edit(layer, self.mix)
        self.stats.describe("gated_kv_heads", sum(self.gated) * self.logits.shape[1])

    def zero_one(self, whole: list[tuple[int, int]]) -> torch.Tensor:
        """Gates of 1 for the ``whole`` (layer, KV head) pairs and 0 elsewhere, for ``fixed``."""
        fixed = torch.zeros(self.logits.shape)
        for layer, head in whole:
            fixed[layer, head] = 1.0
        return fixed

    def gates(self) -> torch.Tensor:
        return self.fixed if self.fixed is not None else torch.sigmoid(self.logits)

    def recent(self, length: int) -> int:
        """Razor's buffer L_h = max(local, ceil(N / ratio))."""
        return razor_recent(length, self.config.local, self.config.ratio)

    def mix(self, call: AttentionCall, full: torch.Tensor) -> torch.Tensor:
        """The gated output [batch, queries, heads, head_dim] of a call after a cached prompt; a
        prefill (nothing cached) keeps the backend's ``full`` output."""
        if call.state is None or call.state.phase == "prefill":
            return full
        prompt = call.state.past_length
        column = torch.arange(call.key.shape[-2], device=call.key.device)
        kept = (column < self.config.sink) | (column >= prompt - self.recent(prompt))
        part = kept_attention(call, kept)
        heads = call.query.shape[1]
        g = self.gates()[call.layer].to(full.dtype).repeat_interleave(heads // call.key.shape[1])
        g = g.view(1, 1, heads, 1)
        return g * full + (1 - g) * part


def kept_attention(call: AttentionCall, kept: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the keys the call's mask lets each query see and ``kept`` [keys]
    allows, times the values -> [batch, queries, heads, head_dim]."""
    groups = call.query.shape[1] // call.key.shape[1]
    scores = call.logits(call.query, repeat_kv(call.key, groups))
    mask = additive_mask(call.raw_mask, call.query, call.key)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores.masked_fill(~kept, MASKED), dim=-1).to(call.value.dtype)
    return torch.matmul(probs, repeat_kv(call.value, groups)).transpose(1, 2)


def answer_nll(model: Any, item: dict[str, Any]) -> torch.Tensor:
    """NLL of the reply's tokens after the first, read after the prompt's (copied) cache."""
    target = torch.tensor([item["target"]], device=model.device)
    cache = compat.cache_argument(model, copy.deepcopy(item["cache"]))
    logits = model(input_ids=target[:, :-1], use_cache=True, **cache).logits
    return F.cross_entropy(logits[0].float(), target[0, 1:], reduction="sum")


def profile(
    model: Any,
    tokenizer: Any,
    config: KVGatesConfig,
    data: NeedleData | None = None,
    *,
    model_id: str,
    output: Path | None = None,
    progress: bool = True,
) -> HeadArtifact:
    """Train one gate per KV head on needle prompts and keep the top ``fraction`` of KV heads whole
    (written to ``output`` when given)."""
    data = data or read(config)
    check(model, config)
    chat = uses_chat_template(tokenizer, "auto" if config.chat else False)
    run = ProfileRun("kv-gates", model, config, model_id=model_id, output=output, progress=progress, data=data.digest())
    items = needle_items(run, tokenizer, data, chat)
    if not items:
        raise KVGatesError(
            f"the model recalled none of the {len(data.needles) * len(config.lengths) * len(config.depths)} needle "
            f"prompts with its full cache (recall <= {config.min_recall}), so there is nothing to preserve; use "
            "shorter lengths or other needles"
        )
    gates = Gates(config, model.config)
    history = train(run, gates, items)
    scores = torch.sigmoid(gates.logits).detach()
    shape = run.shape
    flat = [
        (layer, head) for layer in range(shape.num_layers) for head in range(shape.num_kv_heads) if gates.gated[layer]
    ]
    count = top_count(config.fraction, len(flat))
    selected = top_gates(scores.tolist(), count, gates.gated)
    chosen = [(layer, head) for layer, heads in selected.items() for head in heads]
    nll = {
        name: evaluate(model, gates, items, whole)
        for name, whole in (("selected", chosen), ("none_whole", []), ("all_whole", flat))
    }
    buffer = f"max({config.local}, N/{config.ratio:g})" if config.ratio is not None else str(config.local)
    artifact = HeadArtifact(
        attnkit_version=attnkit.__version__,
        model_id=model_id,
        config_fingerprint=shape.fingerprint,
        method="kv-gates",
        parameters={
            "sink": config.sink,
            "local": config.local,
            "ratio": config.ratio,
            "fraction": config.fraction,
            "steps": config.steps,
            "penalty": config.penalty,
            "lr": config.lr,
            "reply_tokens": config.reply_tokens,
            "min_recall": config.min_recall,
            "lengths": list(config.lengths),
            "depths": list(config.depths),
            "needles": [asdict(n) for n in data.needles],
            "chat_template": chat,
            "template": config.template,
            "prompts": [{k: item[k] for k in ("needle", "length", "depth")} for item in items],
            "answer_nll": nll,
            "history": history,
            "seconds": run.seconds(),
        },
        data=data.source,
        samples=len(items),
        seed=None,
        level="kv",
        scores=scores.numpy().round(6).tolist(),
        selection=Selection(
            rule=f"top {config.fraction:g} of the {len(flat)} gated KV heads ({count}) by trained gate; others keep "
            f"{config.sink} sinks and the recent {buffer} tokens",
            heads=selected,
        ),
    )
    return run.save(artifact)


def top_gates(gates: list[list[float]], count: int, gated: list[bool] | None = None) -> dict[int, list[int]]:
    """{layer: [KV heads]} of the ``count`` largest gates (of the ``gated`` layers), ties to the earlier head."""
    flat = [
        (layer, head) for layer, row in enumerate(gates) for head in range(len(row)) if gated is None or gated[layer]
    ]
    selected: dict[int, list[int]] = {}
    for layer, head in sorted(sorted(flat, key=lambda lh: -gates[lh[0]][lh[1]])[:count]):
        selected.setdefault(layer, []).append(head)
    return selected


def check(model: Any, config: KVGatesConfig) -> None:
    """Refuse settings the profile cannot train with, naming the fix."""
    if not 0.0 < config.fraction <= 1.0:
        raise KVGatesError(
            f"fraction={config.fraction}: give the share of KV heads to keep whole, in (0, 1] (e.g. 0.2)"
        )
    if config.steps < 1 or config.reply_tokens < 2 or config.penalty < 0:
        raise KVGatesError(
            f"steps={config.steps}, reply_tokens={config.reply_tokens}, penalty={config.penalty}: use "
            "steps >= 1, reply_tokens >= 2 (the first token does not depend on the gates) and penalty >= 0"
        )
    if config.ratio is not None and config.ratio <= 1:
        raise KVGatesError(
            f"ratio={config.ratio}: the buffer is max(local, N / ratio), so use a ratio above 1 (or none: always local)"
        )
    problem = grid_problem(model, config.lengths, config.depths, config.reply_tokens, "reply_tokens")
    if problem:
        raise KVGatesError(problem)
    cfg = text_config(model.config)
    if not any(layer_window(cfg, i) is None for i in range(cfg.num_hidden_layers)):
        raise KVGatesError(
            "every layer of this model is a sliding-window layer; razor compresses full-attention layers only"
        )


def needle_items(run: ProfileRun, tokenizer: Any, data: NeedleData, chat: bool) -> list[dict[str, Any]]:
    """Needle prompts the full cache answers (recall above ``min_recall``), with that reply as target
    and the prompt's cache (one unit per prompt; a resumed run re-reads only the caches)."""
    model, config = run.model, run.config
    builders = data.builders(tokenizer, config, chat)

    def reply(cell: tuple[int, int, float]) -> dict[str, Any]:
        i, length, depth = cell
        needle = data.needles[i]
        prompt = builders[i].build(length, depth, needle.needle, needle.answer)
        text, _ = generate_replies(model, tokenizer, [prompt.input_ids], config.reply_tokens)[0]
        target = tokenizer(text, add_special_tokens=False)["input_ids"][: config.reply_tokens]
        usable = recall(text, needle.answer) > config.min_recall and len(target) >= 2
        return {
            "needle": i,
            "length": length,
            "depth": depth,
            "ids": prompt.input_ids if usable else None,
            "target": target,
        }

    units = run.each("full-cache replies", data.cells(config), reply)
    items = []
    with torch.no_grad():
        for unit in units.values():
            if unit["ids"] is not None:
                out = model(input_ids=torch.tensor([unit["ids"]], device=model.device), use_cache=True)
                items.append({**unit, "cache": compat.output_cache(out)})
    return items


def train(run: ProfileRun, gates: Gates, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adam on the gate logits, the model frozen; returns the loss history (one entry per step).

    Every ``save_every`` steps are one unit holding their history, the logits and Adam's state; a
    resumed run loads the last and trains on from there.
    """
    config, model = run.config, run.model
    optimizer = torch.optim.Adam([gates.logits], lr=config.lr)
    start = max((int(key.split()[1]) for key in run.done if key.startswith("step ")), default=0)
    if start:
        restore(gates, optimizer, run.done[f"step {start}"])
    ends = range(start + config.save_every, config.steps + config.save_every, config.save_every)
    blocks = {f"step {start}": None} if start else {}
    blocks |= {f"step {min(end, config.steps)}": (end - config.save_every, min(end, config.steps)) for end in ends}

    def block(span: tuple[int, int]) -> dict[str, Any]:
        history = [step(model, gates, optimizer, items, config.penalty, n) for n in range(*span)]
        return {"history": history, **snapshot(gates, optimizer)}

    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with apply(model, [gates]):
            run.each("training gates", blocks, block, chained=True)
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    ordered = sorted(
        (int(key.split()[1]), unit["history"]) for key, unit in run.done.items() if key.startswith("step ")
    )
    return [entry for _, history in ordered for entry in history]


def step(
    model: Any, gates: Gates, optimizer: torch.optim.Optimizer, items: list[dict[str, Any]], penalty: float, number: int
) -> dict[str, Any]:
    """One Adam step on every prompt's answer NLL (one graph at a time) plus the gate penalty."""
    optimizer.zero_grad()
    total = 0.0
    for item in items:
        nll = answer_nll(model, item) / len(items)
        nll.backward()
        total += nll.item()
    size = torch.sigmoid(gates.logits).sum()
    (penalty * size).backward()
    optimizer.step()
    return {"step": number, "nll": round(total, 4), "gate_sum": round(size.item(), 3)}


def snapshot(gates: Gates, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The gate logits and Adam's state for them, as tensors to keep."""
    state = optimizer.state[gates.logits]
    return {
        "logits": gates.logits.detach().clone(),
        "adam_step": state["step"].clone(),
        "exp_avg": state["exp_avg"].clone(),
        "exp_avg_sq": state["exp_avg_sq"].clone(),
    }


def restore(gates: Gates, optimizer: torch.optim.Optimizer, unit: dict[str, Any]) -> None:
    """Set the gate logits and Adam's state to a :func:`snapshot`."""
    with torch.no_grad():
        gates.logits.copy_(unit["logits"])
    state = {"step": unit["adam_step"], "exp_avg": unit["exp_avg"], "exp_avg_sq": unit["exp_avg_sq"]}
    optimizer.load_state_dict({"state": {0: state}, "param_groups": optimizer.state_dict()["param_groups"]})


def evaluate(model: Any, gates: Gates, items: list[dict[str, Any]], whole: list[tuple[int, int]]) -> float:
    """Mean answer NLL with exactly the ``whole`` heads reading the whole cache (gates 0/1)."""
    gates.fixed = gates.zero_one(whole)
    try:
        with apply(model, [gates]), torch.no_grad():
            return round(float(np.mean([answer_nll(model, item).item() for item in items])), 4)
    finally:
        gates.fixed = None
