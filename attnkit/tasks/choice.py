"""The ``choice`` task: log-likelihood multiple choice.

Each choice is scored by the log-probability the model gives its tokens after the prompt (summed,
or averaged per token with ``normalize``); the highest score is the prediction. All (item, choice)
pairs are scored in left-padded batches with positions counted from the first real token, so a
batch scores every pair exactly as it would be scored alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.recipe.tasks import ChoiceTask
from attnkit.tasks.result import (
    TaskDataError,
    TaskResult,
    chat_prompt,
    checked_rows,
    progress_bar,
    uses_chat_template,
)

EXAMPLE = '{"prompt": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}'


@dataclass
class Item:
    """A validated item; ``answer`` is always an index into ``choices``."""

    where: str
    prompt: str
    choices: list[str]
    answer: int


def item_problem(item: dict[str, Any]) -> str | None:
    """What is wrong with one raw item and how to fix it, or None when it is usable."""
    if not isinstance(item.get("prompt"), str):
        return '"prompt" must be a string'
    choices = item.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        return '"choices" must be a list of at least 2 strings'
    if not all(isinstance(c, str) and c for c in choices):
        return '"choices" must all be non-empty strings'
    answer = item.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        return f'"answer" must be the index (0-{len(choices) - 1}) or the exact text of one choice'
    if isinstance(answer, int) and not 0 <= answer < len(choices):
        return f'"answer" {answer} is out of range; there are {len(choices)} choices, so use 0-{len(choices) - 1}'
    if isinstance(answer, str) and answer not in choices:
        return f'"answer" {answer!r} is not one of the choices {choices}; copy a choice exactly, or give its index'
    return None


def load_items(task: ChoiceTask) -> list[Item]:
    """The task's items, validated (every bad line is reported at once) and cut to ``limit``."""
    items = []
    for where, raw in checked_rows(task.data, "task.data", item_problem, EXAMPLE):
        answer = raw["answer"] if isinstance(raw["answer"], int) else raw["choices"].index(raw["answer"])
        items.append(Item(where, raw["prompt"], raw["choices"], answer))
    return items[: task.limit]


def encode_choice(tokenizer: Any, prompt: str, choice: str, add_special: bool, where: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + choice`` and how many of them (the leading ones) are context.

    The choice's tokens are those of the full string beyond what it shares with the prompt's own
    tokenization, so a token that merges across the boundary is scored, not lost. Trailing spaces
    of the prompt count as part of the choice (``"A: " + "Paris"`` scores ``" Paris"``).
    """
    full = tokenizer(prompt + choice, add_special_tokens=add_special)["input_ids"]
    context = tokenizer(prompt.rstrip(" "), add_special_tokens=add_special)["input_ids"]
    shared = 0
    while shared < min(len(full), len(context)) and full[shared] == context[shared]:
        shared += 1
    if shared == 0:
        raise TaskDataError(
            f"{where}: the prompt gives no context token before choice {choice!r} (empty prompt and no BOS token); "
            "give the item a prompt"
        )
    if shared == len(full):
        raise TaskDataError(f"{where}: choice {choice!r} adds no tokens after the prompt; make it non-empty")
    return full, shared


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position ids (counted from each row's first real token)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def score_batch(model: Any, pad_id: int, pairs: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
    """Summed log-prob and token count of each pair's continuation, in one left-padded forward pass."""
    input_ids, mask, positions = left_pad([ids for ids, _ in pairs], pad_id)
    width = input_ids.shape[1]
    kept = max(len(ids) - shared for ids, shared in pairs)
    device = model.device
    with torch.no_grad():
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=kept + 1,
        ).logits
    logprobs = logits.float().log_softmax(-1).cpu()
    scores = []
    for row, (ids, shared) in enumerate(pairs):
        n = len(ids) - shared
        targets = input_ids[row, width - n :]
        # logits at kept position j predict the token at padded position width - kept + j
        picked = logprobs[row, kept - n : kept].gather(-1, targets[:, None])
        scores.append((picked.sum().item(), n))
    return scores


def label_word_items(tokenizer: Any, items: list[Item], chat: bool) -> list[tuple[list[int], list[int]]]:
    """Per item: the prompt's token ids and each choice's last sub-token id (distinct, or an error)."""
    encoded = []
    for item in items:
        prompt = chat_prompt(tokenizer, item.prompt) if chat else item.prompt
        pairs = [encode_choice(tokenizer, prompt, choice, not chat, item.where) for choice in item.choices]
        context = pairs[0][0][: pairs[0][1]]
        labels = [ids[-1] for ids, _ in pairs]
        if len(set(labels)) < len(labels):
            raise TaskDataError(
                f"{item.where}: choices {item.choices} end in the same token, so label_word scoring cannot tell "
                "them apart; use scoring: sequence"
            )
        encoded.append((context, labels))
    return encoded


