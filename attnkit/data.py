"""Real evaluation data: BIG-bench task files and few-shot classification items.

Why this module exists: attnkit's evidence runs need real, labelled data, and the machines it runs on
reach only PyPI. The ``bigbench`` 1.0.0 sdist on PyPI carries every BIG-bench ``task.json``; it is
downloaded once (never installed: its requirements pull in tensorflow, t5 and seqio) and the few
task files a run needs are extracted once into the cache.

:func:`make_splits` and :func:`fewshot_items` then turn a labelled task into the JSONL items the
``choice`` task reads (``{"prompt", "choices", "answer"}``): disjoint train / test items, each with
balanced random demonstrations drawn from a pool that shares no text with either.

Cache layout (``<cache>`` is :func:`attnkit.catalog.cache_dir`, i.e. ``$ATTNKIT_CACHE`` or
``~/.cache/attnkit``)::

    <cache>/data/bigbench-1.0.0.tar.gz              the sdist, 358 MB
    <cache>/data/bigbench/<task path>/task.json     extracted task files
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from attnkit.catalog import cache_dir
from attnkit.errors import UserError

__all__ = [
    "BIGBENCH_VERSION",
    "DataError",
    "Example",
    "Splits",
    "bigbench_archive",
    "bigbench_examples",
    "bigbench_task",
    "bigbench_tasks",
    "dedupe",
    "download_command",
    "fewshot_items",
    "label_counts",
    "make_splits",
    "truncate_words",
    "write_jsonl",
]

log = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
_ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
_MEMBER_ROOT = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
_TASK_PATH = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


class DataError(UserError, RuntimeError):
    """Data could not be fetched, found or split; the message names the problem and the fix."""


class Example(NamedTuple):
    """One labelled input: ``text`` and its raw ``label`` (a key of the ``labels`` mapping)."""

    text: str
    label: str


# --------------------------------------------------------------------------- BIG-bench archive


def _data_dir(cache: str | Path | None) -> Path:
    if cache is None:
        return cache_dir() / "data"
    return Path(cache).expanduser() / "data"


def download_command(dest: str | Path) -> list[str]:
    """The pip command that downloads the bigbench sdist (and nothing else) into ``dest``."""
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "-d", str(dest), f"bigbench=={BIGBENCH_VERSION}",
    ]  # fmt: skip


def bigbench_archive(cache: str | Path | None = None) -> Path:
    """Path of the bigbench 1.0.0 sdist, downloading it once (about 30-40 s) if it is not cached.

    ``cache`` is a cache root (default :func:`attnkit.catalog.cache_dir`); the file lands in
    ``<cache>/data/``. The download goes to a temporary folder first and is moved into place only
    when pip succeeded, so an interrupted download never leaves a partial archive behind.
    """
    data = _data_dir(cache)
    target = data / _ARCHIVE_NAME
    if target.is_file():
        return target
    data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bigbench-dl-", dir=data) as tmp:
        cmd = download_command(tmp)
        log.info(f"downloading the bigbench {BIGBENCH_VERSION} sdist (358 MB, once) into {data}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / _ARCHIVE_NAME
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
            raise DataError(
                f"could not download the bigbench {BIGBENCH_VERSION} sdist (pip exit code {proc.returncode}).\n"
                f"pip said:\n{tail}\n"
                f"Run it by hand (needs PyPI access), then retry:\n    {' '.join(download_command(data))}"
            )
        os.replace(got, target)
    return target


def _check_task_path(path: str) -> str:
    clean = path.strip().strip("/")
    if clean.endswith("/task.json"):
        clean = clean[: -len("/task.json")]
    if not _TASK_PATH.match(clean):
        raise DataError(
            f"bad BIG-bench task path {path!r}; use a task folder such as 'intent_recognition' or 'multiemo/all_sentence_en'"
        )
    return clean


def _task_file(data: Path, path: str) -> Path:
    return data / "bigbench" / path / "task.json"


def bigbench_tasks(paths: Iterable[str], cache: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Task JSON of several BIG-bench tasks, keyed by task path.

    Task files not yet extracted are pulled out of the sdist in a single pass over the archive
    (about 5 s; the archive is gzip, so every extra pass costs the same again) and kept in
    ``<cache>/data/bigbench/<path>/task.json`` for later calls.
    """
    wanted = list(dict.fromkeys(_check_task_path(p) for p in paths))
    data = _data_dir(cache)
    missing = [p for p in wanted if not _task_file(data, p).is_file()]
    if missing:
        _extract(bigbench_archive(cache), data, missing)
    tasks = {}
    for p in wanted:
        file = _task_file(data, p)
        try:
            tasks[p] = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{file} is not valid JSON ({exc}); delete it and call again to re-extract it") from exc
    return tasks


