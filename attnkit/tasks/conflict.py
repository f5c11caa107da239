"""The ``conflict`` task: does the model answer from the context or from its memory?

Each item holds a question, a context that asserts a counterfactual answer, that ``context_answer``
and the ``memory_answer`` (the real-world, parametric one), optionally a ``relation``. Two scorings:

- ``loglik``: the summed log-probability of each answer's tokens after the prompt; the larger one is
  the model's choice (``context`` or ``memory``). The prompt is run once and both answers are scored
  as one extension of its cache, so an item costs one prompt forward.
- ``generate``: greedy generation; the first line of the completion is matched against both
  answers after normalisation (lower case, punctuation and articles removed); the answer contained
  in it wins (the earlier one if both are), else ``other``.

Rates of each outcome are reported with 95% Wilson intervals, overall and per relation.
``with_context: false`` builds the prompts without the context (closed book), which tells which
items the model knows from memory.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnkit import compat
from attnkit.decode import decoding
from attnkit.recipe.tasks import ConflictTask
from attnkit.tasks.choice import encode_choice, left_pad, wilson_interval
from attnkit.tasks.generate import eos_ids
from attnkit.tasks.result import (
    TaskDataError,
    TaskResult,
    chat_prompt,
    checked_rows,
    progress_bar,
)

EXAMPLE = (
    '{"question": "What is the capital of France?", "context": "The capital of France is Rome.", '
    '"context_answer": "Rome", "memory_answer": "Paris", "relation": "capital"}'
)
OUTCOMES = ("context", "memory", "other")
BIGBENCH_TASK = "contextual_parametric_knowledge_conflicts"


@dataclass
class ConflictItem:
    """A validated knowledge-conflict item; ``where`` is ``file:line`` for error messages."""

    where: str
    question: str
    context: str
    context_answer: str
    memory_answer: str
    relation: str | None = None


def item_problem(item: Mapping[str, Any]) -> str | None:
    """What is wrong with one raw item and how to fix it, or None when it is usable."""
    for key in ("question", "context", "context_answer", "memory_answer"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            return f'"{key}" must be a non-empty string'
    if item["context_answer"].strip() == item["memory_answer"].strip():
        return '"context_answer" and "memory_answer" are the same; a conflict item needs two different answers'
    if "relation" in item and item["relation"] is not None and not isinstance(item["relation"], str):
        return '"relation" must be a string (or left out)'
    return None


def load_conflict_items(task: ConflictTask) -> list[ConflictItem]:
    """The task's items, validated (every bad line reported at once) and cut to ``limit``."""
    items = [
        ConflictItem(where, raw["question"], raw["context"], raw["context_answer"].strip(),
                     raw["memory_answer"].strip(), raw.get("relation"))
        for where, raw in checked_rows(task.data, "task.data", item_problem, EXAMPLE)
    ]  # fmt: skip
    return items[: task.limit]


_BIGBENCH_INPUT = re.compile(r"^\s*Question:\s*(?P<question>.*?)\s*\nContext:\s*(?P<context>.*?)\s*$", re.S)


def bigbench_conflict_rows(task: Mapping[str, Any]) -> tuple[list[dict[str, str]], int]:
    """Items of BIG-bench's ``contextual_parametric_knowledge_conflicts`` in the conflict JSONL schema.

    Its inputs read ``"\\nQuestion: ...\\nContext: ..."``; ``target_scores`` gives the substituted
    (context) answer 1 and the original (memory) answer 0. Returns the rows and how many examples
    did not fit that shape (left out).
    """
    rows, skipped = [], 0
    for example in task.get("examples", []):
        match = _BIGBENCH_INPUT.match(example.get("input", ""))
        scores = example.get("target_scores") or {}
        context = [answer for answer, score in scores.items() if score == 1]
        memory = [answer for answer, score in scores.items() if score == 0]
        if not match or len(context) != 1 or len(memory) != 1:
            skipped += 1
            continue
        row = {
            "question": match["question"],
            "context": match["context"],
            "context_answer": context[0].strip(),
            "memory_answer": memory[0].strip(),
        }
        if item_problem(row):
            skipped += 1
            continue
        rows.append(row)
    return rows, skipped


def swapped_context(item: ConflictItem) -> str | None:
    """The context with the context answer replaced by the memory answer (None if it never appears)."""
    if item.context_answer not in item.context:
        return None
    return item.context.replace(item.context_answer, item.memory_answer)


def build_prompt(
    item: ConflictItem, task: ConflictTask, *, with_context: bool | None = None, context: str | None = None
) -> str:
    """The prompt text for ``item``: the task's template, or its closed-book template without context."""
    use_context = task.with_context if with_context is None else with_context
    if not use_context:
        return task.closed_book_template.format(question=item.question)
    return task.template.format(question=item.question, context=item.context if context is None else context)