def label_word_scores(model: Any, pad_id: int, batch: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """Log-probs of each item's label tokens at its prompt's last position, one left-padded pass."""
    input_ids, mask, positions = left_pad([ids for ids, _ in batch], pad_id)
    device = model.device
    with torch.no_grad():
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=1,
        ).logits[:, -1]
    logprobs = logits.float().log_softmax(-1).cpu()
    return [logprobs[row, labels].tolist() for row, (_, labels) in enumerate(batch)]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% for the default ``z``).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n successes,
    which matters for the small item counts a quick evaluation uses.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_comparison(
    baseline: list[dict[str, Any]], treated: list[dict[str, Any]], z: float = 1.959964
) -> dict[str, Any]:
    """The same items scored twice: accuracy difference with a 95% CI on the paired differences,
    the discordant pairs, and McNemar's exact two-sided p-value."""
    diffs = [int(t["correct"]) - int(b["correct"]) for b, t in zip(baseline, treated, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n) if n else 0.0
    gained, lost = diffs.count(1), diffs.count(-1)
    discordant = gained + lost
    tail = sum(math.comb(discordant, k) for k in range(min(gained, lost) + 1)) / 2**discordant if discordant else 1.0
    return {
        "n": n,
        "accuracy_difference": mean,
        "difference_ci95": [mean - half, mean + half],
        "gained": gained,
        "lost": lost,
        "mcnemar_p": min(1.0, 2 * tail),
    }


def item_rows(items: list[Item], scores_per_item: list[list[float]]) -> list[dict[str, Any]]:
    """One row per item from its choices' scores."""
    rows = []
    for item, scores in zip(items, scores_per_item):
        predicted = max(range(len(scores)), key=scores.__getitem__)
        rows.append(
            {
                "prompt": item.prompt,
                "choices": item.choices,
                "scores": scores,
                "predicted": predicted,
                "answer": item.answer,
                "correct": predicted == item.answer,
            }
        )
    return rows


def sequence_scores(
    model: Any, tokenizer: Any, items: list[Item], chat: bool, task: ChoiceTask, progress: bool
) -> list[list[float]]:
    """Each choice's summed (or per-token mean) log-prob, all (item, choice) pairs in batches."""
    pairs = []
    for item in items:
        prompt = chat_prompt(tokenizer, item.prompt) if chat else item.prompt
        pairs.extend(encode_choice(tokenizer, prompt, choice, not chat, item.where) for choice in item.choices)
    scored: list[tuple[float, int]] = []
    with progress_bar("choice", len(pairs), progress) as advance:
        for i in range(0, len(pairs), task.batch_size):
            batch = pairs[i : i + task.batch_size]
            scored.extend(score_batch(model, tokenizer.pad_token_id, batch))
            advance(len(batch))
    out, offset = [], 0
    for item in items:
        pairs_of_item = scored[offset : offset + len(item.choices)]
        offset += len(item.choices)
        out.append([total / n if task.normalize else total for total, n in pairs_of_item])
    return out


def run_choice(model: Any, tokenizer: Any, task: ChoiceTask, *, progress: bool = True) -> TaskResult:
    """Score every choice of every item and report accuracy with a 95% Wilson interval."""
    items = load_items(task)
    chat = uses_chat_template(tokenizer, task.chat_template)
    start = time.perf_counter()
    if task.scoring == "label_word":
        encoded = label_word_items(tokenizer, items, chat)
        scores: list[list[float]] = []
        with progress_bar("choice", len(encoded), progress) as advance:
            for i in range(0, len(encoded), task.batch_size):
                batch = encoded[i : i + task.batch_size]
                scores.extend(label_word_scores(model, tokenizer.pad_token_id, batch))
                advance(len(batch))
    else:
        scores = sequence_scores(model, tokenizer, items, chat, task, progress)
    seconds = time.perf_counter() - start
    rows = item_rows(items, scores)
    correct = sum(row["correct"] for row in rows)
    low, high = wilson_interval(correct, len(rows))
    metrics = {"accuracy": correct / len(rows) if rows else 0.0, "n": len(rows), "accuracy_ci95": [low, high]}
    return TaskResult(metrics=metrics, rows=rows, seconds=seconds)
