"""``attnkit profile retrieval-heads``: the Retrieval Head paper's copy-paste score (Wu et al. 2024).

For each needle prompt of a lengths x depths grid (built by the ``needle`` task's
:class:`~attnkit.tasks.needle.PromptBuilder`), the model prefills the prompt (its own attention
backend) and then greedily decodes up to ``max_new_tokens`` tokens with eager attention. At every
decode step, for every (layer, query head), the key the decoding query attends to most is looked
up: when it lies inside the answer's span in the prompt and the prompt token there is the token
this step generated, the head copied a needle token and gets ``1 / len(span)``. A sample's scores
count only when the reply's ROUGE-1 recall of the answer is above ``min_recall`` (0.5); a head's
score is the mean over those samples, and heads above ``threshold`` (0.1, the paper's rule) are
retrieval heads. The answer is the part of the needle that the question does not contain, so a
head that copies it copies from the needle, not from the question.

``level="kv"`` reduces each KV head's query heads by max (what RazorAttention keeps per KV head);
the query-level scores stay in the artifact's parameters. Each prompt is one unit of progress
(``<artifact>.progress.jsonl``), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import attnkit
from attnkit import compat
from attnkit.heads import HeadArtifact, ModelShape, Selection, text_config
from attnkit.probes.attention_maps import attention_probabilities
from attnkit.probes.configs import NeedleGrid, ProfileError, RetrievalHeadsConfig
from attnkit.probes.razor_heads import kv_max
from attnkit.probes.run import ProfileRun, digest
from attnkit.tasks.generate import eos_ids
from attnkit.tasks.needle import NeedlePrompt, PromptBuilder, read_haystack, recall
from attnkit.tasks.result import read_jsonl, uses_chat_template

__all__ = [
    "DEFAULT_NEEDLES",
    "Needle",
    "NeedleData",
    "RetrievalProfileError",
    "aggregate",
    "copy_paste_step",
    "grid_problem",
    "profile",
    "read",
    "sample_scores",
]


class RetrievalProfileError(ProfileError):
    """Settings or data the profile cannot use; the message names the fix."""


@dataclass(frozen=True)
class Needle:
    """A fact to hide, the question that asks for it, and the answer: the needle's words the
    question does not contain (what the model must copy)."""

    needle: str
    question: str
    answer: str


#: Three needles whose answers share no word with their questions (as in the paper's set).
DEFAULT_NEEDLES: tuple[Needle, ...] = (
    Needle(
        "The secret ingredient in Grandma Rosa's soup is smoked paprika mixed with wild honey.",
        "What is the secret ingredient in Grandma Rosa's soup?",
        "smoked paprika mixed with wild honey",
    ),
    Needle(
        "The best way to reach the old harbour is to board a green ferry from Pier Seven at dawn.",
        "What is the best way to reach the old harbour?",
        "board a green ferry from Pier Seven at dawn",
    ),
    Needle(
        "The password for the old library computer is purple elephant sunrise.",
        "What is the password for the old library computer?",
        "purple elephant sunrise",
    ),
)


@dataclass(frozen=True)
class NeedleData:
    """What needle prompts are built from: the haystack text, the needles, and a line saying where
    they came from (the artifact's ``data``)."""

    haystack: str
    needles: tuple[Needle, ...] = DEFAULT_NEEDLES
    source: str = ""

    def digest(self) -> str:
        return digest({"haystack": self.haystack, "needles": [asdict(n) for n in self.needles]})

    def builders(self, tokenizer: Any, config: NeedleGrid, chat: bool) -> list[PromptBuilder]:
        """A prompt builder per needle."""
        return [
            PromptBuilder(tokenizer, self.haystack, question=n.question, template=config.template, chat=chat)
            for n in self.needles
        ]

    def cells(self, config: NeedleGrid) -> dict[str, tuple[int, int, float]]:
        """Every (needle, length, depth) of the grid, keyed ``needle:length:depth``."""
        return {
            f"{i}:{length}:{depth}": (i, length, depth)
            for i in range(len(self.needles))
            for length in config.lengths
            for depth in config.depths
        }


def read(config: NeedleGrid) -> NeedleData:
    """The needles and haystack the config names (default: the built-in needles, the essays)."""
    needles = read_needles(config.needles) if config.needles is not None else list(DEFAULT_NEEDLES)
    text, source = read_haystack(config.haystack, "--haystack")
    return NeedleData(text, tuple(needles), f"{len(needles)} needles in {source}")


def read_needles(path: str | Path) -> list[Needle]:
    """Needles from JSONL, one ``{"needle", "question", "answer"}`` per line (answer inside the needle)."""
    needles = []
    for number, item in read_jsonl(path, "--needles"):
        if not all(isinstance(item.get(k), str) and item[k].strip() for k in ("needle", "question", "answer")):
            raise RetrievalProfileError(
                f'{path}:{number}: needs "needle", "question" and "answer" strings, e.g. {{"needle": "The code is '
                f'blue owl.", "question": "What is the code?", "answer": "blue owl"}}'
            )
        if item["answer"] not in item["needle"]:
            raise RetrievalProfileError(f"{path}:{number}: the answer {item['answer']!r} is not part of the needle")
        needles.append(Needle(item["needle"], item["question"], item["answer"]))
    if not needles:
        raise RetrievalProfileError(f"{path}: no needles; write one JSON object per line")
    return needles


def copy_paste_step(argmax: torch.Tensor, prompt_ids: torch.Tensor, span: tuple[int, int], token: int) -> torch.Tensor:
    """One decode step's copy-paste credit per head: ``1/len(span)`` where the head's most-attended
    key position (``argmax``, any shape of heads) lies in ``span`` of the prompt and holds ``token``
    (the token this step generated), else 0. Float64, the shape of ``argmax``."""
    start, end = span
    inside = (argmax >= start) & (argmax < end)
    held = prompt_ids[argmax.clamp(0, len(prompt_ids) - 1)] == token
    return (inside & held).double() / (end - start)


@dataclass
class Sample:
    """One prompt's outcome: per-head copy-paste scores [layers, heads], the reply and its recall."""

    key: str
    length: int
    depth: float
    needle: int
    scores: list[list[float]]
    output: str
    recall: float
    prompt_tokens: int
    steps: int


def sample_scores(
    model: Any,
    tokenizer: Any,
    prompt: NeedlePrompt,
    max_new_tokens: int,
    shape: ModelShape,
    trace: list[tuple[torch.Tensor, int]] | None = None,
) -> tuple[np.ndarray, str, int]:
    """Prefill ``prompt`` (the model's own backend), decode greedily with eager attention and score
    every head's copy-paste of the answer span; returns (scores [layers, heads], reply, steps).

    ``trace``, when given, receives (most-attended key per layer and head, generated token) per step.
    """
    ids = torch.tensor([prompt.input_ids], device=model.device)
    prompt_ids = ids[0]
    stop = set(eos_ids(model, tokenizer))
    scores = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64, device=model.device)
    generated: list[int] = []
    rows: dict[int, torch.Tensor] = {}

    def grab(layer: int, probs: torch.Tensor) -> None:
        rows[layer] = probs[0, :, -1].argmax(-1)  # the decoding query's most-attended key, per head

    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)
        cache, token = compat.output_cache(out), ids[:, -1:]
        with attention_probabilities(model, grab):
            for _ in range(max_new_tokens):
                rows.clear()
                out = model(input_ids=token, use_cache=True, **compat.cache_argument(model, cache))
                cache = compat.output_cache(out)
                new = int(out.logits[0, -1].argmax())
                argmax = torch.stack([rows[layer] for layer in range(shape.num_layers)])
                scores += copy_paste_step(argmax, prompt_ids, prompt.answer_span, new)
                if trace is not None:
                    trace.append((argmax.cpu(), new))
                if new in stop:
                    break
                generated.append(new)
                if "\n" in tokenizer.decode([new]) and tokenizer.decode(generated).strip():
                    break  # the paper stops at the end of the first line
                token = torch.tensor([[new]], device=model.device)
    return scores.cpu().numpy(), tokenizer.decode(generated, skip_special_tokens=True), len(generated)


