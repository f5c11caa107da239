"""``attnkit profile conflict-heads``: memory heads and context heads by path patching (PH3).

For every (layer, head) the head's output (its slice of the ``o_proj`` input) is taken from a run on
a corrupted input and patched into the clean run while every other attention head keeps its clean
output; MLPs and norms are recomputed (IOI-style path patching with the logits as receiver). The
measured quantity is the logit difference at the answer position (the prompt's last token)::

    LD = logit(first token of the memory answer) - logit(first token of the context answer)
    score(layer, head) = mean over items of  LD(clean) - LD(head patched from the corrupted run)

``score > 0``: with the clean input, the head raises LD relative to its corrupted output, i.e. it
pushes toward the memory answer: a **memory head**. ``score < 0``: it pushes toward the context
answer: a **context head**. Corruptions: ``removed`` (default; the closed-book prompt without the
context) or ``swapped`` (the context with the context answer replaced by the memory answer).
``mode: ablation`` patches zeros instead of a corrupted output: a cheaper approximation (no
corrupted run) that measures each head's own contribution to LD with the others frozen; it is
exactly the frozen-others effect of the pruning PH3 applies.

Why it is cheap: once every attention block's output is frozen, positions no longer interact, so
only the answer position matters. Per item there is one clean forward and one corrupted forward
(batched across items) that record, at the last position, every layer's attention output,
``o_proj`` input and residual input; then ONE batched pass of length-1 rows, ``layers * heads + 1``
of them, in which a forward hook replaces each attention module's output by its recorded clean
value, except, in the patched head's layer, ``o_proj`` of the clean input with that head's slice
swapped (row 0 patches nothing and gives LD(clean) under the same arithmetic). On Llama-family
decoders a head of layer l runs from layer l on (it starts from the clean residual stream there)
and only the two answer logits are computed; elsewhere the whole model runs on the last token.
Tests check both equal a direct full-sequence recomputation, and plain activation patching in the
last layer. Items whose two answers start with the same token (LD = 0 by construction) are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm

import attnkit
from attnkit.engine.attach import attention_modules
from attnkit.heads import HeadArtifact, ModelShape, Selection
from attnkit.plots import head_map
from attnkit.probes.configs import ConflictHeadsConfig, Corruption, Mode, ProfileError, make_config
from attnkit.probes.layers import tail_supported
from attnkit.probes.run import ProfileRun, file_digest
from attnkit.recipe.tasks import ConflictTask
from attnkit.tasks.choice import left_pad
from attnkit.tasks.conflict import (
    ConflictItem,
    build_prompt,
    first_answer_tokens,
    load_conflict_items,
    prompt_text,
    swapped_context,
)
from attnkit.tasks.result import TaskDataError


@dataclass
class Prepared:
    """One usable item: token ids of the clean and corrupted prompts and the two answer tokens."""

    index: int
    clean: list[int]
    corrupt: list[int] | None
    memory_token: int
    context_token: int


def prepare(
    tokenizer: Any, task: ConflictTask, items: list[ConflictItem], corruption: Corruption, mode: Mode
) -> tuple[list[Prepared], dict[str, int]]:
    """Token ids per item, and how many items were skipped for which reason."""
    chat = task.chat_template
    special = not chat
    out, skipped = [], {}
    for index, item in enumerate(items):
        prompt = prompt_text(tokenizer, build_prompt(item, task, with_context=True), chat)
        clean, ctx_token, mem_token = first_answer_tokens(tokenizer, prompt, item, chat)
        if ctx_token == mem_token:
            skipped["same_first_token"] = skipped.get("same_first_token", 0) + 1
            continue
        corrupt = None
        if mode == "path":
            if corruption == "removed":
                text = build_prompt(item, task, with_context=False)
            else:
                swapped = swapped_context(item)
                if swapped is None:
                    skipped["context_answer_not_in_context"] = skipped.get("context_answer_not_in_context", 0) + 1
                    continue
                text = build_prompt(item, task, with_context=True, context=swapped)
            corrupt = tokenizer(prompt_text(tokenizer, text, chat), add_special_tokens=special)["input_ids"]
        out.append(Prepared(index, clean, corrupt, mem_token, ctx_token))
    return out, skipped


class Recorder:
    """Forward hooks that keep, at the last position, each layer's ``o_proj`` input and attention output."""

    def __init__(self, modules: dict[int, torch.nn.Module]):
        self.z: dict[int, torch.Tensor] = {}
        self.a: dict[int, torch.Tensor] = {}
        self.hooks = []
        for layer, module in modules.items():
            self.hooks.append(module.o_proj.register_forward_pre_hook(self._keep_z(layer)))
            self.hooks.append(module.register_forward_hook(self._keep_a(layer)))

    def _keep_z(self, layer: int):
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self.z[layer] = args[0][:, -1].detach()

        return hook

    def _keep_a(self, layer: int):
        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            self.a[layer] = (output[0] if isinstance(output, tuple) else output)[:, -1].detach()

        return hook

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` [batch, layers, heads * head_dim] and ``a`` [batch, layers, hidden]."""
        layers = sorted(self.z)
        return torch.stack([self.z[i] for i in layers], 1), torch.stack([self.a[i] for i in layers], 1)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def record_last(model: Any, sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """One left-padded forward: last-position ``z``, ``a``, logits, token and position of each row."""
    modules = attention_modules(model)
    ids, mask, positions = left_pad(sequences, pad_id)
    device = model.device
    recorder = Recorder(modules)
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                logits_to_keep=1,
                output_hidden_states=True,
            )
    finally:
        recorder.remove()
    z, a = recorder.stacked()
    layers = len(modules)
    resid = torch.stack([out.hidden_states[layer][:, -1] for layer in range(layers)], 1)
    return {
        "z": z,
        "a": a,
        "resid": resid,
        "logits": out.logits[:, -1],
        "token": ids[:, -1],
        "position": positions[:, -1],
    }


def frozen_logit_diffs(
    model: Any,
    token: int,
    position: int,
    z_clean: torch.Tensor,
    a_clean: torch.Tensor,
    z_ref: torch.Tensor,
    memory_token: int,
    context_token: int,
    resid: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """LD with every attention output frozen at its clean value, unpatched and for each head patched.

    ``z_clean``/``z_ref`` [layers, heads * head_dim] are the ``o_proj`` inputs of the clean and the
    reference (corrupted, or zeros) run at the answer position, ``a_clean`` [layers, hidden] the clean
    attention outputs. Returns LD(unpatched) and LD(patched) as a [layers, heads] tensor.

    With ``resid`` (the clean residual stream entering each layer at the answer position) and a
    Llama-family decoder, a head of layer l is run from layer l on only (below it nothing differs
    from the clean run), and only the two answer logits are computed: about 2.5x less work. Otherwise
    one forward of the whole model on a length-1 input, batch ``layers * heads + 1``.
    """
    shape = ModelShape.from_config(model.config)
    layers, heads, dim = shape.num_layers, shape.num_heads, shape.head_dim
    select = torch.zeros(heads, heads * dim, dtype=torch.bool, device=z_clean.device)
    for head in range(heads):
        select[head, head * dim : (head + 1) * dim] = True
    if resid is not None and tail_supported(model):
        ld = _tail_logit_diffs(model, position, z_clean, a_clean, z_ref, resid, select, memory_token, context_token)
    else:
        ld = _full_logit_diffs(model, token, position, z_clean, a_clean, z_ref, select, memory_token, context_token)
    return ld[0].item(), ld[1:].view(layers, heads)


def _patched_output(
    module: torch.nn.Module,
    layer: int,
    z_clean: torch.Tensor,
    z_ref: torch.Tensor,
    select: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """o_proj of the clean input with each head's slice in turn taken from the reference: [heads, hidden]."""
    patched_z = torch.where(select, z_ref[layer], z_clean[layer])
    return module.o_proj(patched_z.to(dtype)).to(dtype)


def _full_logit_diffs(
    model: Any,
    token: int,
    position: int,
    z_clean: torch.Tensor,
    a_clean: torch.Tensor,
    z_ref: torch.Tensor,
    select: torch.Tensor,
    memory_token: int,
    context_token: int,
) -> torch.Tensor:
    """Any architecture: one whole-model forward of the last token, every attention output replaced."""
    modules = attention_modules(model)
    heads = select.shape[0]
    n = len(modules) * heads + 1

    def freeze(layer: int):
        def hook(module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            first = output[0] if isinstance(output, tuple) else output
            frozen = a_clean[layer].to(first.dtype).expand(n, 1, -1).clone()
            rows = slice(1 + layer * heads, 1 + (layer + 1) * heads)
            frozen[rows, 0] = _patched_output(module, layer, z_clean, z_ref, select, first.dtype)
            return (frozen, *output[1:]) if isinstance(output, tuple) else frozen

        return hook

    hooks = [module.register_forward_hook(freeze(layer)) for layer, module in modules.items()]
    device = model.device
    try:
        with torch.no_grad():
            logits = (
                model(
                    input_ids=torch.full((n, 1), token, device=device),
                    position_ids=torch.full((n, 1), position, device=device),
                    use_cache=False,
                    logits_to_keep=1,
                )
                .logits[:, -1]
                .double()
            )
    finally:
        for hook in hooks:
            hook.remove()
    return (logits[:, memory_token] - logits[:, context_token]).cpu()


def _tail_logit_diffs(
    model: Any,
    position: int,
    z_clean: torch.Tensor,
    a_clean: torch.Tensor,
    z_ref: torch.Tensor,
    resid: torch.Tensor,
    select: torch.Tensor,
    memory_token: int,
    context_token: int,
) -> torch.Tensor:
    """Llama-family decoders: rows join at their patched layer from the clean residual stream.

    Row 0 (unpatched) runs from layer 0; before layer l the heads-of-layer-l rows are appended,
    starting from the clean residual entering layer l. Each decoder layer runs with its attention
    module's output replaced (forward hook), so norms and MLPs are the model's own.
    """
    modules = attention_modules(model)
    decoder = model.model
    heads = select.shape[0]
    device = model.device
    dtype = resid.dtype
    state: dict[str, int] = {}

    def freeze(layer: int):
        def hook(module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            first = output[0] if isinstance(output, tuple) else output
            frozen = a_clean[layer].to(first.dtype).expand(state["rows"], 1, -1).clone()
            frozen[-heads:, 0] = _patched_output(module, layer, z_clean, z_ref, select, first.dtype)
            return (frozen, *output[1:]) if isinstance(output, tuple) else frozen

        return hook

    hooks = [module.register_forward_hook(freeze(layer)) for layer, module in modules.items()]
    try:
        with torch.no_grad():
            hidden = resid[0].to(device)[None, None]
            for layer, block in enumerate(decoder.layers):
                hidden = torch.cat([hidden, resid[layer].to(device).expand(heads, 1, -1)], 0)
                state["rows"] = hidden.shape[0]
                positions = torch.full((hidden.shape[0], 1), position, device=device)
                rope = decoder.rotary_emb(hidden, position_ids=positions)
                hidden = block(hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            final = decoder.norm(hidden[:, -1])
            head = model.lm_head
            weight = head.weight[[memory_token, context_token]]
            logits = final @ weight.T.to(dtype)
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[[memory_token, context_token]]
    finally:
        for hook in hooks:
            hook.remove()
    logits = logits.double().cpu()
    return logits[:, 0] - logits[:, 1]


def rankings(scores: list[list[float]]) -> tuple[list[list[float]], list[list[float]]]:
    """Memory heads (score > 0, strongest first) and context heads (score < 0, most negative first),
    each as ``[layer, head, score]``."""
    flat = [(layer, head, s) for layer, row in enumerate(scores) for head, s in enumerate(row)]
    memory = sorted((h for h in flat if h[2] > 0), key=lambda h: -h[2])
    context = sorted((h for h in flat if h[2] < 0), key=lambda h: h[2])
    return [list(h) for h in memory], [list(h) for h in context]


def profile(
    model: Any,
    tokenizer: Any,
    config: ConflictHeadsConfig,
    *,
    model_id: str,
    output: Path | None = None,
    progress: bool = True,
) -> HeadArtifact:
    """Score every head on ``config.data`` (conflict JSONL) by path patching; write (to ``output``,
    when given) and return the artifact.

    The artifact's ``scores`` is the full layers x heads matrix, ``parameters`` holds both rankings
    (``memory_heads``, ``context_heads``), and the selection is the ``select`` strongest memory heads.
    """
    task = make_config(
        ConflictTask,
        ProfileError,
        data=str(config.data),
        limit=config.limit,
        template=config.template,
        closed_book_template=config.closed_book_template,
        chat_template=config.chat_template,
    )
    run = ProfileRun(
        "conflict-heads",
        model,
        config,
        model_id=model_id,
        output=output,
        progress=progress,
        data=file_digest(config.data),
    )
    items = load_conflict_items(task)
    prepared, skipped = prepare(tokenizer, task, items, config.corruption, config.mode)
    if not prepared:
        raise TaskDataError(
            f"{config.data}: none of the {len(items)} items is usable ({skipped}); "
            "check that the two answers start with different tokens"
        )
    tail = config.tail and tail_supported(model)
    timings, scored = score_items(run, tokenizer, prepared, tail)
    done = [run.done[str(p.index)] for p in prepared]
    scores_t = torch.tensor([d["scores"] for d in done], dtype=torch.float64)
    scores = scores_t.mean(0).tolist()
    memory, context = rankings(scores)
    selected: dict[int, list[int]] = {}
    for layer, head, _ in memory[: config.select]:
        selected.setdefault(int(layer), []).append(int(head))
    for heads in selected.values():
        heads.sort()
    mode = config.mode
    what = "path patching" if mode == "path" else "single-head ablation to zeros (cheaper approximation)"
    rule = (
        f"the {min(config.select, len(memory))} strongest memory heads (largest score = LD(clean) - LD(patched), "
        f"LD = logit(memory answer) - logit(context answer)); {what}, corruption {config.corruption!r}"
    )
    lds = [d["ld"] for d in done]
    artifact = HeadArtifact(
        attnkit_version=attnkit.__version__,
        model_id=model_id,
        config_fingerprint=run.shape.fingerprint,
        method="conflict-heads",
        parameters={
            "mode": mode,
            "corruption": config.corruption if mode == "path" else None,
            "score": "mean over items of LD(clean) - LD(head patched), LD = logit(memory) - logit(context) at the "
            "answer position; > 0 memory head, < 0 context head",
            "memory_heads": memory,
            "context_heads": context,
            "items_used": len(done),
            "items_skipped": skipped,
            "ld_clean_mean": sum(lds) / len(lds),
            "score_std_over_items": scores_t.std(0).tolist() if len(done) > 1 else None,
            "max_abs_ld_frozen_vs_full_forward": max(abs(d["ld"] - d["ld_full_forward"]) for d in done),
            "template": task.template,
            "closed_book_template": task.closed_book_template,
            "chat_template": task.chat_template,
            "batch_size": config.batch_size,
            "layer_tails": tail,
            "seconds": run.seconds(),
            "stage_seconds_this_run": {k: round(v, 1) for k, v in timings.items()},
            "resumed_items": len(prepared) - scored,
        },
        data=str(config.data),
        samples=len(done),
        seed=None,
        scores=scores,
        selection=Selection(rule=rule, heads=selected),
    )
    return run.save(artifact)


def score_items(run: ProfileRun, tokenizer: Any, prepared: list[Prepared], tail: bool) -> tuple[dict[str, float], int]:
    """Score the unfinished items, recording each as it finishes; returns the seconds per stage and
    how many items were scored. Items are batched by length, ``batch_size`` at a time (one clean
    and one corrupted forward per batch); a batch keeps its items when a run resumes, so its
    padding, and every score, is that of an uninterrupted run."""
    model, config = run.model, run.config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    timings = {"clean_and_corrupted_forwards": 0.0, "patched_forwards": 0.0}
    ordered = sorted(prepared, key=lambda p: len(p.clean))
    todo = [p for p in ordered if str(p.index) not in run.done]
    with run.bar("items", len(prepared), len(prepared) - len(todo)) as advance:
        for at in range(0, len(ordered), config.batch_size):
            chunk = ordered[at : at + config.batch_size]
            rows = [row for row, item in enumerate(chunk) if str(item.index) not in run.done]
            if not rows:
                continue
            tick = time.perf_counter()
            clean = record_last(model, [p.clean for p in chunk], pad)
            corrupt = record_last(model, [p.corrupt for p in chunk], pad) if config.mode == "path" else None
            timings["clean_and_corrupted_forwards"] += time.perf_counter() - tick
            tick = time.perf_counter()
            for row in rows:
                item = chunk[row]
                z_ref = corrupt["z"][row] if corrupt is not None else torch.zeros_like(clean["z"][row])
                ld_clean, ld_patched = frozen_logit_diffs(
                    model,
                    int(clean["token"][row]),
                    int(clean["position"][row]),
                    clean["z"][row],
                    clean["a"][row],
                    z_ref,
                    item.memory_token,
                    item.context_token,
                    resid=clean["resid"][row] if tail else None,
                )
                logits = clean["logits"][row].double()
                ld_full = (logits[item.memory_token] - logits[item.context_token]).item()
                run.record.record(
                    str(item.index),
                    {"ld": ld_clean, "ld_full_forward": ld_full, "scores": (ld_clean - ld_patched).tolist()},
                )
                advance(1)
            timings["patched_forwards"] += time.perf_counter() - tick
    return timings, len(todo)


def plot_conflict_heads(artifact: HeadArtifact, path: Path, title: str) -> None:
    """The layers x heads effect map: red = memory heads (score > 0), blue = context heads."""
    scores = np.asarray(artifact.scores, dtype=float)
    bound = max(1e-6, float(np.abs(scores).max()))
    head_map(
        scores,
        path,
        title=title,
        cbar_label="LD(clean) - LD(patched)  (+ memory, - context)",
        norm=TwoSlopeNorm(0.0, -bound, bound),
        cmap="RdBu_r",
    )