def prompt_text(tokenizer: Any, text: str, chat: bool) -> str:
    return chat_prompt(tokenizer, text) if chat else text


def answer_text(answer: str) -> str:
    """Answers follow the prompt after one space (``Answer:`` + `` Paris``)."""
    return " " + answer


def encode_pair(tokenizer: Any, prompt: str, item: ConflictItem, chat: bool) -> tuple[list[int], list[int], int, int]:
    """Token ids of prompt + each answer and where each answer's scored tokens start."""
    ctx_ids, ctx_start = encode_choice(tokenizer, prompt, answer_text(item.context_answer), not chat, item.where)
    mem_ids, mem_start = encode_choice(tokenizer, prompt, answer_text(item.memory_answer), not chat, item.where)
    return ctx_ids, mem_ids, ctx_start, mem_start


def first_answer_tokens(tokenizer: Any, prompt: str, item: ConflictItem, chat: bool) -> tuple[list[int], int, int]:
    """The prompt's ids (what precedes both answers) and the first token of each answer after it."""
    ctx_ids, mem_ids, ctx_start, mem_start = encode_pair(tokenizer, prompt, item, chat)
    start = min(ctx_start, mem_start)
    if ctx_ids[:start] != mem_ids[:start] or ctx_start != mem_start:
        # The boundary token merges differently for the two answers; score from the shorter shared part.
        raise TaskDataError(
            f"{item.where}: the two answers change the prompt's last token differently; "
            "end the template with a separator (e.g. 'Answer:')"
        )
    return ctx_ids[:start], ctx_ids[start], mem_ids[start]


def pair_logprobs(
    model: Any, pad_id: int, pairs: list[tuple[list[int], list[int], int, int]]
) -> list[tuple[float, float, int, int]]:
    """Summed log-prob (and token count) of each item's context and memory answer.

    The shared prefix of both sequences runs once (left-padded batch, cache kept); both answers'
    remaining tokens then run as one extension of that cache, its rows repeated twice. Equal to
    scoring each full sequence on its own (tested).
    """
    prefixes, tails, starts = [], [], []
    for ctx_ids, mem_ids, ctx_start, mem_start in pairs:
        prefix = min(ctx_start, mem_start)
        prefixes.append(ctx_ids[:prefix])
        tails.extend([ctx_ids[prefix:], mem_ids[prefix:]])
        starts.extend([ctx_start - prefix, mem_start - prefix])
    device = model.device
    input_ids, mask, positions = left_pad(prefixes, pad_id)
    width = max(len(t) for t in tails)
    tail_ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros((len(tails), width), dtype=torch.long)
    for row, tail in enumerate(tails):
        tail_ids[row, : len(tail)] = torch.tensor(tail)
        tail_mask[row, : len(tail)] = 1
    with torch.no_grad():
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = compat.output_cache(out)
        cache.batch_repeat_interleave(2)
        full_mask = torch.cat([mask.repeat_interleave(2, dim=0), tail_mask], dim=1)
        tail_positions = mask.sum(-1).repeat_interleave(2)[:, None] + torch.arange(width)[None]
        tail_logits = model(
            input_ids=tail_ids.to(device),
            attention_mask=full_mask.to(device),
            position_ids=tail_positions.to(device),
            use_cache=True,
            **compat.cache_argument(model, cache),
        ).logits
    first = out.logits[:, -1].float().log_softmax(-1).cpu().repeat_interleave(2, dim=0)
    rest = tail_logits.float().log_softmax(-1).cpu()
    # token j of a tail is predicted by the prefix's last logits (j = 0) or by tail position j - 1
    predicted = torch.cat([first[:, None], rest[:, :-1]], dim=1)
    token_lp = predicted.gather(-1, tail_ids[:, :, None])[..., 0]
    totals = []
    for row, tail in enumerate(tails):
        totals.append((token_lp[row, starts[row] : len(tail)].sum().item(), len(tail) - starts[row]))
    return [(totals[2 * i][0], totals[2 * i + 1][0], totals[2 * i][1], totals[2 * i + 1][1]) for i in range(len(pairs))]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def completion_answer(completion: str) -> str:
    """The part of a completion that answers: its first non-empty line."""
    return next((line for line in completion.strip().splitlines() if line.strip()), "")