def bigbench_task(path: str, cache: str | Path | None = None) -> dict[str, Any]:
    """Task JSON of one BIG-bench task, e.g. ``"intent_recognition"`` or ``"multiemo/all_sentence_en"``.

    To fetch several tasks, call :func:`bigbench_tasks` once: it reads the archive once for all.
    """
    return next(iter(bigbench_tasks([path], cache).values()))


def _extract(archive: Path, data: Path, paths: list[str]) -> None:
    members = {f"{_MEMBER_ROOT}{p}/task.json": p for p in paths}
    found: set[str] = set()
    available: list[str] = []
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf:
                if not info.name.startswith(_MEMBER_ROOT) or not info.name.endswith("/task.json"):
                    continue
                available.append(info.name[len(_MEMBER_ROOT) : -len("/task.json")])
                path = members.get(info.name)
                if path is None or not info.isfile():
                    continue
                dest = _task_file(data, path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                fh = tf.extractfile(info)
                assert fh is not None
                with tempfile.NamedTemporaryFile("wb", dir=dest.parent, prefix=".task-", delete=False) as out:
                    out.write(fh.read())
                os.replace(out.name, dest)  # atomic: a reader never sees half a file
                found.add(path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"could not read {archive} ({exc}); it may be truncated or corrupt. Delete it and call again "
            "to download it afresh"
        ) from exc
    absent = [p for p in paths if p not in found]
    if absent:
        import difflib

        hints = []
        for p in absent:
            close = difflib.get_close_matches(p, available, n=3, cutoff=0.5)
            hints.append(f"  {p!r}" + (f": did you mean {', '.join(map(repr, close))}?" if close else ""))
        raise DataError(
            f"no such task in bigbench {BIGBENCH_VERSION} ({len(available)} tasks in the archive):\n" + "\n".join(hints)
        )


def bigbench_examples(task: Mapping[str, Any], *, strip_prefix: str = "") -> list[Example]:
    """The labelled examples of a multiple-choice BIG-bench task: one :class:`Example` per row.

    The label is the one option of ``target_scores`` scored 1. Rows with no single best option are
    an error. ``strip_prefix`` is removed from the start of each input (intent_recognition's inputs
    all start with ``"Utterance: "``) and surrounding whitespace is stripped.
    """
    out = []
    for i, row in enumerate(task.get("examples", [])):
        scores = row.get("target_scores")
        if not isinstance(scores, Mapping) or not scores:
            raise DataError(
                f"example {i} of task {task.get('name')!r} has no target_scores; it is not a multiple-choice task"
            )
        best = max(scores.values())
        top = [k for k, v in scores.items() if v == best]
        if len(top) != 1:
            raise DataError(f"example {i} of task {task.get('name')!r} has {len(top)} options scored {best}: {top}")
        text = str(row["input"])
        if strip_prefix and text.startswith(strip_prefix):
            text = text[len(strip_prefix) :]
        out.append(Example(text.strip(), top[0]))
    return out


# --------------------------------------------------------------------------- splitting


def _as_examples(examples: Iterable[Any]) -> list[Example]:
    out = []
    for e in examples:
        if isinstance(e, Mapping):
            out.append(Example(str(e["text"]), str(e["label"])))
        else:
            text, label = e
            out.append(Example(str(text), str(label)))
    return out


def _key(text: str) -> str:
    """Identity of a text for de-duplication and disjointness: case- and whitespace-insensitive."""
    return " ".join(text.split()).casefold()


def dedupe(examples: Iterable[Any]) -> tuple[list[Example], int]:
    """Examples with one copy of each text, and how many rows were dropped.

    Texts that occur with more than one label are dropped entirely (their label is ambiguous).
    First-occurrence order is kept.
    """
    rows = _as_examples(examples)
    labels: dict[str, set[str]] = {}
    for e in rows:
        labels.setdefault(_key(e.text), set()).add(e.label)
    seen: set[str] = set()
    out = []
    for e in rows:
        k = _key(e.text)
        if k in seen or len(labels[k]) > 1:
            continue
        seen.add(k)
        out.append(e)
    return out, len(rows) - len(out)


def label_counts(rows: Iterable[Any]) -> dict[str, int]:
    """How many examples or items carry each label (items use their ``"label"`` field)."""
    counts: Counter[str] = Counter()
    for r in rows:
        counts[r["label"] if isinstance(r, Mapping) else r[1]] += 1
    return dict(sorted(counts.items()))


def _fill(total: int, available: dict[str, int], rng: random.Random) -> dict[str, int]:
    """Spread ``total`` over labels as evenly as the ``available`` counts allow (water-filling).

    Labels with too few examples give all they have and the rest is shared among the others, so
    per-label counts differ by at most one except where a label runs out. Which labels get the
    remainder is decided by ``rng``.
    """
    quota = {label: 0 for label in available}
    left = min(total, sum(available.values()))
    open_labels = [label for label in available if available[label] > 0]
    while left > 0 and open_labels:
        share, extra = divmod(left, len(open_labels))
        bonus = set(rng.sample(open_labels, extra)) if extra else set()
        for label in open_labels:
            quota[label] += min(share + (label in bonus), available[label] - quota[label])
        left = min(total, sum(available.values())) - sum(quota.values())
        open_labels = [label for label in open_labels if quota[label] < available[label]]
    return quota


def _interleave(groups: dict[str, list[Example]], rng: random.Random) -> list[Example]:
    """Round-robin over labels (label order shuffled each round): every prefix stays near-balanced."""
    out: list[Example] = []
    depth = max((len(g) for g in groups.values()), default=0)
    for i in range(depth):
        round_ = [g[i] for g in groups.values() if i < len(g)]
        rng.shuffle(round_)
        out.extend(round_)
    return out


@dataclass
class Splits:
    """Disjoint train / test items and the demonstration pool (disjoint from both)."""

    train: list[Example]
    test: list[Example]
    pool: list[Example]
    dropped_duplicates: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def make_splits(
    examples: Iterable[Any],
    *,
    labels: Sequence[str],
    n_train: int,
    n_test: int,
    seed: int,
    min_pool_per_label: int = 1,
) -> Splits:
    """Deterministic, disjoint train / test / demonstration-pool splits of labelled examples.

    - Only examples whose label is in ``labels`` are kept; duplicate texts are removed (see
      :func:`dedupe`), so no text can appear in two splits.
    - For each label, ``min_pool_per_label`` examples are reserved for the demonstration pool
      first; then ``n_train`` train items and up to ``n_test`` test items are taken, spread over the
      labels as evenly as availability allows. Everything left joins the pool.
    - ``test`` may be smaller than ``n_test`` when the data runs out (``info`` has the numbers);
      asking for more train items than the data holds is an error.
    - Within train and test, labels are interleaved so any prefix (e.g. ``limit: 100``) stays
      near-balanced. The same inputs and ``seed`` always give the same splits.
    """
    labels = list(dict.fromkeys(labels))
    if len(labels) < 2:
        raise DataError(f"need at least 2 labels, got {labels}")
    if n_train < 0 or n_test < 0 or min_pool_per_label < 0:
        raise DataError("n_train, n_test and min_pool_per_label must be >= 0")
    rows = _as_examples(examples)
    # De-duplicate before filtering labels, so a text seen under a label that is filtered out
    # (e.g. "neutral") and one that is kept counts as ambiguous and is dropped.
    unique_all, dropped = dedupe(rows)
    unique = [e for e in unique_all if e.label in labels]
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {label: [] for label in labels}
    for e in unique:
        by_label[e.label].append(e)
    for label in labels:
        rng.shuffle(by_label[label])
        if len(by_label[label]) < min_pool_per_label:
            raise DataError(
                f"label {label!r} has {len(by_label[label])} unique examples, fewer than min_pool_per_label={min_pool_per_label}"
            )

    pool = {label: by_label[label][:min_pool_per_label] for label in labels}
    rest = {label: by_label[label][min_pool_per_label:] for label in labels}
    if n_train > sum(len(r) for r in rest.values()):
        raise DataError(
            f"asked for {n_train} train items but only {sum(len(r) for r in rest.values())} unique examples remain "
            f"after reserving {min_pool_per_label} per label for demonstrations; lower n_train or min_pool_per_label"
        )
    train_quota = _fill(n_train, {label: len(rest[label]) for label in labels}, rng)
    train = {label: rest[label][: train_quota[label]] for label in labels}
    rest = {label: rest[label][train_quota[label] :] for label in labels}
    test_quota = _fill(n_test, {label: len(rest[label]) for label in labels}, rng)
    test = {label: rest[label][: test_quota[label]] for label in labels}
    for label in labels:
        pool[label] = pool[label] + rest[label][test_quota[label] :]

    train_items = _interleave(train, rng)
    test_items = _interleave(test, rng)
    pool_items = [e for label in labels for e in pool[label]]
    info = {
        "seed": seed,
        "examples_in": len(rows),
        "duplicates_dropped": dropped,
        "unique_with_labels": len(unique),
        "train": label_counts(train_items),
        "test": label_counts(test_items),
        "pool": label_counts(pool_items),
        "test_requested": n_test,
    }
    return Splits(train_items, test_items, pool_items, dropped, info)


# --------------------------------------------------------------------------- few-shot prompts


def truncate_words(text: str, max_words: int | None) -> str:
    """``text`` cut to its first ``max_words`` words (``" ..."`` marks a cut); None keeps it whole."""
    if max_words is None:
        return text
    words = text.split()
    if len(words) <= max_words:
        return text
    return " ".join(words[:max_words]) + " ..."


def _demos_for(
    by_label: dict[str, list[Example]], label_order: list[str], shots: int, rng: random.Random
) -> list[Example]:
    """``shots`` demonstrations with labels as balanced as possible, in random order."""
    per, extra = divmod(shots, len(label_order))
    bonus = set(rng.sample(label_order, extra)) if extra else set()
    demos: list[Example] = []
    for label in label_order:
        demos.extend(rng.sample(by_label[label], per + (label in bonus)))
    rng.shuffle(demos)
    return demos


def fewshot_items(
    examples: Iterable[Any],
    *,
    pool: Iterable[Any],
    labels: Mapping[str, str],
    shots: int,
    seed: int,
    input_prefix: str = "Input: ",
    output_prefix: str = "Label:",
    separator: str = "\n\n",
    instruction: str = "",
    max_words: int | None = None,
) -> list[dict[str, Any]]:
    """One ``choice`` item per example: a k-shot prompt with balanced random demonstrations.

    ``labels`` maps each raw label to its label word, e.g. ``{"positive": "positive", ...}``; its
    order is the order of ``choices``, and each choice is the word with a leading space (a
    continuation scored after the prompt). Each block reads ``<input_prefix><text>\\n<output_prefix>``
    followed, for a demonstration, by ``" <word>"``; blocks are joined by ``separator`` and
    ``instruction`` (if any) comes first. For example, with ``input_prefix="Review: "`` and
    ``output_prefix="Sentiment:"``::

        Review: Great staff.
        Sentiment: positive

        Review: Cold food.
        Sentiment: negative

        Review: <the item's text>
        Sentiment:

    Demonstrations are drawn per item from ``pool``, which must share no text with ``examples``;
    the labels are as balanced as ``shots`` allows (``shots // len(labels)`` per label, the
    remainder given to random labels) and shuffled. ``max_words`` truncates every text. The result
    depends only on the inputs and ``seed``. Each item also carries its raw ``"label"``.
    """
    items_in = _as_examples(examples)
    pool_rows = _as_examples(pool)
    label_order = list(labels)
    if len(label_order) < 2:
        raise DataError(f"need at least 2 labels, got {label_order}")
    words = [str(labels[label]).strip() for label in label_order]
    if not all(words) or len(set(words)) != len(words):
        raise DataError(f"label words must be non-empty and distinct, got {words}")
    choices = [" " + w for w in words]
    if shots < 0:
        raise DataError(f"shots must be >= 0, got {shots}")

    item_keys = {_key(e.text) for e in items_in}
    overlap = [e.text for e in pool_rows if _key(e.text) in item_keys]
    if overlap:
        raise DataError(
            f"{len(overlap)} demonstration text(s) also appear among the items (e.g. {overlap[0]!r}); "
            "the pool must be disjoint from the evaluated items (use make_splits)"
        )
    by_label: dict[str, list[Example]] = {label: [] for label in label_order}
    for e in pool_rows:
        if e.label in by_label:
            by_label[e.label].append(e)
    per, extra = divmod(shots, len(label_order))
    need = per + (1 if extra else 0)
    short = {label: len(rows) for label, rows in by_label.items() if len(rows) < need}
    if short:
        raise DataError(f"{shots}-shot prompts need {need} demonstration(s) per label; the pool has too few: {short}")
    unknown = sorted({e.label for e in items_in} - set(label_order))
    if unknown:
        raise DataError(f"item labels {unknown} are not in labels {label_order}")

    def block(text: str) -> str:
        return f"{input_prefix}{truncate_words(text, max_words)}\n{output_prefix}"

    rng = random.Random(seed)
    out = []
    for e in items_in:
        demos = _demos_for(by_label, label_order, shots, rng)
        parts = [instruction] if instruction else []
        parts += [f"{block(d.text)} {labels[d.label].strip()}" for d in demos]
        parts.append(block(e.text))
        out.append(
            {
                "prompt": separator.join(parts),
                "choices": list(choices),
                "answer": label_order.index(e.label),
                "label": e.label,
            }
        )
    return out


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` as JSONL (UTF-8, one object per line) atomically; returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}-", delete=False
    ) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(fh.name, path)
    return n