def aggregate(samples: list[Sample], min_recall: float | None) -> tuple[np.ndarray, list[Sample]]:
    """Mean per-head score over the samples whose recall is above ``min_recall`` (None: all)."""
    kept = [s for s in samples if min_recall is None or s.recall > min_recall]
    if not kept:
        return np.zeros_like(np.asarray(samples[0].scores)), kept
    return np.mean([np.asarray(s.scores) for s in kept], axis=0), kept


def grid_problem(model: Any, lengths: list[int], depths: list[float], new_tokens: int, name: str) -> str | None:
    """What is wrong with a needle grid for this model (a depth outside [0, 1], a length that leaves
    no room for ``new_tokens`` in the model's positions), or None."""
    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            return f"depth {depth} is outside [0, 1]; a depth is the fraction of the haystack before the needle"
    for length in lengths:
        if limit is not None and length + new_tokens > limit:
            return (
                f"length {length} + {name} {new_tokens} exceeds the model's {limit} positions "
                f"(max_position_embeddings); use lengths up to {limit - new_tokens}"
            )
    return None


def profile(
    model: Any,
    tokenizer: Any,
    config: RetrievalHeadsConfig,
    data: NeedleData | None = None,
    *,
    model_id: str,
    output: Path | None = None,
    progress: bool = True,
) -> HeadArtifact:
    """Copy-paste scores of every head over needles x lengths x depths; the artifact keeps the heads
    scoring above ``threshold`` (written to ``output`` when given, with a resumable progress file)."""
    data = data or read(config)
    if not 0.0 <= config.threshold <= 1.0:
        raise RetrievalProfileError(f"threshold={config.threshold}: a copy-paste score lies in [0, 1] (paper: 0.1)")
    problem = grid_problem(model, config.lengths, config.depths, config.max_new_tokens, "max_new_tokens")
    if problem:
        raise RetrievalProfileError(problem)
    chat = uses_chat_template(tokenizer, "auto" if config.chat else False)
    run = ProfileRun(
        "retrieval-heads", model, config, model_id=model_id, output=output, progress=progress, data=data.digest()
    )
    shape = run.shape
    builders = data.builders(tokenizer, config, chat)
    cells = data.cells(config)

    def score(cell: tuple[int, int, float]) -> dict[str, Any]:
        i, length, depth = cell
        needle = data.needles[i]
        prompt = builders[i].build(length, depth, needle.needle, needle.answer)
        scores, reply, steps = sample_scores(model, tokenizer, prompt, config.max_new_tokens, shape)
        return asdict(
            Sample(
                f"{i}:{length}:{depth}",
                length,
                depth,
                i,
                scores.tolist(),
                reply,
                recall(reply, needle.answer),
                len(prompt.input_ids),
                steps,
            )
        )

    done = run.each("needle prompts", cells, score)
    samples = [Sample(**unit) for unit in done.values()]
    query_scores, kept = aggregate(samples, config.min_recall)
    scores = kv_max(query_scores, shape.num_kv_heads) if config.level == "kv" else query_scores
    selected: dict[int, list[int]] = {}
    for (layer, head), value in np.ndenumerate(scores):
        if value > config.threshold:
            selected.setdefault(layer, []).append(head)
    unit = "KV heads (max over each KV head's query heads)" if config.level == "kv" else "query heads"
    rule = (
        f"{unit} whose mean copy-paste score exceeds {config.threshold:g}, over the {len(kept)} of {len(samples)} "
        f"needle prompts whose reply's ROUGE-1 recall of the answer is above {config.min_recall}"
        if config.min_recall is not None
        else f"{unit} whose mean copy-paste score exceeds {config.threshold:g}, over all {len(samples)} needle prompts"
    )
    artifact = HeadArtifact(
        attnkit_version=attnkit.__version__,
        model_id=model_id,
        config_fingerprint=shape.fingerprint,
        method="retrieval",
        parameters={
            "threshold": config.threshold,
            "min_recall": config.min_recall,
            "lengths": list(config.lengths),
            "depths": list(config.depths),
            "needles": [asdict(n) for n in data.needles],
            "max_new_tokens": config.max_new_tokens,
            "chat_template": chat,
            "template": config.template,
            "samples_total": len(samples),
            "samples_kept": len(kept),
            "mean_recall": float(np.mean([s.recall for s in samples])),
            "query_scores": query_scores.round(6).tolist(),
            "per_sample": [
                {
                    "length": s.length,
                    "depth": s.depth,
                    "needle": s.needle,
                    "recall": round(s.recall, 4),
                    "kept": s in kept,
                    "output": s.output,
                    "prompt_tokens": s.prompt_tokens,
                }
                for s in samples
            ],
            "seconds": run.seconds(),
        },
        data=data.source,
        samples=len(kept),
        seed=None,
        level=config.level,
        scores=scores.round(6).tolist(),
        selection=Selection(rule=rule, heads=selected),
    )
    return run.save(artifact)