def match_outcome(completion: str, context_answer: str, memory_answer: str) -> str:
    """``context``/``memory`` when that (normalised) answer is contained in the completion's first
    line (the earlier one when both are), else ``other``."""
    text = f" {normalize_answer(completion_answer(completion))} "
    found = {}
    for name, answer in (("context", context_answer), ("memory", memory_answer)):
        norm = normalize_answer(answer)
        at = text.find(f" {norm} ") if norm else -1
        if at >= 0:
            found[name] = at
    return min(found, key=found.get) if found else "other"


def rate_metrics(outcomes: list[str], prefix: str = "", kinds: Iterable[str] = OUTCOMES) -> dict[str, Any]:
    """``<prefix>context_rate`` etc. with 95% Wilson intervals."""
    n = len(outcomes)
    metrics: dict[str, Any] = {}
    for kind in kinds:
        count = outcomes.count(kind)
        metrics[f"{prefix}{kind}_rate"] = count / n if n else 0.0
        metrics[f"{prefix}{kind}_rate_ci95"] = list(wilson_interval(count, n))
    return metrics


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], chat: bool, task: ConflictTask, advance: Any
) -> list[str]:
    """Greedy completions of ``prompts``, left-padded batches."""
    stop = eos_ids(model, tokenizer)
    out = []
    for i in range(0, len(prompts), task.batch_size):
        batch = prompts[i : i + task.batch_size]
        inputs = tokenizer(
            batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not chat
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=task.max_new_tokens,
                do_sample=False,
                eos_token_id=stop or None,
                pad_token_id=tokenizer.pad_token_id,
                **decoding(task.decode),
            )
        out.extend(tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        advance(len(batch))
    return out


def run_conflict(model: Any, tokenizer: Any, task: ConflictTask, *, progress: bool = True) -> TaskResult:
    """Score every item (log-likelihood choice and/or greedy generation) and report outcome rates."""
    items = load_conflict_items(task)
    chat = task.chat_template
    prompts = [prompt_text(tokenizer, build_prompt(item, task), chat) for item in items]
    rows: list[dict[str, Any]] = [
        {
            "question": it.question,
            "relation": it.relation,
            "with_context": task.with_context,
            "context_answer": it.context_answer,
            "memory_answer": it.memory_answer,
        }
        for it in items
    ]
    start = time.perf_counter()
    metrics: dict[str, Any] = {"n": len(items), "with_context": task.with_context}
    if task.scoring in ("loglik", "both"):
        pairs = [encode_pair(tokenizer, p, it, chat) for p, it in zip(prompts, items)]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))  # less padding
        with progress_bar("conflict: log-likelihood", len(pairs), progress) as advance:
            for i in range(0, len(order), task.batch_size):
                chosen = order[i : i + task.batch_size]
                for index, (ctx_lp, mem_lp, ctx_n, mem_n) in zip(
                    chosen, pair_logprobs(model, tokenizer.pad_token_id, [pairs[j] for j in chosen])
                ):
                    ctx_score = ctx_lp / ctx_n if task.normalize else ctx_lp
                    mem_score = mem_lp / mem_n if task.normalize else mem_lp
                    rows[index]["loglik"] = {"context": ctx_lp, "memory": mem_lp}
                    rows[index]["loglik_choice"] = "context" if ctx_score >= mem_score else "memory"
                advance(len(chosen))
        metrics.update(rate_metrics([r["loglik_choice"] for r in rows], "", ("context", "memory")))
    if task.scoring in ("generate", "both"):
        with progress_bar("conflict: generation", len(prompts), progress) as advance:
            completions = generate_answers(model, tokenizer, prompts, chat, task, advance)
        for row, completion, item in zip(rows, completions, items):
            row["completion"] = completion
            row["generate_choice"] = match_outcome(completion, item.context_answer, item.memory_answer)
        metrics.update(rate_metrics([r["generate_choice"] for r in rows], "generate_"))
    relations = sorted({it.relation for it in items if it.relation})
    for relation in relations:
        subset = [r for r in rows if r["relation"] == relation]
        metrics[f"{relation}/n"] = len(subset)
        if "loglik_choice" in subset[0]:
            metrics.update(rate_metrics([r["loglik_choice"] for r in subset], f"{relation}/", ("context", "memory")))
        if "generate_choice" in subset[0]:
            metrics.update(rate_metrics([r["generate_choice"] for r in subset], f"{relation}/generate_"))
    return TaskResult(metrics=metrics, rows=rows, seconds=time.perf_counter() - start)


def context_rows(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Rows as ``{"correct": followed the context}`` for a paired comparison, and the metric's name."""
    key = "loglik_choice" if rows and "loglik_choice" in rows[0] else "generate_choice"
    name = "context rate (log-likelihood)" if key == "loglik_choice" else "context rate (generation)"
    return name, [{"correct": row[key] == "context"} for row in rows]
