"""The ``segments`` task: prompts made of a prefix, segments and a suffix, run in several orders of the segments.

It measures what PINE (``attnkit/methods/pine.py``) is for: whether a model's answer depends on the
order of the documents, options or responses in its prompt. Each JSONL item names its segments and
which of them is the gold one (``answer``, an index into the listed order); ``choices`` gives, per
segment, the string that stands for it (a response's label ``"A"``, a record's value), by default
the segment's own text.

- ``mode: choice`` scores every segment's choice string by its log-likelihood after the prompt and
  picks the best, with the segments in several orders (``orders``). The report gives accuracy (the
  picked content is the gold content) and **consistency** (an item's pick is the same content in
  every order), each with a 95% Wilson interval, and the accuracy per position of the gold segment.
- ``mode: generate`` moves the gold segment through the positions (``positions``; the others keep
  their listed order: the lost-in-the-middle protocol) and greedily generates a reply, correct when
  the gold choice string appears in it (normalised, whole words). The report gives accuracy per
  number of segments and gold position with 95% intervals, the spread (max - min over positions),
  and how often an item's reply is the same at every position.

Every piece (prefix, each segment, suffix) is tokenized on its own, as :func:`segment_inputs` does,
so a segment is the same tokens wherever it stands. When the recipe applies ``pine`` (the runner
hands the task the handle's methods), each batch's segment ids go to it through
:meth:`Pine.segments`; the untouched run gets the same token ids, where the segments are just text.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.methods.pine import Pine, template_ends
from attnkit.recipe.tasks import SegmentsTask
from attnkit.tasks.choice import encode_choice, left_pad, score_batch, wilson_interval
from attnkit.tasks.needle import exact_match, generate_replies, normalize
from attnkit.tasks.result import TaskDataError, TaskResult, checked_rows, progress_bar, uses_chat_template

__all__ = ["Item", "gold_positions", "load_items", "orders_of", "run_segments"]

EXAMPLE = (
    '{"prefix": "Which response is correct?\\n", "segments": ["Response A: 2 + 2 = 4.", "Response B: 2 + 2 = 5."], '
    '"suffix": "Answer with A or B.", "answer": 0, "choices": ["A", "B"]}'
)
ALL_ORDERS_UP_TO = 3
"""``orders: all`` runs every order of at most this many segments (3! = 6)."""


@dataclass
class Item:
    """A validated item: ``answer`` indexes ``segments`` and ``choices`` in their listed order."""

    where: str
    prefix: str
    segments: list[str]
    suffix: str
    answer: int
    choices: list[str]
    id: Any = None


def item_problem(item: dict[str, Any], mode: str) -> str | None:
    """What is wrong with one raw item and how to fix it, or None when it is usable."""
    for key in ("prefix", "suffix"):
        if not isinstance(item.get(key), str):
            return f'"{key}" must be a string (it may be empty)'
    segments = item.get("segments")
    if not isinstance(segments, list) or len(segments) < 2:
        return '"segments" must be a list of at least 2 strings (the parts whose order is varied)'
    if not all(isinstance(s, str) and s.strip() for s in segments):
        return '"segments" must all be non-empty strings'
    answer = item.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(segments):
        return f'"answer" must be the index of the gold segment in the listed order (0-{len(segments) - 1})'
    choices = item.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list) or len(choices) != len(segments):
        return f'"choices" must be a list of one string per segment ({len(segments)}), or left out'
    if not all(isinstance(c, str) and c.strip() for c in choices):
        return '"choices" must all be non-empty strings'
    if mode == "choice" and len(set(choices)) < len(choices):
        return f'"choices" {choices} repeat a string, so the model cannot pick between those segments; make them differ'
    return None


def load_items(task: SegmentsTask) -> list[Item]:
    """The task's items, validated (every bad line is reported at once) and cut to ``limit``."""
    items = []
    for where, raw in checked_rows(task.data, "task.data", lambda raw: item_problem(raw, task.mode), EXAMPLE):
        choices = raw.get("choices") or [s.strip() for s in raw["segments"]]
        items.append(Item(where, raw["prefix"], raw["segments"], raw["suffix"], raw["answer"], choices, raw.get("id")))
    items = items[: task.limit]
    if task.mode == "choice" and task.orders == "all":
        many = [item for item in items if len(item.segments) > ALL_ORDERS_UP_TO]
        if many:
            k = len(many[0].segments)
            raise TaskDataError(
                f"{many[0].where}: {k} segments have {math.factorial(k)} orders, and task.orders is `all` (for up to "
                f"{ALL_ORDERS_UP_TO} segments); set task.orders to a number, e.g. task.orders: {k} (its rotations)"
            )
    return items


