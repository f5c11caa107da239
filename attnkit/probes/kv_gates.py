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
prompt's cache as a compressed cache would be read while decoding. Dropped tokens are simply gone
(razor's ``compensation: none``). Only full-attention layers are gated: razor leaves sliding-window
layers as they are. The heads with the largest gates are selected; the artifact stores every
gate and the answers' NLL with the selected heads whole, with none whole and with all whole.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import attnkit
from attnkit import compat
from attnkit.heads import HeadArtifact, ModelShape, Selection, text_config
from attnkit.primitives import MASKED, layer_window
from attnkit.primitives import logits as attention_logits
from attnkit.probes.razor_heads import top_count
from attnkit.probes.retrieval_heads import DEFAULT_NEEDLES, Needle, grid_problem
from attnkit.tasks.needle import PromptBuilder, generate_replies, recall
from attnkit.tasks.result import progress_bar

__all__ = ["GatedAttention", "KVGatesError", "profile_kv_gates", "top_gates"]

NAME = "attnkit_kv_gates"


class KVGatesError(ValueError):
    """Settings or data the profile cannot use; the message names the fix."""


class GatedAttention:
    """The gated attention of one profile: gate logits per (layer, KV head) and the razor layout.

    ``fixed`` (0/1 per head) replaces the sigmoid of the logits for a discrete evaluation.
    """

    def __init__(self, config: Any, sink: int, local: int, ratio: float | None):
        cfg = text_config(config)
        self.gated = [layer_window(cfg, i) is None for i in range(cfg.num_hidden_layers)]
        self.logits = torch.full((cfg.num_hidden_layers, cfg.num_key_value_heads), 3.0, requires_grad=True)
        self.fixed: torch.Tensor | None = None
        self.sink, self.local, self.ratio = sink, local, ratio
        self.prompt_length = 0

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
        return self.local if self.ratio is None else max(self.local, math.ceil(length / self.ratio))

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers' attention signature; queries [b, h, q, d] after a prompt of ``prompt_length``."""
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        b, heads, q_len, _ = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        group = heads // kv_heads
        folded = query.reshape(b, kv_heads, group * q_len, -1)
        logits = attention_logits(folded, key, scaling, kwargs.get("softcap")).view(b, kv_heads, group, q_len, k_len)
        column = torch.arange(k_len, device=query.device)
        visible = column <= torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # None: plain causal
        if attention_mask is not None:
            visible = attention_mask[:, :, None, :, -k_len:].bool() if attention_mask.dtype == torch.bool \
                else attention_mask[:, :, None, :, -k_len:] == 0  # fmt: skip
        full = self.read(logits, visible, value)
        if not self.gated[module.layer_idx] or q_len == k_len:
            return full, None
        kept = (column < self.sink) | (column >= self.prompt_length - self.recent(self.prompt_length))
        part = self.read(logits, visible & kept, value)
        g = self.gates()[module.layer_idx].to(full.dtype).repeat_interleave(group).view(1, 1, heads, 1)
        return g * full + (1 - g) * part, None

    @staticmethod
    def read(logits: torch.Tensor, visible: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Softmax over the visible keys, times the values -> [b, q, heads, d]."""
        b, kv_heads, group, q_len, k_len = logits.shape
        probs = torch.softmax(logits.masked_fill(~visible, MASKED), dim=-1).to(value.dtype)
        out = torch.matmul(probs.view(b, kv_heads, group * q_len, k_len), value)
        return out.view(b, kv_heads * group, q_len, -1).transpose(1, 2)


def answer_nll(model: Any, gated: GatedAttention, item: dict[str, Any]) -> torch.Tensor:
    """NLL of the reply's tokens after the first, read after the prompt's (copied) cache."""
    gated.prompt_length = len(item["ids"])
    target = torch.tensor([item["target"]], device=model.device)
    logits = model(input_ids=target[:, :-1], use_cache=True, **compat.cache_argument(model, copy.deepcopy(item["cache"]))).logits
    return F.cross_entropy(logits[0].float(), target[0, 1:], reduction="sum")


def profile_kv_gates(
    model: Any,
    tokenizer: Any,
    haystack: str,
    *,
    model_id: str,
    output: Path | None = None,
    lengths: list[int] = (1000, 2000),  # type: ignore[assignment]
    depths: list[float] = (0.2, 0.5, 0.8),  # type: ignore[assignment]
    needles: list[Needle] = DEFAULT_NEEDLES,  # type: ignore[assignment]
    sink: int = 4,
    local: int = 64,
    ratio: float | None = 16.0,
    fraction: float = 0.2,
    steps: int = 150,
    penalty: float = 0.05,
    lr: float = 0.1,
    reply_tokens: int = 16,
    min_recall: float = 0.5,
    chat: bool = True,
    template: str = "{context}\n\n{question}",
    data: str = "",
    progress: bool = True,
) -> HeadArtifact:
    """Train one gate per KV head on needle prompts and keep the top ``fraction`` of KV heads whole
    (written to ``output`` when given)."""
    check(model, lengths, depths, fraction, steps, reply_tokens, penalty, ratio)
    shape = ModelShape.from_config(model.config, model_id)
    start = time.perf_counter()
    items = needle_items(model, tokenizer, haystack, lengths, depths, needles, reply_tokens, min_recall, chat, template, progress)
    if not items:
        raise KVGatesError(
            f"the model recalled none of the {len(needles) * len(lengths) * len(depths)} needle prompts with its full "
            f"cache (recall <= {min_recall}), so there is nothing to preserve; use shorter lengths or other needles"
        )
    gated = GatedAttention(model.config, sink, local, ratio)
    history = train(model, gated, items, steps, penalty, lr, progress)
    gates = torch.sigmoid(gated.logits).detach()
    flat = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_kv_heads) if gated.gated[layer]]
    count = top_count(fraction, len(flat))
    selected = top_gates(gates.tolist(), count, gated.gated)
    chosen = [(layer, head) for layer, heads in selected.items() for head in heads]
    nll = {name: evaluate(model, gated, items, whole) for name, whole in
           (("selected", chosen), ("none_whole", []), ("all_whole", flat))}  # fmt: skip
    buffer = f"max({local}, N/{ratio:g})" if ratio is not None else str(local)
    artifact = HeadArtifact(
        attnkit_version=attnkit.__version__,
        model_id=model_id,
        config_fingerprint=shape.fingerprint,
        method="kv-gates",
        parameters={
            "sink": sink, "local": local, "ratio": ratio, "fraction": fraction, "steps": steps, "penalty": penalty,
            "lr": lr, "reply_tokens": reply_tokens, "min_recall": min_recall, "lengths": list(lengths),
            "depths": list(depths), "needles": [asdict(n) for n in needles], "chat_template": chat, "template": template,
            "prompts": [{k: item[k] for k in ("needle", "length", "depth")} for item in items],
            "answer_nll": nll, "history": history, "seconds": round(time.perf_counter() - start, 1),
        },  # fmt: skip
        data=data,
        samples=len(items),
        seed=None,
        level="kv",
        scores=gates.numpy().round(6).tolist(),
        selection=Selection(
            rule=f"top {fraction:g} of the {len(flat)} gated KV heads ({count}) by trained gate; others keep {sink} sinks "
            f"and the recent {buffer} tokens",
            heads=selected,
        ),
    )
    if output is not None:
        artifact.save(output)
    return artifact


def top_gates(gates: list[list[float]], count: int, gated: list[bool] | None = None) -> dict[int, list[int]]:
    """{layer: [KV heads]} of the ``count`` largest gates (of the ``gated`` layers), ties to the earlier head."""
    flat = [(layer, head) for layer, row in enumerate(gates) for head in range(len(row)) if gated is None or gated[layer]]
    selected: dict[int, list[int]] = {}
    for layer, head in sorted(sorted(flat, key=lambda lh: -gates[lh[0]][lh[1]])[:count]):
        selected.setdefault(layer, []).append(head)
    return selected


def check(model: Any, lengths: list[int], depths: list[float], fraction: float, steps: int, reply_tokens: int,
          penalty: float, ratio: float | None) -> None:
    if not 0.0 < fraction <= 1.0:
        raise KVGatesError(f"fraction={fraction}: give the share of KV heads to keep whole, in (0, 1] (e.g. 0.2)")
    if steps < 1 or reply_tokens < 2 or penalty < 0:
        raise KVGatesError(f"steps={steps}, reply_tokens={reply_tokens}, penalty={penalty}: use steps >= 1, "
                           "reply_tokens >= 2 (the first token does not depend on the gates) and penalty >= 0")  # fmt: skip
    if ratio is not None and ratio <= 1:
        raise KVGatesError(f"ratio={ratio}: the buffer is max(local, N / ratio), so use a ratio above 1 (or none: always local)")
    if not lengths or not depths:
        raise KVGatesError("give at least one length and one depth")
    problem = grid_problem(model, lengths, depths, reply_tokens, "reply_tokens")
    if problem:
        raise KVGatesError(problem)
    cfg = text_config(model.config)
    if not any(layer_window(cfg, i) is None for i in range(cfg.num_hidden_layers)):
        raise KVGatesError("every layer of this model is a sliding-window layer; razor compresses full-attention layers only")


def needle_items(model, tokenizer, haystack, lengths, depths, needles, reply_tokens, min_recall, chat, template, progress) -> list[dict]:
    """Needle prompts the full cache answers (recall above ``min_recall``), with that reply as target and the prompt's cache."""
    items = []
    cells = [(i, length, depth) for i in range(len(needles)) for length in lengths for depth in depths]
    builders = [PromptBuilder(tokenizer, haystack, question=n.question, template=template, chat=chat) for n in needles]
    with progress_bar("kv-gates: full-cache replies", len(cells), progress) as advance:
        for i, length, depth in cells:
            prompt = builders[i].build(length, depth, needles[i].needle, needles[i].answer)
            reply, _ = generate_replies(model, tokenizer, [prompt.input_ids], reply_tokens)[0]
            target = tokenizer(reply, add_special_tokens=False)["input_ids"][:reply_tokens]
            if recall(reply, needles[i].answer) > min_recall and len(target) >= 2:
                with torch.no_grad():
                    out = model(input_ids=torch.tensor([prompt.input_ids], device=model.device), use_cache=True)
                items.append({"needle": i, "length": length, "depth": depth, "ids": prompt.input_ids,
                              "target": target, "cache": compat.output_cache(out)})  # fmt: skip
            advance(1)
    return items


class gated_model:
    """Context: the model's attention is ``gated`` (registered under its own name), restored on exit."""

    def __init__(self, model: Any, gated: GatedAttention):
        self.model, self.gated = model, gated

    def __enter__(self) -> None:
        self.previous = compat.attn_implementation(self.model.config)
        compat.AttentionInterface.register(NAME, self.gated)
        compat.AttentionMaskInterface.register(NAME, compat.sdpa_mask)
        self.model.set_attn_implementation(NAME)

    def __exit__(self, *exc: Any) -> None:
        self.model.set_attn_implementation(self.previous)


def train(model: Any, gated: GatedAttention, items: list[dict], steps: int, penalty: float, lr: float, progress: bool) -> list[dict]:
    """Adam on the gate logits; returns the loss history (one entry per step)."""
    optimizer = torch.optim.Adam([gated.logits], lr=lr)
    history = []
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with gated_model(model, gated), progress_bar("kv-gates: training gates", steps, progress) as advance:
            for step in range(steps):
                optimizer.zero_grad()
                total = 0.0
                for item in items:  # one graph at a time: memory of one prompt
                    nll = answer_nll(model, gated, item) / len(items)
                    nll.backward()
                    total += nll.item()
                size = torch.sigmoid(gated.logits).sum()
                (penalty * size).backward()
                optimizer.step()
                history.append({"step": step, "nll": round(total, 4), "gate_sum": round(size.item(), 3)})
                advance(1)
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return history


def evaluate(model: Any, gated: GatedAttention, items: list[dict], whole: list[tuple[int, int]]) -> float:
    """Mean answer NLL with exactly the ``whole`` heads reading the whole cache (gates 0/1)."""
    gated.fixed = gated.zero_one(whole)
    try:
        with gated_model(model, gated), torch.no_grad():
            return round(float(np.mean([answer_nll(model, gated, item).item() for item in items])), 4)
    finally:
        gated.fixed = None