# ----------------------------------------------------------------------------- orders and positions


def orders_of(k: int, setting: str | int, rng: random.Random) -> list[tuple[int, ...]]:
    """Orders of k segments (each: the listed index of the segment at each position).

    ``all``: every permutation. N: the listed order, then its rotations, then distinct random
    permutations from ``rng``, at most k! in all.
    """
    if setting == "all":
        return list(itertools.permutations(range(k)))
    wanted = min(int(setting), math.factorial(k))
    orders = [tuple((i + shift) % k for i in range(k)) for shift in range(min(k, wanted))]
    seen = set(orders)
    while len(orders) < wanted:
        order = tuple(rng.sample(range(k), k))
        if order not in seen:
            seen.add(order)
            orders.append(order)
    return orders


def gold_positions(k: int, setting: str | list[float]) -> list[int]:
    """The 0-based positions the gold segment is put at: ``all``, or fractions f -> round(f * (k - 1))."""
    if setting == "all":
        return list(range(k))
    return sorted({math.floor(f * (k - 1) + 0.5) for f in setting})


def with_gold_at(k: int, gold: int, position: int) -> tuple[int, ...]:
    """The listed order with the gold segment moved to ``position``; the others keep their order."""
    others = [i for i in range(k) if i != gold]
    others.insert(position, gold)
    return tuple(others)


# ----------------------------------------------------------------------------- tokens


class Encoder:
    """Token ids and segment ids of an item's prompt in a given order, each piece tokenized alone."""

    def __init__(self, tokenizer: Any, task: SegmentsTask):
        self.tokenizer = tokenizer
        chat = uses_chat_template(tokenizer, task.chat_template)
        self.head, self.tail = template_ends(tokenizer, chat, task.system)
        self.separator = task.separator
        self._segments: dict[int, list[list[int]]] = {}

    def encode(self, text: str, first: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=first and not self.head)

    def body(self, item: Item, order: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """Ids and segment ids (0 outside, 1..k in prompt order) of the prefix and the ordered segments."""
        if id(item) not in self._segments:
            self._segments[id(item)] = [self.encode(s + self.separator) for s in item.segments]
        pieces = self._segments[id(item)]
        ids = self.encode(self.head + item.prefix, first=True)
        segment_ids = [0] * len(ids)
        for number, listed in enumerate(order, start=1):
            ids = ids + pieces[listed]
            segment_ids += [number] * len(pieces[listed])
        return ids, segment_ids

    def end(self, item: Item) -> str:
        return item.suffix + self.tail

    def prompt(self, item: Item, order: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """The whole prompt's ids and segment ids, ready for a reply."""
        ids, segment_ids = self.body(item, order)
        end = self.encode(self.end(item))
        return ids + end, segment_ids + [0] * len(end)

    def with_choice(self, item: Item, order: tuple[int, ...], choice: str) -> tuple[list[int], list[int], int]:
        """Ids and segment ids of the prompt followed by ``choice``, and how many leading ids are context.

        The choice's tokens are those the suffix and it make together beyond the suffix's own (as the
        ``choice`` task scores them), so a token merging across the boundary is scored, not lost."""
        ids, segment_ids = self.body(item, order)
        end = self.end(item)
        if end.strip(" "):
            full, shared = encode_choice(self.tokenizer, end, choice, False, item.where)
        else:
            full, shared = self.encode(choice), 0
            if not ids:
                raise TaskDataError(f"{item.where}: the prompt has no tokens before the choice; give a prefix")
        return ids + full, segment_ids + [0] * len(full), len(ids) + shared


def pines_of(methods: Any) -> list[Pine]:
    """The ``Pine`` objects among ``methods`` (a handle, or a list of method objects, or None)."""
    methods = getattr(methods, "methods", methods) or []
    return [method for method in methods if isinstance(method, Pine)]


@contextmanager
def given_segments(pines: list[Pine], segment_ids: list[list[int]], device: Any) -> Iterator[None]:
    """Hand every ``pine`` the left-padded segment ids of the batch run inside."""
    with ExitStack() as stack:
        if pines:
            padded = left_pad(segment_ids, 0)[0].to(device)
            for pine in pines:
                stack.enter_context(pine.segments(padded))
        yield


def pad_id(model: Any, tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id or 0
    return eos if isinstance(eos, int) else eos[0]


def batches(lengths: list[int], size: int) -> Iterator[list[int]]:
    """Indices in batches of ``size``, longest first, so a batch holds prompts of similar length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), size):
        yield order[start : start + size]


# ----------------------------------------------------------------------------- metrics


def rate(successes: int, n: int) -> tuple[float, list[float]]:
    low, high = wilson_interval(successes, n)
    return (successes / n if n else 0.0), [low, high]


def add_rate(metrics: dict[str, Any], key: str, successes: int, n: int) -> float:
    value, interval = rate(successes, n)
    metrics[key], metrics[f"{key}_ci95"] = value, interval
    return value


def choice_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"n": len(rows)}
    add_rate(metrics, "accuracy", sum(r["correct"] for r in rows), len(rows))
    picks: dict[Any, set[int]] = {}
    for row in rows:
        picks.setdefault(row["item"], set()).add(row["predicted"])
    metrics["items"] = len(picks)
    metrics["orders_per_item"] = len(rows) / len(picks) if picks else 0.0
    add_rate(metrics, "consistency", sum(len(p) == 1 for p in picks.values()), len(picks))
    for position in sorted({r["gold_position"] for r in rows}):
        at = [r for r in rows if r["gold_position"] == position]
        add_rate(metrics, f"accuracy@gold_pos{position}", sum(r["correct"] for r in at), len(at))
    for position in sorted({r["gold_position"] for r in rows}):
        metrics[f"picked@pos{position}"] = sum(r["picked_position"] == position for r in rows) / len(rows)
    for listed in range(max(len(r["order"]) for r in rows) if rows else 0):
        metrics[f"picked@choice{listed + 1}"] = sum(r["predicted"] == listed for r in rows) / len(rows)
    return metrics


def generate_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"n": len(rows)}
    add_rate(metrics, "accuracy", sum(r["correct"] for r in rows), len(rows))
    metrics["items"] = len({r["item"] for r in rows})
    for k in sorted({r["k"] for r in rows}):
        of_k = [r for r in rows if r["k"] == k]
        replies: dict[Any, set[str]] = {}
        for row in of_k:
            replies.setdefault(row["item"], set()).add(row["output"])
        metrics[f"items@k{k}"] = len(replies)
        accuracies = []
        for position in sorted({r["gold_position"] for r in of_k}):
            at = [r for r in of_k if r["gold_position"] == position]
            accuracies.append(add_rate(metrics, f"accuracy@k{k}/pos{position}", sum(r["correct"] for r in at), len(at)))
        metrics[f"spread@k{k}"] = max(accuracies) - min(accuracies)
        metrics[f"same_reply@k{k}"] = sum(len(r) == 1 for r in replies.values()) / len(replies)
        metrics[f"other_segment@k{k}"] = sum(r["picked"] not in (None, r["answer"]) for r in of_k) / len(of_k)
    return metrics


def mentioned(reply: str, choices: list[str]) -> int | None:
    """The listed index of the choice the reply names first (normalised, whole words), or None."""
    text = f" {normalize(reply)} "
    found = [(text.find(f" {normalize(c)} "), i) for i, c in enumerate(choices) if normalize(c)]
    found = [(at, i) for at, i in found if at >= 0]
    return min(found)[1] if found else None


# ----------------------------------------------------------------------------- running


def run_choice_mode(
    model: Any, tokenizer: Any, task: SegmentsTask, items: list[Item], pines: list[Pine], progress: bool
) -> list[dict[str, Any]]:
    encoder = Encoder(tokenizer, task)
    rows: list[dict[str, Any]] = []
    units: list[tuple[int, int, list[int], list[int], int]] = []  # row, listed segment, ids, segment ids, shared
    for number, item in enumerate(items):
        rng = random.Random(f"{task.seed}:{number}")
        for order in orders_of(len(item.segments), task.orders, rng):
            for listed, choice in enumerate(item.choices):
                ids, segment_ids, shared = encoder.with_choice(item, order, choice)
                units.append((len(rows), listed, ids, segment_ids, shared))
            rows.append({"item": number, "id": item.id, "where": item.where, "order": list(order),
                         "gold_position": order.index(item.answer) + 1, "answer": item.answer,
                         "scores": [0.0] * len(item.segments)})  # fmt: skip
    pad = pad_id(model, tokenizer)
    with progress_bar("segments", len(units), progress) as advance:
        for chosen in batches([len(u[2]) for u in units], task.batch_size):
            with given_segments(pines, [units[i][3] for i in chosen], model.device):
                scored = score_batch(model, pad, [(units[i][2], units[i][4]) for i in chosen])
            for i, (total, n) in zip(chosen, scored):
                row, listed = units[i][0], units[i][1]
                rows[row]["scores"][listed] = total / n if task.normalize else total
            advance(len(chosen))
    for row in rows:
        scores = row["scores"]
        row["predicted"] = max(range(len(scores)), key=scores.__getitem__)
        row["picked_position"] = row["order"].index(row["predicted"]) + 1
        row["correct"] = row["predicted"] == row["answer"]
    return rows


def run_generate_mode(
    model: Any, tokenizer: Any, task: SegmentsTask, items: list[Item], pines: list[Pine], progress: bool
) -> list[dict[str, Any]]:
    encoder = Encoder(tokenizer, task)
    rows: list[dict[str, Any]] = []
    prompts: list[tuple[list[int], list[int]]] = []
    for number, item in enumerate(items):
        k = len(item.segments)
        for position in gold_positions(k, task.positions):
            order = with_gold_at(k, item.answer, position)
            prompts.append(encoder.prompt(item, order))
            rows.append({"item": number, "id": item.id, "where": item.where, "k": k, "gold_position": position + 1,
                         "order": list(order), "answer": item.answer, "expected": item.choices[item.answer]})  # fmt: skip
    with torch.no_grad(), progress_bar("segments", len(prompts), progress) as advance:
        for chosen in batches([len(p[0]) for p in prompts], task.batch_size):
            with given_segments(pines, [prompts[i][1] for i in chosen], model.device):
                replies = generate_replies(model, tokenizer, [prompts[i][0] for i in chosen], task.max_new_tokens)
            for i, (reply, n) in zip(chosen, replies):
                row = rows[i]
                picked = mentioned(reply, items[row["item"]].choices)
                row.update(output=reply, n_new_tokens=n, correct=exact_match(reply, row["expected"]), picked=picked)
            advance(len(chosen))
    return rows


def run_segments(
    model: Any, tokenizer: Any, task: SegmentsTask, *, progress: bool = True, methods: Iterable[Any] | Any = None
) -> TaskResult:
    """Run every item in several orders of its segments; see the module docstring.

    ``methods``: the applied handle or its method objects; a ``Pine`` among them gets each batch's
    segment ids (the runner passes the handle's methods for the attnkit run, none for the baseline).
    """
    items = load_items(task)
    pines = pines_of(methods)
    start = time.perf_counter()
    if task.mode == "choice":
        rows = run_choice_mode(model, tokenizer, task, items, pines, progress)
        metrics = choice_metrics(rows)
    else:
        rows = run_generate_mode(model, tokenizer, task, items, pines, progress)
        metrics = generate_metrics(rows)
    metrics["pine"] = bool(pines)
    return TaskResult(metrics=metrics, rows=rows, seconds=time.perf_counter() - start)
